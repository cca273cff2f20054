"""Image classification with cross-entropy on class labels: the `toy` family's objective.

Small on purpose: it shows what a method needs to plug into the loop (a batch type, a forward that returns
named losses and metrics) when the model is not a CLIP model and has no text at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.batches import LabelledImageBatch
from clipforge.objectives.base import Objective, ObjectiveOutput


class ClassifyObjective(Objective):
    batch_type = LabelledImageBatch
    name = "classify"
    families = ("toy",)

    def prepare_model(self, model: nn.Module) -> None:
        model.decoder.requires_grad_(False)  # classification never uses the decoder: nothing to train there

    def forward(self, model: nn.Module, batch: LabelledImageBatch) -> ObjectiveOutput:
        logits = model.classify(batch.images)  # [B, C]
        loss = F.cross_entropy(logits, batch.labels, ignore_index=-1)
        with torch.no_grad():
            known = batch.labels >= 0
            accuracy = (logits.argmax(-1) == batch.labels)[known].float().mean() if known.any() else logits.new_zeros(())
        return ObjectiveOutput(losses={"cross_entropy": loss}, metrics={"accuracy": accuracy})
