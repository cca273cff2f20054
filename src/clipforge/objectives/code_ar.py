"""The `code_ar` objective: train a `code_prior` model, a text-to-image prior over a frozen tokenizer's codes.

    codes = tokenizer.encode_codes(images)          [B, h*w] raster order, no gradient (the tokenizer is frozen)
    captions dropped to "" with probability caption_dropout (so one model also learns the unconditional
        distribution that classifier-free guidance needs; the draw uses the torch RNG, so resume is exact)
    loss = mean over the B*h*w code positions of -log p(code_i | caption, codes_<i)

The loss is taken on the code positions only: caption tokens are context, never targets. Metrics:
`code_accuracy` (top-1 next-code accuracy), `bits_per_code` (the loss in bits) and `caption_dropped` (the
share of the batch's captions that were dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import CodeArObjectiveConfig
from clipforge.data.batches import ImageTextBatch
from clipforge.errors import ConfigError
from clipforge.objectives.base import Objective, ObjectiveOutput


def code_cross_entropy(logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, N, K] at the N code positions, codes [B, N] -> (mean cross-entropy, top-1 accuracy)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    return loss, (logits.detach().argmax(dim=-1) == codes).float().mean()


def drop_captions(texts: torch.Tensor, empty: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """texts [B, L] with each row replaced by `empty` [1, L] with probability `fraction`; (texts, dropped [B])."""
    if fraction <= 0:
        return texts, torch.zeros(texts.shape[0], dtype=torch.bool, device=texts.device)
    dropped = torch.rand(texts.shape[0], device=texts.device) < fraction  # [B]
    return torch.where(dropped[:, None], empty.to(texts), texts), dropped


class CodeArObjective(Objective):
    batch_type = ImageTextBatch
    name = "code_ar"
    families = ("code_prior",)

    def __init__(self, settings: CodeArObjectiveConfig | None = None):
        super().__init__()
        self.settings = settings or CodeArObjectiveConfig()

    @staticmethod
    def model_kwargs(config) -> dict:
        """The prior's frozen tokenizer run, when the config names one (else the family's seeded stand-in)."""
        run = config.objective.code_ar.tokenizer
        return {"tokenizer": run} if run is not None else {}

    @classmethod
    def from_config(cls, config, model: nn.Module) -> CodeArObjective:
        if not all(hasattr(model, name) for name in ("image_codes", "empty_caption", "num_codes")):
            raise ConfigError(f"objective 'code_ar' trains a model of the code_prior family "
                              f"(model.family=code_prior), got {type(model).__name__}")
        return cls(config.objective.code_ar)

    def forward(self, model: nn.Module, batch: ImageTextBatch) -> ObjectiveOutput:
        codes = model.image_codes(batch.images).flatten(1)  # [B, hw]
        texts, dropped = drop_captions(batch.texts, model.empty_caption, self.settings.caption_dropout)
        logits = model(texts, codes)  # [B, hw, K]
        loss, accuracy = code_cross_entropy(logits, codes)
        metrics = {"code_accuracy": accuracy, "bits_per_code": loss.detach() / math.log(2),
                   "caption_dropped": dropped.float().mean()}
        return ObjectiveOutput(losses={"code_ar": loss}, metrics=metrics)
