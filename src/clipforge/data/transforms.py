"""From validated samples to batch tensors: preprocessing with per-sample seeds, tokenising, region geometry.

The engine passes in the model's `preprocess` (a torchvision Compose) and `tokenizer` (list[str] ->
LongTensor [N, L], or None); the batch type's `collate` applies them through a BatchBuilder.

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
from collections.abc import Callable, Sequence

import torch
from PIL import Image

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
    """What a batch type's `collate` uses: the image transform with per-sample seeding, and the tokenizer.

    The batch type decides what it builds (`batch_type.collate(samples, builder)`) and which image transform
    applies (`batch_type.image_transform(preprocess, image_size)`: the model's preprocess, or the squash
    resize of region batches).
    """

    def __init__(self, batch_type: type, preprocess: Callable, tokenizer: Callable | None, *, seed: int = 0,
                 epoch: int = 0, max_regions: int = 4, randomize: bool = True, image_size: int | None = None):
        self.batch_type = batch_type
        self.tokenizer = tokenizer
        self.seed, self.epoch = seed, epoch
        self.max_regions = max_regions
        self.randomize = randomize  # False: no per-sample seeding (evaluation; preprocess is deterministic)
        self.image_transform = batch_type.image_transform(preprocess, image_size)

    def image_tensor(self, sample) -> torch.Tensor:
        """One sample's image through the transform, under a seed of (seed, epoch, key) when randomising."""
        if not self.randomize:
            return self.image_transform(sample.image)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a (costly) CUDA reseed
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, sample.key, "image"))
            return self.image_transform(sample.image)

    def images(self, samples: list[Sample]) -> torch.Tensor:
        return torch.stack([self.image_tensor(s) for s in samples])  # [B, 3, H, W]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise TypeError(f"{self.batch_type.__name__} needs a tokenizer and the model has none")
        return self.tokenizer(texts)  # [N, L]

    def __call__(self, samples: list[Sample]):
        return self.batch_type.collate(samples, self)
