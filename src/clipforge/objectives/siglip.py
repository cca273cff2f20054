"""SigLIP: an independent sigmoid loss on every image-caption pair, with a learnable temperature and bias.

For each image i and caption j, z_ij = +1 when they belong together and -1 otherwise, and
    L = -(1/B) sum_i sum_j log sigmoid(z_ij * (s * x_i . y_j + b))
summed over this rank's B images against the captions of all ranks, normalised by the local batch B
(Zhai et al. 2023, SigLIP). Starting values s = 10, b = -10 counter the many negatives per positive.

Distributed: captions are gathered from every rank with gradients (the simple form of the paper's
negatives exchange). With DDP averaging gradients over W ranks, W x B equals 1 x W*B exactly, because the
per-rank losses sum to W times the global loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.batches import ImageTextBatch
from clipforge.distributed import gather_with_grad, world_info
from clipforge.errors import ConfigError
from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.clip import clamp_logit_scale


def sigmoid_loss(
    image_features: torch.Tensor,  # [B, D] L2-normalised, this rank's images
    text_features: torch.Tensor,  # [B, D] L2-normalised, this rank's captions
    logit_scale: torch.Tensor,  # scalar, already exp()'d
    logit_bias: torch.Tensor,  # scalar
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = image_features.shape[0]
    all_texts = gather_with_grad(text_features)  # [W*B, D]
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # [B, W*B]
    positives = torch.arange(batch, device=logits.device) + world_info().rank * batch  # [B]
    signs = -torch.ones_like(logits)  # [B, W*B]: 2*I - 1 against the global identity
    signs[torch.arange(batch, device=logits.device), positives] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / batch
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == positives).float().mean()
    return loss, {"i2t_acc": accuracy}


class SiglipObjective(Objective):
    batch_type = ImageTextBatch
    name = "siglip"

    @staticmethod
    def model_kwargs(config) -> dict:
        """The open_clip model carries the bias when created with init_logit_bias."""
        siglip = config.objective.siglip
        return {"init_logit_scale": siglip.init_logit_scale, "init_logit_bias": siglip.init_logit_bias}

    @classmethod
    def from_config(cls, config, model: nn.Module) -> SiglipObjective:
        if getattr(model, "logit_bias", None) is None:
            raise ConfigError("objective 'siglip' needs a model with a logit_bias (create it with init_logit_bias)")
        return cls()

    def forward(self, model: nn.Module, batch: ImageTextBatch) -> ObjectiveOutput:
        image_features = model.encode_image(batch.images, normalize=True)  # [B, D]
        text_features = model.encode_text(batch.texts, normalize=True)  # [B, D]
        logit_scale = model.logit_scale.exp()
        loss, metrics = sigmoid_loss(image_features, text_features, logit_scale, model.logit_bias)
        metrics["logit_scale"] = logit_scale.detach()
        metrics["logit_bias"] = model.logit_bias.detach()
        return ObjectiveOutput(losses={"sigmoid": loss}, metrics=metrics)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        clamp_logit_scale(model)  # open_clip's loop clamps for SigLIP too
