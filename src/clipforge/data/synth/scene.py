"""What a scene is, and how one is sampled from its seed: attributes first, then a layout.

Every random choice for scene `index` of `split` comes from np.random.default_rng([seed, split_id,
index]) (through a buffered Uniforms stream), never from global state, so scenes can be generated in any order, by any worker, and come
out the same. Attributes, caption template and background are drawn before the layout, so they do not
depend on the image size; only positions (and, rarely, an object that no longer fits) do.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from clipforge.data.synth.attributes import (
    BASE_CLASSES,
    CLASSNAMES,
    NOVEL_CLASSES,
    SCENE_FILLS,
    SPLITS,
    class_attributes,
    class_label,
    is_novel,
)
from clipforge.data.synth.backgrounds import Background, sample_background
from clipforge.data.synth.captions import NUM_TEMPLATES
from clipforge.data.synth.uniforms import Uniforms

MAX_OBJECTS = 4
MIN_SIDE = 4  # pixels; below this every shape is the same blob
# Object diameters as fractions of the image side. The main object of a multi-object scene is drawn
# from its own band above every other object's, so the image's label is its largest object.
SMALL_SIDE = (0.15, 0.20)
LARGE_SIDE = (0.28, 0.32)
MAIN_LARGE_SIDE = (0.40, 0.46)
SECONDARY_LARGE_PROBABILITY = 0.3
PLACEMENT_TRIES = 100


@dataclass(frozen=True)
class SceneObject:
    """One object. It is drawn in the square window [x, x + side) x [y, y + side) of the image."""

    shape: str
    color: str
    size: str  # "small" | "large"
    fill: str  # "solid" | "striped" | "dotted"
    x: int
    y: int
    side: int
    in_caption: bool  # named in the global caption (the main object always is)

    @property
    def label(self) -> int:
        return class_label(self.color, self.shape)

    @property
    def classname(self) -> str:
        return CLASSNAMES[self.label]


@dataclass(frozen=True)
class Scene:
    """A sampled scene: objects[0] is the main object, whose colour + shape is the image's class."""

    seed: int
    split: str
    index: int
    image_size: int
    objects: tuple[SceneObject, ...]
    background: Background
    caption_template: int  # which phrasing becomes the record's "caption"

    @property
    def label(self) -> int:
        return self.objects[0].label

    @property
    def classname(self) -> str:
        return CLASSNAMES[self.label]

    @property
    def is_novel(self) -> bool:
        return is_novel(self.label)


def split_id(split: str) -> int:
    return SPLITS.index(split)


@lru_cache(maxsize=32)
def _class_cdf(pool: tuple[int, ...], long_tail: float, seed: int) -> tuple[tuple[int, ...], list[float]]:
    """Classes in tail order and the cumulative Zipf probabilities p(rank) ~ rank^-long_tail.

    The tail order is a permutation seeded by `seed` alone, so train and val of one seed agree on which
    classes are rare.
    """
    order = tuple(int(c) for c in np.random.default_rng([seed, 7919]).permutation(np.asarray(pool)))
    weights = np.arange(1, len(order) + 1, dtype=np.float64) ** -long_tail
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return order, cdf.tolist()


def class_frequencies(split: str, long_tail: float, seed: int) -> dict[int, float]:
    """Expected share of each main-object class in a split: {label: probability}."""
    pool = _main_pool(split)
    if split == "novel" or long_tail == 0.0:
        return {label: 1.0 / len(pool) for label in pool}
    order, cdf = _class_cdf(pool, long_tail, seed)
    probabilities = np.diff(np.concatenate([[0.0], cdf]))
    return {label: float(p) for label, p in zip(order, probabilities)}


def _main_pool(split: str) -> tuple[int, ...]:
    if split == "novel":
        return tuple(NOVEL_CLASSES)
    if split == "all":
        return tuple(range(len(CLASSNAMES)))
    return tuple(BASE_CLASSES)


