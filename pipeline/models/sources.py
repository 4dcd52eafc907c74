"""Where a model comes from: the registry, any torchvision classifier, any timm CNN, or the user's own factory.

`model.name` is a registry name (`resnet56`), `torchvision/<name>` or `timm/<name>`; `model.factory` is a dotted
path to the user's own callable (`nets.mynet.make_net`). Internally both end up as one *spec* string (the factory
path contains dots, names never do), which is what checkpoints record and rebuild from. Every source turns a
mistake (unknown name, unknown or missing option, a factory that does not import or returns no module) into a
`ConfigError` naming the setting and the fix, before anything is trained.

Weights are never downloaded while building: timm and torchvision models are built with `pretrained=False` /
`weights=None`; published weights are loaded separately (`pretrained_state_dict`), only when `model.pretrained`
asks for them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from pipeline.errors import ConfigError, PipelineError
import pipeline.models.registry as registry
import pipeline.models.torchvision_models as torchvision_models

TIMM_PREFIX = "timm/"
TORCHVISION_PREFIX = "torchvision/"
# Arguments the pipeline itself passes to a factory that accepts them; never read from model.options.
DATASET_ARGUMENTS = ("num_classes", "in_channels", "image_size")


def model_spec(name: Optional[str], factory: Optional[str]) -> str:
    """The one string that identifies the architecture's source (what checkpoints record)."""
    return factory or name or ""


def is_factory(spec: str) -> bool:
    """A dotted path names the user's own callable; registry, timm and torchvision names hold no dot before '/'."""
    return "." in spec and "/" not in spec


def create_model(spec: str, num_classes: int, /, **options: Any) -> nn.Module:
    """Build the architecture `spec` names with a `num_classes`-way head, options checked first."""
    in_channels = options.pop("in_channels", 3)
    image_size = options.pop("image_size", 32)
    if spec.startswith(TIMM_PREFIX):
        return _timm_model(spec[len(TIMM_PREFIX):], num_classes, in_channels, options)
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX):], num_classes, in_channels, options)
    if is_factory(spec):
        return _factory_model(spec, num_classes, in_channels, image_size, options)
    return registry.create_model(spec, num_classes, in_channels=in_channels, image_size=image_size, **options)


def check_model_name(name: str) -> None:
    """Refuse a name no source knows, suggesting the closest one (timm and torchvision list theirs)."""
    if name.startswith(TIMM_PREFIX):
        _timm_name(name[len(TIMM_PREFIX):])
    elif name.startswith(TORCHVISION_PREFIX):
        _torchvision_name(name[len(TORCHVISION_PREFIX):])
    elif is_factory(name):
        raise ConfigError(f"params.yaml: 'model.name' is '{name}', a dotted path. Your own model goes in "
                          f"model.factory: {name} (with model.name: null); model.name takes a registry name, "
                          f"torchvision/<name> or timm/<name>.")
    elif name not in registry.available_models():
        close = difflib.get_close_matches(name, registry.available_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"params.yaml: 'model.name' '{name}' is unknown.{hint} Available: "
                          f"{', '.join(registry.available_models())}, or torchvision/<name>, timm/<name>, or your "
                          f"own code through model.factory. Fix it in params.yaml.")


def source_record(spec: str) -> Dict[str, str]:
    """What a checkpoint records about where its architecture's code came from: the library and its version, or
    the factory's module file and the sha256 of its bytes (so a changed factory is detectable later)."""
    if spec.startswith(TIMM_PREFIX):
        import timm
        return {"source": "timm", "version": timm.__version__}
    if spec.startswith(TORCHVISION_PREFIX) or spec in torchvision_models.TORCHVISION_NAMES:
        import torchvision
        return {"source": "torchvision", "version": torchvision.__version__}
    if is_factory(spec):
        path = factory_file(spec)
        return {"source": "factory", "factory": spec, "file": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"source": "registry", "name": spec}


def factory_file(spec: str) -> Path:
    """The source file of the module defining the factory (the file DVC must watch)."""
    module = _factory_module(spec)
    return Path(inspect.getfile(module)).resolve()


def has_published_weights(spec: str) -> bool:
    """Whether `model.pretrained: true` can mean anything for this source (checked without any download)."""
    if spec.startswith(TIMM_PREFIX):
        import timm
        return bool(timm.models.is_model_pretrained(spec[len(TIMM_PREFIX):]))
    if spec.startswith(TORCHVISION_PREFIX):
        import torchvision
        name = spec[len(TORCHVISION_PREFIX):]
        try:
            return torchvision.models.get_model_weights(name) is not None
        except ValueError:
            return False
    return spec in torchvision_models.TORCHVISION_NAMES


def pretrained_state_dict(spec: str) -> Dict[str, torch.Tensor]:
    """The published weights of `spec` (torchvision's or timm's hub), or a clear error when it has none or the
    hub cannot be reached."""
    if not has_published_weights(spec):
        raise ConfigError(f"params.yaml: 'model.pretrained' is true but '{spec}' has no published weights (only "
                          f"torchvision and timm models with a pretrained tag have them). Set model.pretrained: "
                          f"false, or give your own weights with model.checkpoint: <path>.")
    if spec.startswith(TIMM_PREFIX):
        return _timm_pretrained(spec[len(TIMM_PREFIX):])
    return torchvision_models.pretrained_state_dict(spec.removeprefix(TORCHVISION_PREFIX))


