"""README's library snippet runs as written: a reader copying it gets a working loop."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import pytest
import torch

from pipeline.models import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippet() -> str:
    """The first Python block of README's 'The library' section."""
    section = README.read_text().split("## The library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.parametrize("config", ["RegularizerConfig()", "RegularizerConfig(decorrelation=False)"],
                         ids=["gram_term", "extra_loss_none"])
def test_the_library_snippet_runs_and_clears_gradients_every_step(config: str, monkeypatch: pytest.MonkeyPatch):
    snippet = library_snippet()
    assert "RegularizerConfig()" in snippet
    calls: Dict[str, int] = {"zero_grad": 0, "step": 0}

    def counted(name: str):
        original = getattr(torch.optim.SGD, name)

        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(torch.optim.SGD, name, counted(name))
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 32, 32, generator=generator), torch.tensor([0, 1])) for _ in range(2)]
    namespace = {"loader": loader}
    exec(compile(snippet.replace("RegularizerConfig()", config), str(README), "exec"), namespace)

    small = namespace["small"]
    dense_parameters = sum(p.numel() for p in create_model("resnet56", 10).parameters())
    assert calls == {"zero_grad": 2, "step": 2} and namespace["tpp"].iteration == 2
    assert sum(p.numel() for p in small.parameters()) < 0.2 * dense_parameters
    assert small.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
