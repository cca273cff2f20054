"""FineCLIP: global contrast + real-time self-distillation of regions + regional contrast (specs Part C).

    L = w_global  * InfoNCE(image, caption)
      + w_distill * mean_valid(1 - cos(region feature, embedding of the enlarged crop of that region))
      + w_region  * InfoNCE(region features, region-caption embeddings) over the valid regions of all ranks

Region features are RoIAlign-pooled from the dense map of the same full-image pass that gives the global
embedding (`clipforge.models.dense.encode_image_and_dense`); the teacher is the current model itself
(`encode_image` on the crops, all valid crops of the batch in one pass). One `logit_scale` serves both
contrastive terms and is clamped to [0, ln 100] after every step.

Deliberate choices against the official code (docs/fineclip.md):
- `teacher_stop_grad` (default True) detaches the crop embeddings; the official code lets gradient flow
  into both branches.
- The region contrast pads each rank to a fixed B*M rows and carries an explicit validity mask through the
  gather, instead of dropping all-zero rows after the gather; so 1 rank and W ranks give the same loss.
- Regions whose box is not finite, has no area or whose slot is padding never enter any term.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import FineclipObjectiveConfig
from clipforge.data.batches import RegionBatch
from clipforge.distributed import gather_no_grad, world_info
from clipforge.errors import ConfigError
from clipforge.models.dense import (
    crop_regions,
    encode_image_and_dense,
    encode_image_any_size,
    enlarge_boxes,
    pool_regions,
    vision_transformer,
)
from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.contrastive import contrastive_loss

MAX_LOGIT_SCALE = math.log(100)
_NON_TEXT_PARAMETERS = ("logit_scale", "logit_bias")


def text_modules(model: nn.Module) -> list[nn.Module]:
    """The text tower's submodules: every direct child except the image tower (CLIP and CustomTextCLIP)."""
    return [child for name, child in model.named_children() if name != "visual"]


