"""Background painting. Every kind uses the neutral palette, so objects stay distinct from it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from clipforge.data.synth.attributes import BACKGROUND_RGB, BACKGROUNDS, SCENE_BACKGROUNDS, SHIFT_BACKGROUNDS
from clipforge.data.synth.uniforms import Uniforms

NOISE_AMPLITUDE = 14  # +- grey levels of the "noise" background: a low-contrast texture, not a shift
GRADIENT_DIRECTIONS = 4  # left-right, top-bottom, and the two diagonals


@dataclass(frozen=True)
class Background:
    """Everything needed to repaint a background exactly: kind, two palette colours, a direction for
    gradients and a seed for the noise and texture kinds."""

    kind: str
    color_a: tuple[int, int, int]
    color_b: tuple[int, int, int]
    direction: int
    texture_seed: int


def sample_background(uniforms: Uniforms, kinds: tuple[str, ...] = SCENE_BACKGROUNDS) -> Background:
    kind = kinds[uniforms.below(len(kinds))]
    first = uniforms.below(len(BACKGROUND_RGB))
    # The second colour is 3 to 7 palette steps away (cyclically) so gradients and checkers are visible.
    offset = 3 + uniforms.below(len(BACKGROUND_RGB) - 5)
    second = (first + offset) % len(BACKGROUND_RGB)
    return Background(
        kind=kind,
        color_a=BACKGROUND_RGB[first],
        color_b=BACKGROUND_RGB[second],
        direction=uniforms.below(GRADIENT_DIRECTIONS),
        texture_seed=uniforms.seed(),
    )


def sample_shift_background(uniforms: Uniforms) -> Background:
    """A background of a kind that ordinary scenes never use (the "background" variant)."""
    return sample_background(uniforms, SHIFT_BACKGROUNDS)


@lru_cache(maxsize=64)
def _ramp(size: int, direction: int) -> np.ndarray:
    """Gradient weight 0..1 over the image. [size, size, 1] float32."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if direction == 0:
        ramp = np.broadcast_to(t[None, :], (size, size))
    elif direction == 1:
        ramp = np.broadcast_to(t[:, None], (size, size))
    elif direction == 2:
        ramp = (t[None, :] + t[:, None]) / 2
    else:
        ramp = (t[None, ::-1] + t[:, None]) / 2
    ramp = np.ascontiguousarray(ramp)[:, :, None]
    ramp.setflags(write=False)
    return ramp


@lru_cache(maxsize=64)
def _checker(size: int) -> np.ndarray:
    """True on every other cell of an 8 x 8 board. [size, size, 1] bool."""
    cells = (np.arange(size) * 8) // size
    board = ((cells[:, None] + cells[None, :]) % 2 == 1)[:, :, None]
    board.setflags(write=False)
    return board


@lru_cache(maxsize=16)
def _grain_tile(size: int) -> np.ndarray:
    """Grey grain in [-NOISE_AMPLITUDE, NOISE_AMPLITUDE], twice the image side. [2 size, 2 size, 1] int16.
    The palette stays NOISE_AMPLITUDE away from 0 and 255, so adding it never wraps around."""
    rng = np.random.default_rng(12345)
    grain = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(2 * size, 2 * size, 1), dtype=np.int16)
    grain.setflags(write=False)
    return grain


def paint_background(background: Background, size: int) -> np.ndarray:
    """A fresh, writable [size, size, 3] uint8 image of the background."""
    color_a = np.asarray(background.color_a, dtype=np.float32)
    color_b = np.asarray(background.color_b, dtype=np.float32)
    kind = background.kind
    if kind == "plain":
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[...] = background.color_a
        return pixels
    if kind == "gradient":
        blend = color_a + _ramp(size, background.direction) * (color_b - color_a)
        return blend.astype(np.uint8)
    if kind == "noise":  # a crop of a fixed grain tile at an offset set by the seed: cheap, and as random
        grain = _grain_tile(size)
        top, left = background.texture_seed % size, (background.texture_seed // size) % size
        crop = grain[top:top + size, left:left + size]  # [size, size, 1] int16
        return (crop + np.asarray(background.color_a, dtype=np.int16)).astype(np.uint8)
    if kind == "checker":
        return np.where(_checker(size), background.color_b, background.color_a).astype(np.uint8)
    if kind == "texture":  # smooth blobs: 6 x 6 random weights, bilinearly upsampled, blend a -> b
        rng = np.random.default_rng(background.texture_seed)
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
        weights = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        blend = color_a + (weights[:, :, None] / 255.0) * (color_b - color_a)
        return blend.astype(np.uint8)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
