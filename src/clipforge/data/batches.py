"""Batch types: what the data pipeline hands to an objective.

One class per kind of supervision. Objectives declare which kind they need (`Objective.batch_type`);
the data pipeline builds it. Every tensor field carries its shape in a comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class ImageTextBatch:
    """Image-caption pairs (CLIP, SigLIP)."""

    images: torch.Tensor  # [B, 3, H, W] float, normalised
    texts: torch.Tensor  # [B, L] int64 token ids
    labels: torch.Tensor  # [B] int64 class label, -1 where unknown
    keys: list[str]  # [B] sample keys
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped while building it, by kind
    position: dict = field(default_factory=dict)  # opaque, set by the loader: where this batch came from

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False):
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return type(self)(**moved)


@dataclass
class RegionBatch(ImageTextBatch):
    """Image-caption pairs plus up to M captioned boxes per image (FineCLIP).

    Boxes are in pixels of `images` (after resizing), as (x0, y0, x1, y1). Invalid slots are padding:
    `region_valid` is False there and the box/text values are meaningless.
    """

    boxes: torch.Tensor = None  # [B, M, 4] float
    region_texts: torch.Tensor = None  # [B, M, L] int64
    region_valid: torch.Tensor = None  # [B, M] bool


@dataclass
class DocumentBatch:
    """Interleaved image-text documents (LCL). Reserved seam; the LCL objective fills it in."""

    images: torch.Tensor  # [N_img, 3, H, W] all images of the batch's documents, in document order
    tokens: torch.Tensor  # [B, T] int64 text tokens with image placeholders
    image_positions: torch.Tensor  # [N_img, 2] int64 (document index, token position)
    keys: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    to = ImageTextBatch.to
