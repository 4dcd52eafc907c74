"""The deployment form of a network: BatchNorm folded into the conv before it, exported to ONNX, checked against
PyTorch with ONNX Runtime.

Folding is what every inference runtime does, so latency comparisons fold both sides (a BN-heavy dense network
would otherwise look slower than it deploys). The ONNX file keeps a dynamic batch dimension so one file serves
batch 1 and throughput batches alike.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from pipeline.errors import PipelineError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_TOLERANCE = 1e-4
EXPORT_BATCH = 2   # torch.export specialises a batch of 1, so the traced batch must be larger to stay dynamic
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


class ExportError(PipelineError):
    """A network that cannot be put into its deployment form (folded, exported or checked)."""


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a conv folded into its weights."""
    try:
        folded = fuse(copy.deepcopy(model).eval())
    except Exception as error:
        raise ExportError(f"BatchNorm folding needs a network torch.fx can trace, and {type(model).__name__} is not "
                          f"one ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                          f"Rewrite its data-dependent Python control flow as tensor ops.") from None
    return folded.eval()


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Union[str, Path]) -> Path:
    """Write `model` (eval mode, CPU, fp32) to an ONNX file with a dynamic batch dimension; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    inputs = example_inputs[:1].cpu().float().expand(EXPORT_BATCH, *example_inputs.shape[1:]).contiguous()
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (inputs,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            program.save(str(temporary))
        _drop_stack_traces(temporary)
    except Exception as error:
        temporary.unlink(missing_ok=True)
        raise ExportError(f"Could not export {type(model).__name__} to ONNX ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}). A layer without an "
                          f"ONNX translation is the usual cause; see the torch.onnx exporter's list of supported "
                          f"operators.") from None
    os.replace(temporary, path)
    return path


def _drop_stack_traces(path: Path) -> None:
    """Remove the Python stack trace the exporter attaches to every node: it names files by absolute path (this
    checkout, its virtual environment), so the same network exported in another folder or on another machine
    would give other bytes, and a deployed file would carry local paths. The other node annotations (module
    names, operator provenance) do not depend on where the code lives and stay."""
    model = onnx.load(str(path))
    for node in _nodes(model.graph, model.functions):
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def _nodes(graph: onnx.GraphProto, functions: Iterable[onnx.FunctionProto] = ()) -> Iterator[onnx.NodeProto]:
    """Every node of `graph`, of the subgraphs its nodes hold (If/Loop bodies) and of `functions`."""
    for node in [*graph.node, *(node for function in functions for node in function.node)]:
        yield node
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for subgraph in subgraphs:
                yield from _nodes(subgraph)


def onnx_session(path: Union[str, Path]) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with all graph optimisations (what a deployment would use)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]


@torch.no_grad()
def onnx_max_abs_diff(path: Union[str, Path], model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest |ONNX Runtime output − PyTorch output| on `inputs` (the PyTorch model unfolded, fp32, CPU)."""
    reference = copy.deepcopy(model).cpu().float().eval()(inputs.cpu().float()).numpy()
    produced = run_onnx(onnx_session(path), inputs.cpu().float().numpy())
    return float(np.abs(produced - reference).max())


def check_onnx(path: Union[str, Path], model: nn.Module, inputs: torch.Tensor,
               tolerance: float = ONNX_TOLERANCE) -> float:
    """The max abs difference of the ONNX file against PyTorch; an ExportError when above `tolerance`."""
    difference = onnx_max_abs_diff(path, model, inputs)
    if not difference <= tolerance:
        raise ExportError(f"{path} computes something else than the PyTorch network: max abs difference "
                          f"{difference:.3g} > {tolerance:g} on {len(inputs)} test inputs. The exporter translated "
                          f"a layer wrongly; report it with the model name, and do not deploy this file.")
    return difference


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress logging (it also writes through `logging`, besides stdout)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
