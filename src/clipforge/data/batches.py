"""Batch types: what the data pipeline hands to an objective. Each one decodes and collates itself.

One class per kind of supervision. An objective declares the kind it needs (`Objective.batch_type`); the
pipeline asks that class to decode each raw record (`decode(record, counter, max_pixels)`, which validates
and counts what it skips) and to collate a list of decoded samples (`collate(samples, builder)`, where the
builder carries the model's preprocess and tokenizer and the per-sample seeding). The pipeline never asks
which class it holds. Every batch carries `skipped` (bad samples met while building it, by kind) and
`position` (opaque, set by the loader), and `to(device)` keeps both. Tensor fields carry their shapes.

A new kind of supervision is a new class here with these two classmethods; nothing in the pipeline or the
loop changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

import torch

from clipforge.data.samples import DEFAULT_MAX_PIXELS, Sample, SkipCounter, decode_sample, read_json_member

IGNORE_INDEX = -100  # target id that a cross-entropy loss skips (torch's default ignore_index)


class _Moves:
    """`to(device)` for a dataclass of tensors and plain values (metadata such as `skipped` travels along)."""

    def to(self, device: torch.device | str, non_blocking: bool = False):
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return type(self)(**moved)


class _ImageBatch(_Moves):
    """Decoding for one-image samples; the model's preprocess as the per-image transform."""

    @classmethod
    def decode(cls, record: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | None:
        return decode_sample(record, counter, max_pixels, with_regions=False)

    @classmethod
    def image_transform(cls, preprocess, image_size: int | None = None):
        """The per-image transform this batch type applies (the model's preprocess, unless it must differ)."""
        return preprocess


@dataclass
class LabelledImageBatch(_ImageBatch):
    """Images with class labels, no text (image classifiers, image-only families)."""

    images: torch.Tensor  # [B, 3, H, W] float, normalised
    labels: torch.Tensor  # [B] int64 class label, -1 where unknown
    keys: list[str]  # [B] sample keys
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped while building it, by kind
    position: dict = field(default_factory=dict)  # opaque, set by the loader: where this batch came from

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def collate(cls, samples: list[Sample], builder) -> LabelledImageBatch:
        return cls(images=builder.images(samples), labels=_labels(samples), keys=[s.key for s in samples])


@dataclass
class ImageTextBatch(_ImageBatch):
    """Image-caption pairs (CLIP, SigLIP)."""

    images: torch.Tensor  # [B, 3, H, W] float, normalised
    texts: torch.Tensor  # [B, L] int64 token ids
    labels: torch.Tensor  # [B] int64 class label, -1 where unknown
    keys: list[str]  # [B] sample keys
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped while building it, by kind
    position: dict = field(default_factory=dict)  # opaque, set by the loader: where this batch came from

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def collate(cls, samples: list[Sample], builder) -> ImageTextBatch:
        return cls(images=builder.images(samples), texts=builder.tokenize([s.caption for s in samples]),
                   labels=_labels(samples), keys=[s.key for s in samples])


def _has_caption(record: dict) -> bool | None:
    """True / False when the record visibly has / lacks a caption; None when only decoding can tell (bad bytes)."""
    if "txt" in record:
        raw = record["txt"]
        try:
            return bool((raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)).strip())
        except UnicodeDecodeError:
            return None
    if "json" in record:
        try:
            meta = read_json_member(record)
        except ValueError:
            return None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return isinstance(caption, str) and bool(caption.strip())
    return False


class CaptionOptionalBatch(ImageTextBatch):
    """ImageTextBatch that keeps images whose caption is missing or empty (caption ""), instead of skipping
    them: they still train a tokenizer's reconstruction (LG-VQ's objective)."""

    @classmethod
    def decode(cls, record: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS):
        if _has_caption(record) is not False:  # captioned, or broken in a way decode_sample counts
            return decode_sample(record, counter, max_pixels, with_regions=False)
        sample = decode_sample({**record, "txt": b"-"}, counter, max_pixels, with_regions=False)
        if sample is not None:
            sample.caption = ""
        return sample


