"""The extension points of the training loop: how TPP, the baselines and measurements plug into one loop.

A protocol of its own below `training`, `pruning` and `measure`, so that the regularizer and the trainability
measure implement it without importing the loop that calls them."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn


class TrainingHooks:
    """Extension points of the training loop; every default does nothing."""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A term added to the task loss this step (e.g. TPP's decorrelation), or None."""
        return None

    def before_optimizer_step(self) -> None:
        """Edit gradients after backward() (all-reduced under DDP, unscaled under fp16)."""

    def after_optimizer_step(self) -> None:
        """Advance schedules once the parameters have moved."""

    def finished(self) -> bool:
        """Stop the loop early (e.g. a regularization schedule that is complete)."""
        return False

    def epoch_metrics(self, model: nn.Module) -> Dict[str, float]:
        """Extra measurements of the model at the end of each epoch (e.g. its trainability), logged with it."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue the hooks' schedules exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def advice(self) -> str:
        """Which settings to try when the loss diverges under these hooks (named in the error message)."""
        return ""
