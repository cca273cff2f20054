"""The vocabulary of SynthScenes: attributes, their colours, and the class list with its base/novel split.

A class is a colour x shape combination ("red circle"), label = colour_index * len(SHAPES) + shape_index.
The novel split is fixed (not seeded) so every run, split and variant agrees on it: colour c is novel
with shapes c and c + 3 (mod 8), a Latin-square pattern that puts each colour and each shape in exactly
two novel and six base classes. A model therefore sees every colour and every shape during training,
only never these 16 pairings: zero-shot on them measures composition, not new words.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "heart")

# Saturated, well separated hues; backgrounds below are neutral or muted so an object never disappears.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 80, 225),
    "purple": (140, 60, 200),
    "pink": (245, 110, 200),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)

SIZES: tuple[str, ...] = ("small", "large")
# "outline" is only drawn by the outline variant; scenes sample from the first three.
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "outline")
SCENE_FILLS: tuple[str, ...] = FILLS[:3]

# Backgrounds: the first three appear in every split; "checker" and "texture" are held out for the
# "background" variant so it is a real distribution shift.
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "checker", "texture")
SCENE_BACKGROUNDS: tuple[str, ...] = BACKGROUNDS[:3]
SHIFT_BACKGROUNDS: tuple[str, ...] = BACKGROUNDS[3:]

# Neutral and muted tones (low saturation) from dark to light.
BACKGROUND_RGB: tuple[tuple[int, int, int], ...] = (
    (24, 24, 26),
    (58, 58, 62),
    (62, 68, 80),
    (74, 66, 58),
    (96, 96, 96),
    (128, 128, 122),
    (150, 146, 132),
    (170, 170, 172),
    (206, 206, 200),
    (236, 233, 226),
)

VARIANTS: tuple[str, ...] = ("original", "background", "outline", "noise", "blur", "scale")

SPLITS: tuple[str, ...] = ("train", "val", "novel", "all")

CLASSNAMES: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]

# Colour c is novel with shapes (c + offset) mod 8 for these offsets.
_NOVEL_SHAPE_OFFSETS = (0, 3)
NOVEL_CLASSES: list[int] = sorted(
    c * len(SHAPES) + (c + offset) % len(SHAPES) for c in range(len(COLORS)) for offset in _NOVEL_SHAPE_OFFSETS
)
_NOVEL_SET = frozenset(NOVEL_CLASSES)
BASE_CLASSES: list[int] = [label for label in range(len(CLASSNAMES)) if label not in _NOVEL_SET]


def class_label(color: str, shape: str) -> int:
    """The label of a colour + shape combination."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_attributes(label: int) -> tuple[str, str]:
    """(colour, shape) of a label."""
    return COLORS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def is_novel(label: int) -> bool:
    return label in _NOVEL_SET