def _secondary_pool(split: str) -> tuple[int, ...]:
    # Outside "all", secondary objects are base classes: train captions never name a novel pairing, and
    # a novel image holds exactly one novel object, its label.
    return tuple(range(len(CLASSNAMES))) if split == "all" else tuple(BASE_CLASSES)


def _sample_main_class(uniforms: Uniforms, split: str, long_tail: float, seed: int) -> int:
    pool = _main_pool(split)
    if split == "novel" or long_tail == 0.0:
        return pool[uniforms.below(len(pool))]
    order, cdf = _class_cdf(pool, long_tail, seed)
    return order[min(bisect.bisect_right(cdf, uniforms.random()), len(order) - 1)]


def _side(uniforms: Uniforms, band: tuple[float, float], image_size: int) -> int:
    return max(MIN_SIDE, round(image_size * uniforms.uniform(*band)))


def _overlaps(x: int, y: int, side: int, placed: Iterable[tuple[int, int, int]], gap: int) -> bool:
    for other_x, other_y, other_side in placed:
        apart = (x + side + gap <= other_x or other_x + other_side + gap <= x
                 or y + side + gap <= other_y or other_y + other_side + gap <= y)
        if not apart:
            return True
    return False


def sample_scene(
    seed: int,
    split: str,
    index: int,
    image_size: int,
    omit_fraction: float,
    long_tail: float,
    stream: tuple[int, ...] = (),
) -> Scene:
    """Scene `index` of a split. `stream` (non-empty) draws an independent scene from the same index,
    e.g. the images of interleaved document `index`."""
    uniforms = Uniforms([seed, split_id(split), index, *stream])
    count = 1 + uniforms.below(MAX_OBJECTS)
    labels = [_sample_main_class(uniforms, split, long_tail, seed)]
    secondary_pool = _secondary_pool(split)
    while len(labels) < count:  # distinct colour + shape pairs, so every phrase names one object
        label = secondary_pool[uniforms.below(len(secondary_pool))]
        if label not in labels:
            labels.append(label)

    attributes = []  # (label, size, side, fill, in_caption)
    for position, label in enumerate(labels):
        if position == 0:
            large = count > 1 or uniforms.random() < 0.5
            side = _side(uniforms, MAIN_LARGE_SIDE if large else SMALL_SIDE, image_size)
        else:
            large = uniforms.random() < SECONDARY_LARGE_PROBABILITY
            side = _side(uniforms, LARGE_SIDE if large else SMALL_SIDE, image_size)
        fill = SCENE_FILLS[uniforms.below(len(SCENE_FILLS))]
        in_caption = position == 0 or uniforms.random() >= omit_fraction  # random() < 1, so 1.0 omits all
        attributes.append((label, "large" if large else "small", side, fill, in_caption))

    background = sample_background(uniforms)
    caption_template = uniforms.below(NUM_TEMPLATES)

    # Layout last: largest first (the main object always fits), windows apart by a gap so no object
    # covers another and each object's tight box is exactly its mask's box.
    gap = max(1, round(image_size / 64))
    placed: dict[int, tuple[int, int, int]] = {}
    for position in sorted(range(count), key=lambda p: -attributes[p][2]):
        side = attributes[position][2]
        for _ in range(PLACEMENT_TRIES):
            x, y = uniforms.below(image_size - side + 1), uniforms.below(image_size - side + 1)
            if not _overlaps(x, y, side, placed.values(), gap):
                placed[position] = (x, y, side)
                break
        # An object that never fits is left out of the scene (rare at 64 px, never the main object).

    objects = []
    for position, (label, size, side, fill, in_caption) in enumerate(attributes):
        if position not in placed:
            continue
        color, shape = class_attributes(label)
        x, y, _ = placed[position]
        objects.append(SceneObject(shape, color, size, fill, x, y, side, in_caption))
    return Scene(seed, split, index, image_size, tuple(objects), background, caption_template)
