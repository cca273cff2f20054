"""CLIP: symmetric InfoNCE between image and caption embeddings with a learnable temperature.

The temperature lives on the open_clip model as `logit_scale` = ln(1/tau), initialised at ln(1/0.07) by
open_clip and clamped to [0, ln 100] after every optimiser step, as the CLIP paper does to keep the logits
from being scaled by more than 100 (Radford et al. 2021, section 2.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.data.batches import ImageTextBatch
from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.contrastive import contrastive_loss

MAX_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(model: nn.Module) -> None:
    """Project the learnable temperature back into [0, ln 100] (a projection, not a gradient clip)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class ClipObjective(Objective):
    batch_type = ImageTextBatch
    name = "clip"
    families = ("clip", "lit")  # lit: a locked image encoder with a trained pool, projection and text tower

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    @classmethod
    def from_config(cls, config, model: nn.Module) -> ClipObjective:
        clip = config.objective.clip
        return cls(local_loss=clip.local_loss, gather_with_grad=clip.gather_with_grad)

    def forward(self, model: nn.Module, batch: ImageTextBatch) -> ObjectiveOutput:
        image_features = model.encode_image(batch.images, normalize=True)  # [B, D]
        text_features = model.encode_text(batch.texts, normalize=True)  # [B, D]
        logit_scale = model.logit_scale.exp()  # scalar
        loss, metrics = contrastive_loss(
            image_features, text_features, logit_scale,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
        )
        metrics["logit_scale"] = logit_scale.detach()
        return ObjectiveOutput(losses={"contrastive": loss}, metrics=metrics)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        clamp_logit_scale(model)
