"""Drawing a scene, in its original look or one of the shifted variants, with exact boxes.

Every object is pasted from its cached mask into its window, so the tight box of the drawn pixels is
known without scanning the image. Objects never overlap (their windows are kept apart), so no object
hides part of another and each box is the box of pixels that are visible in the image. The "noise" and
"blur" variants change pixel values after drawing; their boxes are those of the shapes as drawn before
the noise or blur (the same as the original's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from clipforge.data.synth.attributes import COLOR_RGB, VARIANTS
from clipforge.data.synth.backgrounds import Background, paint_background, sample_shift_background
from clipforge.data.synth.scene import MIN_SIDE, Scene, split_id
from clipforge.data.synth.shapes import object_masks
from clipforge.data.synth.uniforms import Uniforms

# The darker shade that draws stripes and dots: half the colour, still clearly the same hue.
_COLOR_ARRAYS = {name: np.asarray(rgb, dtype=np.uint8) for name, rgb in COLOR_RGB.items()}
_SHADE_ARRAYS = {name: (np.asarray(rgb) // 2).astype(np.uint8) for name, rgb in COLOR_RGB.items()}
SHADE_RGB: dict[str, tuple[int, int, int]] = {name: tuple(int(v) for v in a) for name, a in _SHADE_ARRAYS.items()}

NOISE_STD = 18.0  # grey levels (of 255) of the "noise" variant's Gaussian pixel noise
BLUR_RADIUS_AT_64 = 1.0  # Gaussian blur radius of the "blur" variant for a 64 px image; scales with size
SHRINK = (0.6, 0.75)  # the "scale" variant shrinks all objects by a factor in this range ...
GROW = (1.25, 1.45)  # ... or grows them, as far as the layout allows (at least MIN_GROW)
MIN_GROW = 1.15


@dataclass(frozen=True)
class DrawnObject:
    """An object as it appears in one rendering: attributes (fill is "outline" in the outline variant)
    and its tight box (x0, y0, x1, y1) in pixels, end-exclusive."""

    shape: str
    color: str
    size: str
    fill: str
    box: tuple[int, int, int, int]
    in_caption: bool


@dataclass(frozen=True)
class Drawing:
    pixels: np.ndarray  # [H, W, 3] uint8 RGB
    objects: tuple[DrawnObject, ...]  # same order as scene.objects
    background: str  # background kind actually drawn
    masks: tuple[np.ndarray, ...] | None  # per object [H, W] bool of its drawn pixels, when asked for

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="RGB")


def variant_uniforms(scene: Scene, variant: str) -> Uniforms:
    """Randomness of a variant, separate from the scene's, so every variant shows the same objects."""
    return Uniforms([scene.seed, split_id(scene.split), scene.index, 1, VARIANTS.index(variant) + 1])


def _resized_layout(scene: Scene, factor: float) -> list[tuple[int, int, int]]:
    """Windows (x, y, side) with every side scaled by `factor` about the window's centre."""
    layout = []
    for obj in scene.objects:
        side = max(MIN_SIDE, round(obj.side * factor))
        centre_x, centre_y = obj.x + obj.side / 2.0, obj.y + obj.side / 2.0
        layout.append((math.floor(centre_x - side / 2.0 + 0.5), math.floor(centre_y - side / 2.0 + 0.5), side))
    return layout


def _layout_fits(layout: list[tuple[int, int, int]], image_size: int) -> bool:
    for i, (x, y, side) in enumerate(layout):
        if x < 0 or y < 0 or x + side > image_size or y + side > image_size:
            return False
        for other_x, other_y, other_side in layout[i + 1:]:
            if not (x + side < other_x or other_x + other_side < x or y + side < other_y or other_y + other_side < y):
                return False
    return True


def scaled_layout(scene: Scene, uniforms: Uniforms) -> list[tuple[int, int, int]]:
    """The "scale" variant's windows: grown when the layout has room (objects stay apart and inside the
    image), otherwise shrunk. Shrunk windows lie inside the original ones, so they always fit."""
    grow = uniforms.random() < 0.5
    shrink_factor = uniforms.uniform(*SHRINK)
    factor = uniforms.uniform(*GROW)
    while grow and factor >= MIN_GROW:
        layout = _resized_layout(scene, factor)
        if _layout_fits(layout, scene.image_size):
            return layout
        factor -= 0.05
    return _resized_layout(scene, shrink_factor)


def draw(scene: Scene, variant: str = "original", with_masks: bool = False) -> Drawing:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    size = scene.image_size
    uniforms = variant_uniforms(scene, variant) if variant in ("background", "noise", "scale") else None
    background: Background = sample_shift_background(uniforms) if variant == "background" else scene.background
    pixels = paint_background(background, size)  # [H, W, 3] uint8
    if variant == "scale":
        layout = scaled_layout(scene, uniforms)
    else:
        layout = [(obj.x, obj.y, obj.side) for obj in scene.objects]

    drawn_objects = []
    masks = [] if with_masks else None
    for obj, (x, y, side) in zip(scene.objects, layout):
        fill = "outline" if variant == "outline" else obj.fill
        drawn, shaded, (x0, y0, x1, y1) = object_masks(obj.shape, side, fill)  # [side, side, 1] bool
        window = pixels[y:y + side, x:x + side]  # a view: painting it paints the image
        np.copyto(window, _COLOR_ARRAYS[obj.color], where=drawn)
        if shaded is not None:
            np.copyto(window, _SHADE_ARRAYS[obj.color], where=shaded)
        drawn_objects.append(DrawnObject(obj.shape, obj.color, obj.size, fill, (x + x0, y + y0, x + x1, y + y1),
                                         obj.in_caption))
        if masks is not None:
            full = np.zeros((size, size), dtype=bool)
            full[y:y + side, x:x + side] = drawn[:, :, 0]
            masks.append(full)

    if variant == "noise":
        noise = np.random.default_rng(uniforms.seed()).standard_normal(pixels.shape, dtype=np.float32) * NOISE_STD
        pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    if variant == "blur":
        blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(BLUR_RADIUS_AT_64 * size / 64))
        pixels = np.asarray(blurred)
    return Drawing(pixels, tuple(drawn_objects), background.kind, None if masks is None else tuple(masks))
