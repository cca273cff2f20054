"""The seam between methods and the loop: an objective turns a batch into named losses and metrics.

The loop owns everything else: optimiser, schedule, precision, accumulation, distribution, logging and
checkpoints. A new method is a new `Objective` subclass (and, if it needs other supervision, a new batch
type in `clipforge.data.batches`), never a new loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    losses: dict[str, torch.Tensor]  # named scalar losses; the loop back-propagates their sum
    metrics: dict[str, float] = field(default_factory=dict)  # detached numbers for logging

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())


class Objective(nn.Module):
    """Base class. Subclasses set `batch_type` and implement `forward(model, batch)`.

    An objective may own parameters (e.g. SigLIP's bias lives on the model in open_clip, so it does not
    here); `after_step(model)` runs after every optimiser step (e.g. clamping the temperature).
    """

    batch_type: type = None
    name: str = "objective"

    def forward(self, model: nn.Module, batch) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Hook run once before the optimiser and DDP are built (e.g. to freeze a tower)."""

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Hook run after each optimiser step."""
