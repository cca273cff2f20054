"""Symmetric InfoNCE over features gathered from all ranks, with an optional validity mask.

With `local_loss=True, gather_with_grad=True` (the default), each rank computes the loss for its own rows
against every rank's columns and the gather sends gradients back to their owners, so W ranks x batch B
give the same loss and gradients as 1 rank x batch W*B (specs/clip_fineclip.md A3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipforge.engine.distributed import gather_no_grad, gather_with_grad, world_info


def gather_features(features: torch.Tensor, gather_grad: bool) -> torch.Tensor:
    return gather_with_grad(features) if gather_grad else gather_no_grad(features)


def contrastive_loss(
    image_features: torch.Tensor,  # [B, D] L2-normalised, this rank's rows
    text_features: torch.Tensor,  # [B, D] L2-normalised
    logit_scale: torch.Tensor,  # scalar, already exp()'d
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    valid: torch.Tensor | None = None,  # [B] bool: rows that take part (padding rows are False)
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns (loss, metrics). The loss is the mean over valid rows of all ranks (global mean)."""
    info = world_info()
    batch = image_features.shape[0]
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=image_features.device)
    all_images = gather_features(image_features, gather_with_grad)  # [W*B, D]
    all_texts = gather_features(text_features, gather_with_grad)  # [W*B, D]
    all_valid = gather_no_grad(valid, keep_local_grad=False)  # [W*B]
    if local_loss:
        offset = info.rank * batch
        row_images, row_texts = image_features, text_features
        row_valid = valid
        row_labels = torch.arange(batch, device=valid.device) + offset
    else:
        row_images, row_texts, row_valid = all_images, all_texts, all_valid
        row_labels = torch.arange(all_images.shape[0], device=valid.device)
    column_mask = torch.zeros_like(all_valid, dtype=image_features.dtype).masked_fill(~all_valid, float("-inf"))
    logits_per_image = logit_scale * row_images @ all_texts.T + column_mask  # [B or N, N]
    logits_per_text = logit_scale * row_texts @ all_images.T + column_mask  # [B or N, N]
    loss_i2t = F.cross_entropy(logits_per_image, row_labels, reduction="none")
    loss_t2i = F.cross_entropy(logits_per_text, row_labels, reduction="none")
    per_row = (loss_i2t + loss_t2i) / 2
    # global mean over valid rows: sum of local valid rows / total valid count (the same on every rank)
    total_valid = all_valid.sum().clamp_min(1).to(per_row.dtype)
    per_row = torch.where(row_valid, per_row, torch.zeros_like(per_row))
    loss = per_row.sum() / total_valid
    if local_loss and info.enabled:
        # each rank holds 1/W of the rows; DDP averages gradients over ranks, so scale by W to recover
        # the gradient of the global mean.
        loss = loss * info.world_size
    with torch.no_grad():
        hits = (logits_per_image.argmax(dim=1) == row_labels) & row_valid
        accuracy = hits.sum().float() / row_valid.sum().clamp_min(1)
    return loss, {"i2t_acc": float(accuracy)}