def _timm_name(name: str) -> None:
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"params.yaml: 'model.name' is 'timm/{name}', but timm {timm.__version__} has no model "
                          f"'{name}'.{hint} `python -c \"import timm; print(timm.list_models('*res*'))\"` lists them.")


def _torchvision_name(name: str) -> None:
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"params.yaml: 'model.name' is 'torchvision/{name}', which is not one of torchvision "
                          f"{torchvision.__version__}'s classification models.{hint} Available: "
                          f"{', '.join(names)}.")


def _timm_model(name: str, num_classes: int, in_channels: int, options: Dict[str, Any]) -> nn.Module:
    import timm
    _timm_name(name)
    return _call_with_options(f"timm/{name}", lambda: timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options), options)


def _timm_pretrained(name: str) -> Dict[str, torch.Tensor]:
    import timm
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(f"Could not get timm's published weights of '{name}': {reason}. This machine probably "
                            f"cannot reach the Hugging Face hub: download them once elsewhere (`python -c \"import "
                            f"timm, torch; torch.save(timm.create_model('{name}', pretrained=True).state_dict(), "
                            f"'{name}.pth')\"`), copy the file under data/weights/, and set model.pretrained: false "
                            f"and model.checkpoint: data/weights/{name}.pth.") from None


def _torchvision_model(name: str, num_classes: int, in_channels: int, options: Dict[str, Any]) -> nn.Module:
    import torchvision
    _torchvision_name(name)
    if in_channels != 3:
        raise ConfigError(f"Model 'torchvision/{name}' is an ImageNet model and needs 3-channel images, but the "
                          f"dataset gives {in_channels}. Set `data.channels: 3` in params.yaml.")
    return _call_with_options(f"torchvision/{name}", lambda: torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **options), options)


def _call_with_options(spec: str, build: Callable[[], nn.Module], options: Dict[str, Any]) -> nn.Module:
    """Libraries forward options to the model class through **kwargs, so an unknown one surfaces as TypeError."""
    try:
        return build()
    except TypeError as error:
        raise ConfigError(f"Model '{spec}' does not accept the options {sorted(options)}: {error}. Fix "
                          f"model.options in params.yaml (its constructor's keyword arguments).") from None


def _factory_model(spec: str, num_classes: int, in_channels: int, image_size: int,
                   options: Dict[str, Any]) -> nn.Module:
    factory = _factory_callable(spec)
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "num_classes" not in parameters and not takes_any:
        raise ConfigError(f"model.factory '{spec}' takes no `num_classes` argument; the pipeline passes the "
                          f"dataset's class count there. Add `num_classes: int` to its signature.")
    for option in options:
        if option in DATASET_ARGUMENTS:
            raise ConfigError(f"model.options.{option} is set, but the pipeline passes {option} itself (from the "
                              f"dataset). Remove it from model.options.")
        if option not in parameters and not takes_any:
            accepted = [n for n in parameters if n not in DATASET_ARGUMENTS]
            close = difflib.get_close_matches(option, accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.options.{option} is not an argument of model.factory '{spec}'.{hint} It "
                              f"accepts: {', '.join(accepted) or 'nothing besides num_classes'}. Fix model.options.")
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, **options}
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in given
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise ConfigError(f"model.factory '{spec}' needs the arguments {missing}, which model.options does not "
                          f"give. Add them under model.options in params.yaml.")
    arguments = {n: v for n, v in given.items() if n in parameters or (takes_any and n in options)}
    model = factory(**arguments)
    if not isinstance(model, nn.Module) or isinstance(model, (torch.jit.ScriptModule, nn.DataParallel)) \
            or hasattr(model, "_orig_mod"):
        raise ConfigError(f"model.factory '{spec}' returned {type(model).__name__}, not a plain nn.Module. Return "
                          f"the network itself (not scripted, compiled or wrapped in DataParallel).")
    return model


def _factory_callable(spec: str) -> Callable[..., Any]:
    module = _factory_module(spec)
    attribute = spec.rpartition(".")[2]
    target = getattr(module, attribute, None)
    if not callable(target):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attribute, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.factory '{spec}': module '{module.__name__}' has no callable '{attribute}'.{hint} "
                          f"Fix model.factory in params.yaml.")
    return target


def _factory_module(spec: str) -> Any:
    """Import the module part of `spec`, with the repository root importable (stages run as scripts)."""
    from pipeline.config import project_root
    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = spec.rpartition(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(f"{error.name}.")):
            raise ConfigError(f"model.factory '{spec}': no module '{error.name}' can be imported. Put your code in "
                              f"the repository's nets/ folder (e.g. nets/mynet.py, then model.factory: "
                              f"nets.mynet.make_net), or install its package.") from None
        raise ConfigError(f"model.factory '{spec}': its module imports '{error.name}', which is not installed. "
                          f"Install it, or remove that import.") from None
    except Exception as error:
        raise ConfigError(f"model.factory '{spec}': importing '{module_name}' failed with "
                          f"{type(error).__name__}: {error}. Fix that module.") from None