def text_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the image tower except the temperature (and SigLIP bias)."""
    return [
        param for name, param in model.named_parameters()
        if not name.startswith("visual.") and name not in _NON_TEXT_PARAMETERS
    ]


def usable_regions(boxes: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int]):
    """Clip boxes [B, M, 4] to the image and keep the valid slots whose box is finite with positive area.

    Returns (clipped boxes with invalid slots zeroed, usable mask [B, M]). The data pipeline already drops
    bad boxes; this guards a user's own batches so a NaN box can never reach the loss.
    """
    height, width = image_size
    finite = torch.isfinite(boxes).all(dim=-1)
    safe = torch.where(finite.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    limit = safe.new_tensor([width, height, width, height])
    clipped = torch.minimum(safe.clamp_min(0), limit)
    has_area = (clipped[..., 2] > clipped[..., 0]) & (clipped[..., 3] > clipped[..., 1])
    usable = valid.bool() & finite & has_area
    return torch.where(usable.unsqueeze(-1), clipped, torch.zeros_like(clipped)), usable


def _global_count(local_count: torch.Tensor) -> torch.Tensor:
    """Sum of a per-rank count over all ranks (no gradient); the same value on every rank."""
    return gather_no_grad(local_count.reshape(1), keep_local_grad=False).sum()


class FineclipObjective(Objective):
    batch_type = RegionBatch
    name = "fineclip"

    def __init__(
        self,
        config: FineclipObjectiveConfig | None = None,
        *,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config or FineclipObjectiveConfig()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # without the global term a trainable text tower gets no gradient on a step with no region anywhere;
        # DDP must then be told that parameters can go unused
        self.find_unused_parameters = self.config.w_global == 0 and not self.config.freeze_text
        self._region_data_checked = False
        if model is not None:
            self.prepare_model(model)

    @classmethod
    def from_config(cls, config, model: nn.Module | None = None) -> FineclipObjective:
        """From an ExperimentConfig: `objective.fineclip`, and the distributed mode of `objective.clip`."""
        return cls(
            config.objective.fineclip,
            local_loss=config.objective.clip.local_loss,
            gather_with_grad=config.objective.clip.gather_with_grad,
        )

    @property
    def needs_regions(self) -> bool:
        return self.config.w_distill > 0 or self.config.w_region > 0

    def prepare_model(self, model: nn.Module) -> None:
        """Checks the image tower; with `freeze_text`, freezes the text tower (requires_grad off, eval mode)."""
        if self.needs_regions:
            visual = vision_transformer(model)  # a clear ConfigError now rather than at the first step
            resolution = self.config.teacher_resolution
            if resolution is not None and resolution < max(visual.patch_size):
                raise ConfigError(f"objective.fineclip.teacher_resolution ({resolution}) is smaller than the "
                                  f"model's patch size ({max(visual.patch_size)})")
        if self.config.freeze_text:
            for param in text_parameters(model):
                param.requires_grad_(False)
            for module in text_modules(model):
                module.eval()

    # ------------------------------------------------------------------------------------------------------

    def _encode_texts(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.freeze_text:
            for module in text_modules(model):  # the loop's model.train() would switch them back
                module.eval()
            with torch.no_grad():
                return model.encode_text(tokens, normalize=True)
        return model.encode_text(tokens, normalize=True)

    def _teacher_resolution(self, model: nn.Module) -> tuple[int, int]:
        if self.config.teacher_resolution is not None:
            return (self.config.teacher_resolution, self.config.teacher_resolution)
        return tuple(vision_transformer(model).image_size)

    def crop_embeddings(self, model, images, boxes, batch_index, image_size) -> torch.Tensor:
        """The teacher: the model's own normalised embeddings of the enlarged crops, one batched pass. [K, D]"""
        crop_boxes = enlarge_boxes(boxes, self.config.crop_scale, image_size)  # [K, 4]
        crops = crop_regions(images, crop_boxes, batch_index, self._teacher_resolution(model))  # [K, 3, S, S]
        if self.config.teacher_stop_grad:
            with torch.no_grad():
                return F.normalize(encode_image_any_size(model, crops), dim=-1)
        return F.normalize(encode_image_any_size(model, crops), dim=-1)

    def encode_full_image(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding [B, D], dense map [B, D, h, w]) of the full images, in one pass."""
        return encode_image_and_dense(model, images)

    def forward(self, model: nn.Module, batch: RegionBatch) -> ObjectiveOutput:
        cfg = self.config
        images = batch.images  # [B, 3, H, W]
        batch_size, image_size = images.shape[0], tuple(images.shape[-2:])
        info = world_info()
        rank_factor = info.world_size if info.enabled else 1  # DDP averages gradients over ranks
        logit_scale = model.logit_scale.exp()
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}  # detached 0-d tensors, as contrastive_loss returns
        if self.needs_regions and not self._region_data_checked:
            self._region_data_checked = True
            if not bool(batch.region_valid.any()):
                warnings.warn("fineclip: the first batch holds no region boxes; on data without boxes "
                              "(key.json \"regions\") the distillation and region terms train nothing and this "
                              "is plain CLIP", stacklevel=2)

        if self.needs_regions:
            image_embedding, dense = self.encode_full_image(model, images)  # [B, D], [B, D, h, w]
        else:
            image_embedding, dense = model.encode_image(images), None
        image_features = F.normalize(image_embedding, dim=-1)  # [B, D]

        if self.needs_regions:
            boxes, usable = usable_regions(batch.boxes, batch.region_valid, image_size)  # [B, M, 4], [B, M]
            slots = usable.shape[1]
            batch_index, slot_index = usable.nonzero(as_tuple=True)  # [K], [K]
            region_features = pool_regions(dense, boxes, usable, image_size)  # [B, M, D] unit, 0 if unusable
            local_count = usable.sum()
            total_count = _global_count(local_count)  # K over all ranks
            metrics["regions"] = local_count.detach().float()
            metrics["regions_unusable"] = (batch.region_valid.sum() - local_count).detach().float()

        # Text: captions and the usable region captions in one pass when the token lengths agree.
        region_tokens = batch.region_texts[batch_index, slot_index] if cfg.w_region > 0 else None  # [K, L]
        if region_tokens is not None and region_tokens.shape[-1] == batch.texts.shape[-1]:
            all_text = self._encode_texts(model, torch.cat([batch.texts, region_tokens]))
            text_features, region_text_features = all_text[:batch_size], all_text[batch_size:]
        else:
            text_features = self._encode_texts(model, batch.texts)  # [B, D]
            region_text_features = self._encode_texts(model, region_tokens) if region_tokens is not None else None

        if cfg.w_global > 0:
            global_loss, global_metrics = contrastive_loss(
                image_features, text_features, logit_scale,
                local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            )
            losses["global"] = cfg.w_global * global_loss
            metrics["global_i2t_acc"] = global_metrics["i2t_acc"]

        if cfg.w_distill > 0:
            if local_count > 0:
                crop_features = self.crop_embeddings(model, images, boxes[batch_index, slot_index], batch_index,
                                                      image_size)  # [K, D]
                cosine = (region_features[batch_index, slot_index] * crop_features).sum(dim=-1)  # [K]
                # global mean over every rank's regions (x W because DDP averages the gradients)
                distill = (1 - cosine).sum() / total_count.clamp_min(1) * rank_factor
                metrics["distill_cos"] = cosine.detach().mean()
            else:
                distill = dense.sum() * 0.0  # no region here: zero, still part of the graph
            losses["distill"] = cfg.w_distill * distill

        if cfg.w_region > 0:
            if total_count > 0:  # the same decision on every rank, so the gathers below stay matched
                flat_valid = usable.reshape(-1)  # [B*M], fixed size on every rank
                flat_regions = region_features.reshape(batch_size * slots, -1)  # [B*M, D]
                flat_texts = region_features.new_zeros(flat_regions.shape)
                flat_texts = flat_texts.index_put(
                    (batch_index * slots + slot_index,), region_text_features.to(flat_texts.dtype))
                region_loss, region_metrics = contrastive_loss(
                    flat_regions, flat_texts, logit_scale,
                    local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, valid=flat_valid,
                )
                if local_count > 0:
                    metrics["region_i2t_acc"] = region_metrics["i2t_acc"]
            else:
                # no valid region on any rank: nothing to contrast (every rank skips the gathers alike)
                region_loss = dense.sum() * 0.0
            losses["region"] = cfg.w_region * region_loss

        metrics["logit_scale"] = logit_scale.detach()
        return ObjectiveOutput(losses=losses, metrics=metrics)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
