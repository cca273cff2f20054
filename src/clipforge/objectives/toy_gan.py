"""A toy GAN: the `toy` family's decoder learns to reconstruct images against a small patch discriminator.

It is the two-phase precedent that LG-VQ's VQ-GAN discriminator follows, kept small enough for the
registry-wide tests:

- phase `main` (the model): L1 reconstruction, plus a non-saturating adversarial term once the
  discriminator has started;
- phase `discriminator` (the objective's own network): its own Adam (lr, betas 0.5/0.9 as in taming),
  starting at optimiser step `DISC_START`, with the hinge loss on real images vs detached reconstructions.

The loop calls `forward(model, batch, phase=...)` for each active phase in turn and steps that phase's
optimiser only; nothing in the loop knows this is a GAN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.batches import LabelledImageBatch
from clipforge.objectives.base import MAIN_PHASE, Objective, ObjectiveOutput, Phase

DISC_START = 2  # optimiser steps of reconstruction only, before the discriminator (and its loss) start
DISC_LR = 2e-3
ADVERSARIAL_WEIGHT = 0.1


class ToyGanObjective(Objective):
    batch_type = LabelledImageBatch
    name = "toy_gan"
    families = ("toy",)
    # the discriminator gets no gradient in the model's phase and the model none in the discriminator's
    find_unused_parameters = True

    def __init__(self, width: int = 8):
        super().__init__()
        self.discriminator = nn.Sequential(  # a patch discriminator: one logit per 8x8 patch
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 1, 4, stride=4),
        )
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # objective state in checkpoints

    def prepare_model(self, model: nn.Module) -> None:
        model.head.requires_grad_(False)  # the class head plays no part in reconstruction

    def phases(self, model: nn.Module) -> list[Phase]:
        return [Phase(MAIN_PHASE),
                Phase("discriminator", parameters=list(self.discriminator.parameters()), lr=DISC_LR,
                      betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=0, start_step=DISC_START)]

    def forward(self, model: nn.Module, batch: LabelledImageBatch, phase: str = MAIN_PHASE) -> ObjectiveOutput:
        reconstruction = model.reconstruct(batch.images)  # [B, 3, S, S]
        if phase == "discriminator":
            real = self.discriminator(batch.images)  # [B, 1, h, w]
            fake = self.discriminator(reconstruction.detach())
            hinge = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            return ObjectiveOutput(losses={"hinge": hinge},
                                   metrics={"real_score": real.detach().mean(), "fake_score": fake.detach().mean()})
        self.steps_seen += 1
        losses = {"l1": (reconstruction - batch.images).abs().mean()}
        if int(self.steps_seen) > DISC_START + 1:  # the discriminator has been trained at least once
            losses["adversarial"] = ADVERSARIAL_WEIGHT * F.softplus(-self.discriminator(reconstruction)).mean()
        return ObjectiveOutput(losses=losses)