@dataclass
class RegionBatch(ImageTextBatch):
    """Image-caption pairs plus up to M captioned boxes per image (FineCLIP).

    Boxes are in pixels of `images` (after resizing), as (x0, y0, x1, y1). Invalid slots are padding:
    `region_valid` is False there and the box/text values are meaningless. Images are squash-resized to the
    model input (S x S) so that a box maps exactly by scaling (see data/transforms.py).
    """

    boxes: torch.Tensor = None  # [B, M, 4] float
    region_texts: torch.Tensor = None  # [B, M, L] int64
    region_valid: torch.Tensor = None  # [B, M] bool

    @classmethod
    def decode(cls, record: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | None:
        return decode_sample(record, counter, max_pixels, with_regions=True)

    @classmethod
    def image_transform(cls, preprocess, image_size: int | None = None):
        from clipforge.data.transforms import RegionImageTransform

        return RegionImageTransform(preprocess, image_size)

    @classmethod
    def collate(cls, samples: list[Sample], builder) -> RegionBatch:
        from clipforge.data.transforms import sample_seed, scale_box

        images = builder.images(samples)  # [B, 3, S, S]
        texts = builder.tokenize([s.caption for s in samples])  # [B, L]
        size = builder.image_transform.size
        batch, slots, length = len(samples), builder.max_regions, texts.shape[1]
        boxes = torch.zeros(batch, slots, 4)  # [B, M, 4] model-input pixels
        region_valid = torch.zeros(batch, slots, dtype=torch.bool)  # [B, M]
        region_texts = torch.zeros(batch, slots, length, dtype=texts.dtype)  # [B, M, L]
        captions, where = [], []
        for i, sample in enumerate(samples):
            chosen = list(range(len(sample.regions)))
            if len(chosen) > slots:  # a fixed subset per (seed, epoch, key): independent of workers and ranks
                picker = random.Random(sample_seed(builder.seed, builder.epoch, sample.key, "regions"))
                chosen = sorted(picker.sample(chosen, slots))
            width, height = sample.image.size
            for slot, r in enumerate(chosen):
                region = sample.regions[r]
                boxes[i, slot] = torch.tensor(scale_box(region.box, width, height, size))
                region_valid[i, slot] = True
                captions.append(region.caption)
                where.append((i, slot))
        if captions:
            tokens = builder.tokenize(captions)  # [R, L]
            rows, cols = zip(*where)
            region_texts[list(rows), list(cols)] = tokens.to(region_texts.dtype)
        return cls(images=images, texts=texts, labels=_labels(samples), keys=[s.key for s in samples],
                   boxes=boxes, region_texts=region_texts, region_valid=region_valid)


@dataclass
class DocumentBatch(_Moves):
    """Interleaved image-text documents (LCL): B documents padded to T tokens, with their N images.

    `tokens` holds text ids with one placeholder id per image slot; `image_spans[n] = (document, start, stop)`
    says which tokens image n occupies (the model writes image n's embeddings there). `targets` are the
    next-token targets, `IGNORE_INDEX` at padding and image slots, so the pad id never has to be a real
    token that a loss would learn. The documents' tokenizer and special tokens belong to the LCL family;
    decoding reads the OBELICS-style records of DESIGN.md "Data formats"; collation is the family's
    (it alone knows its special tokens) and comes with it.
    """

    images: torch.Tensor  # [N, 3, H, W] all images of the batch's documents, in document order
    tokens: torch.Tensor  # [B, T] int64 token ids, image placeholders included; padding is any id
    attention_mask: torch.Tensor  # [B, T] bool, False at padding
    targets: torch.Tensor  # [B, T] int64 next-token targets, IGNORE_INDEX where no loss applies
    image_spans: torch.Tensor  # [N, 3] int64 (document index, first token, one past the last token)
    keys: list[str]  # [B] document keys
    skipped: dict[str, int] = field(default_factory=dict)
    position: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def decode(cls, record: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS):
        from clipforge.data.documents import read_document  # documents.py builds on this module

        return read_document(record, counter, max_pixels)

    @classmethod
    def image_transform(cls, preprocess, image_size: int | None = None):
        return preprocess

    @classmethod
    def collate(cls, documents, builder) -> DocumentBatch:
        collate = getattr(builder.tokenizer, "collate_documents", None)
        if collate is None:
            raise TypeError("DocumentBatch needs a document tokenizer (one with collate_documents), such as the "
                            "LCL family's")
        return collate(documents, builder)


def _labels(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.label if s.label is not None else -1 for s in samples], dtype=torch.long)  # [B]
