"""From validated samples to batch tensors: open_clip preprocessing, tokenising and region handling.

The engine passes in open_clip's `preprocess` (a torchvision Compose) and `tokenizer` (list[str] ->
LongTensor [N, L]); this module applies them.

Randomness is per sample: when a batch is built for training, every sample's preprocess runs under a
torch seed derived from (seed, epoch, sample key), inside `torch.random.fork_rng`, so random
augmentation does not depend on which worker or process built the sample, and the caller's global
RNG stream is left untouched (it matters for bit-identical resume).

Region data (RegionBatch): images are squash-resized to the model input (S x S) instead of
open_clip's resize-shorter-side + centre-crop, so a box maps exactly by scaling x by S/W and y by S/H
and no region is cropped away. Geometric transforms of the preprocess (resize, crop, flip, random
resized crop) are therefore dropped for region data; colour transforms, ToTensor and Normalize are kept.
Up to `max_regions` regions per image are sampled per step with an RNG seeded by (seed, epoch, key).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from clipforge.data.batches import ImageTextBatch, RegionBatch
from clipforge.data.samples import Sample

_GEOMETRIC = ("Resize", "Crop", "Flip", "Affine", "Rotation", "Perspective", "Pad")


def sample_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _transforms_of(preprocess) -> list | None:
    return list(preprocess.transforms) if hasattr(preprocess, "transforms") else None


def input_size(preprocess) -> int | None:
    """The square output size of an open_clip/torchvision preprocess, if it can be read from it."""
    for transform in reversed(_transforms_of(preprocess) or []):
        size = getattr(transform, "size", None)
        if size is None:
            continue
        if isinstance(size, int):
            return size
        if isinstance(size, Sequence) and len(size) in (1, 2):
            return int(size[0])
    return None


class RegionImageTransform:
    """Squash-resize to S x S, then the non-geometric part of `preprocess` (ToTensor, Normalize, ...)."""

    def __init__(self, preprocess, size: int | None = None):
        transforms = _transforms_of(preprocess)
        if transforms is None:
            raise TypeError("region batches need a torchvision Compose preprocess (open_clip's image_transform)")
        self.size = size or input_size(preprocess)
        if self.size is None:
            raise TypeError("could not read the model input size from the preprocess; pass image_size")
        self.rest = [t for t in transforms if not any(g in type(t).__name__ for g in _GEOMETRIC)]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        for transform in self.rest:
            image = transform(image)
        return image


def scale_box(box, width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """A box in stored-image pixels -> pixels of the squash-resized size x size model input."""
    sx, sy = size / width, size / height
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


class BatchBuilder:
    """Turns a list of Samples into an ImageTextBatch or a RegionBatch."""

    def __init__(self, batch_type: type, preprocess: Callable, tokenizer: Callable, *, seed: int = 0,
                 epoch: int = 0, max_regions: int = 4, randomize: bool = True, image_size: int | None = None):
        self.batch_type = batch_type
        self.tokenizer = tokenizer
        self.seed, self.epoch = seed, epoch
        self.max_regions = max_regions
        self.randomize = randomize  # False: no per-sample seeding (evaluation; preprocess is deterministic)
        self.regions = issubclass(batch_type, RegionBatch)
        self.image_transform = RegionImageTransform(preprocess, image_size) if self.regions else preprocess

    def _image_tensor(self, sample: Sample) -> torch.Tensor:
        if not self.randomize:
            return self.image_transform(sample.image)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a (costly) CUDA reseed
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, sample.key, "image"))
            return self.image_transform(sample.image)

    def __call__(self, samples: list[Sample]) -> ImageTextBatch:
        images = torch.stack([self._image_tensor(s) for s in samples])  # [B, 3, H, W]
        texts = self.tokenizer([s.caption for s in samples])  # [B, L]
        labels = torch.tensor([s.label if s.label is not None else -1 for s in samples], dtype=torch.long)  # [B]
        keys = [s.key for s in samples]
        if not self.regions:
            return self.batch_type(images=images, texts=texts, labels=labels, keys=keys)
        return self._region_batch(samples, images, texts, labels, keys)

    def _region_batch(self, samples, images, texts, labels, keys) -> RegionBatch:
        size = self.image_transform.size
        batch, slots, length = len(samples), self.max_regions, texts.shape[1]
        boxes = torch.zeros(batch, slots, 4)  # [B, M, 4] model-input pixels
        region_valid = torch.zeros(batch, slots, dtype=torch.bool)  # [B, M]
        region_texts = torch.zeros(batch, slots, length, dtype=texts.dtype)  # [B, M, L]
        captions, where = [], []
        for i, sample in enumerate(samples):
            chosen = list(range(len(sample.regions)))
            if len(chosen) > slots:
                picker = random.Random(sample_seed(self.seed, self.epoch, sample.key, "regions"))
                chosen = sorted(picker.sample(chosen, slots))
            width, height = sample.image.size
            for slot, r in enumerate(chosen):
                region = sample.regions[r]
                boxes[i, slot] = torch.tensor(scale_box(region.box, width, height, size))
                region_valid[i, slot] = True
                captions.append(region.caption)
                where.append((i, slot))
        if captions:
            tokens = self.tokenizer(captions)  # [R, L]
            rows, cols = zip(*where)
            region_texts[list(rows), list(cols)] = tokens.to(region_texts.dtype)
        return RegionBatch(images=images, texts=texts, labels=labels, keys=keys, boxes=boxes,
                           region_texts=region_texts, region_valid=region_valid)
