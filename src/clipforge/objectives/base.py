"""The seam between methods and the loop: an objective turns a batch into named losses and metrics.

The loop owns everything else: optimiser, schedule, precision, accumulation, distribution, logging and
checkpoints. A new method is a new `Objective` subclass (and, if it needs other supervision, a new batch
type in `clipforge.data.batches`), never a new loop.

What the loop relies on, and nothing more:
- `batch_type`: the batch class it trains on (it decodes and collates itself);
- `forward(model, batch)` -> ObjectiveOutput; scalars worth logging (a temperature, a bias) go in `metrics`,
  which the loop averages over micro-batches and ranks and records under their names;
- `prepare_model(model)`, called once by the loop before the optimiser and DDP are built;
- `after_step(model)`, after every optimiser step (e.g. clamping the temperature);
- `find_unused_parameters`: whether DDP must expect parameters without a gradient on some steps;
- `no_weight_decay`: names (in the objective's own parameters) that must not be decayed;
- `phases(model)`: optimiser phases. One by default; several for e.g. a GAN discriminator with its own Adam,
  learning rate and start step. With several, the loop calls `forward(model, batch, phase=name)` once per
  active phase per step, in the declared order, and steps only that phase's optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MAIN_PHASE = "main"


@dataclass
class Phase:
    """One optimiser over a set of parameters, with its own settings (None: the train config's)."""

    name: str
    parameters: list[nn.Parameter] | None = None  # None: every trainable parameter no other phase claims
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    warmup_steps: int | None = None
    start_step: int = 0  # the phase trains from this optimiser step on (its schedule starts there)


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
    find_unused_parameters: bool = False
    no_weight_decay: frozenset[str] = frozenset()
    families: tuple[str, ...] = ("clip",)  # model families it trains (the first one's tiny variant in tests)

    def forward(self, model: nn.Module, batch) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Hook run once by the loop before the optimiser and DDP are built (e.g. to freeze a tower)."""

    def phases(self, model: nn.Module) -> list[Phase]:
        """The optimiser phases, in stepping order. Default: one phase over every trainable parameter."""
        return [Phase(MAIN_PHASE)]

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Hook run after each optimiser step."""
