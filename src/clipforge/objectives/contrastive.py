"""Symmetric InfoNCE over features gathered from all ranks, with an optional validity mask.

With `local_loss=True, gather_with_grad=True` (the default), each rank computes the loss for its own rows
against every rank's columns and the gather sends gradients back to their owners, so W ranks x batch B
give the same loss and gradients as 1 rank x batch W*B (as open_clip's ClipLoss with gather_with_grad).

Rows can be marked invalid (`valid=False`, e.g. padding regions so that every rank gathers the same
shape): an invalid row contributes no loss, and an invalid column is never a negative. The loss is then
the mean over the valid rows of all ranks, exactly as if the padding had never existed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipforge.distributed import gather_no_grad, gather_with_grad, world_info

IGNORE = -100  # cross_entropy's ignore_index: rows that take no part in the loss


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, metrics). The loss is the mean over valid rows of all ranks (global mean).

    Under DDP (gradients averaged over W ranks) the gradients equal those of the single-process loss over
    the union of all ranks' rows when `gather_with_grad=True`. Metrics are detached 0-d tensors.
    """
    info = world_info()
    batch = image_features.shape[0]
    device = image_features.device
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=device)
    all_images = gather_features(image_features, gather_with_grad)  # [W*B, D]
    all_texts = gather_features(text_features, gather_with_grad)  # [W*B, D]
    all_valid = gather_no_grad(valid, keep_local_grad=False)  # [W*B]

    if local_loss:
        row_images, row_texts, row_valid = image_features, text_features, valid
        row_labels = torch.arange(batch, device=device) + info.rank * batch  # [B]
    else:
        row_images, row_texts, row_valid = all_images, all_texts, all_valid
        row_labels = torch.arange(all_images.shape[0], device=device)  # [W*B]
    # invalid rows are ignored by cross_entropy (zero loss, zero gradient)
    row_labels = row_labels.masked_fill(~row_valid, IGNORE)

    logits_per_image = logit_scale * row_images @ all_texts.T  # [R, W*B]
    logits_per_text = logit_scale * row_texts @ all_images.T  # [R, W*B]
    # invalid columns are never negatives; the dtype's lowest finite value (not -inf) keeps a row whose
    # columns are all invalid free of NaN (inf - inf) in the softmax
    lowest = torch.finfo(logits_per_image.dtype).min
    logits_per_image = logits_per_image.masked_fill(~all_valid[None, :], lowest)
    logits_per_text = logits_per_text.masked_fill(~all_valid[None, :], lowest)

    loss_i2t = F.cross_entropy(logits_per_image, row_labels, ignore_index=IGNORE, reduction="sum")
    loss_t2i = F.cross_entropy(logits_per_text, row_labels, ignore_index=IGNORE, reduction="sum")
    # global mean over valid rows: this rank's valid rows summed / the valid count of all ranks
    total_valid = all_valid.sum().clamp_min(1).to(loss_i2t.dtype)
    loss = (loss_i2t + loss_t2i) / 2 / total_valid
    if local_loss and info.enabled:
        # each rank holds its share of the rows; DDP averages gradients over ranks, so scale by W to
        # recover the gradient of the global mean (and the mean over ranks of this value is the loss)
        loss = loss * info.world_size

    with torch.no_grad():
        hits = (logits_per_image.argmax(dim=1) == row_labels) & row_valid
        accuracy = hits.sum().float() / row_valid.sum().clamp_min(1)
    return loss, {"i2t_acc": accuracy}
