"""Binary masks of the shapes and fill patterns, rasterised once per (shape, side) and cached.

A shape is drawn in a square window of `side` pixels. Pixel (row v, column u) is inside when its centre,
mapped to [-1, 1]^2, passes the shape's test. Masks are binary (no anti-aliasing) so the tight box of
an object is exactly the box of its mask. Rendering a scene only pastes cached masks, which is what
makes generation fast.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from clipforge.data.synth.attributes import SHAPES


def _unit_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x grows to the right, y grows downwards. Each [side, side]."""
    centres = (np.arange(side, dtype=np.float64) + 0.5) / side * 2.0 - 1.0
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over points. vertices: [V, 2] (x, y)."""
    inside = np.zeros(x.shape, dtype=bool)
    x_prev, y_prev = vertices[-1]
    for x_cur, y_cur in vertices:
        crosses = (y_cur > y) != (y_prev > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = (x_prev - x_cur) * (y - y_cur) / (y_prev - y_cur) + x_cur
        inside ^= crosses & (x < x_cross)
        x_prev, y_prev = x_cur, y_cur
    return inside


def _star_vertices(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points  # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.08], axis=1)


def _shape_test(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.88
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= 0.82) & (ax <= (y + 0.95) / 1.77)
    if shape == "diamond":
        return ax / 0.86 + ay <= 1.0
    if shape == "star":
        return _inside_polygon(x, y, _star_vertices())
    if shape == "cross":
        return (np.minimum(ax, ay) <= 0.3) & (np.maximum(ax, ay) <= 0.95)
    if shape == "hexagon":  # flat top and bottom, circumradius 1
        return (ay <= 0.866) & (np.sqrt(3.0) * ax + ay <= np.sqrt(3.0))
    if shape == "heart":  # the classic implicit heart curve, flipped so it points down
        hx, hy = x * 1.16, 0.1 - y * 1.14
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbourhood erosion; pixels outside the window count as background."""
    padded = np.pad(mask, 1, constant_values=False)
    return (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )


@lru_cache(maxsize=1024)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Filled mask of a shape in a side x side window. [side, side] bool, read-only."""
    x, y = _unit_grid(side)
    mask = _shape_test(shape, x, y)
    mask.setflags(write=False)
    return mask


def outline_width(side: int) -> int:
    return max(1, round(side / 12))


@lru_cache(maxsize=1024)
def outline_mask(shape: str, side: int) -> np.ndarray:
    """The shape's border, outline_width(side) pixels thick. Same tight box as the filled shape: a pixel
    on the box's edge has a neighbour outside the shape, so erosion never removes it."""
    filled = shape_mask(shape, side)
    interior = filled
    for _ in range(outline_width(side)):
        interior = _erode(interior)
    mask = filled & ~interior
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=256)
def fill_pattern(fill: str, side: int) -> np.ndarray | None:
    """Pixels drawn in the darker shade for a fill pattern, or None for a solid fill. [side, side] bool."""
    if fill in ("solid", "outline"):
        return None
    v, u = np.mgrid[0:side, 0:side]
    if fill == "striped":  # diagonal stripes, a third of the area, so the object's colour still dominates
        period = max(3, round(side / 4))
        pattern = (u + v) % period < max(1, period // 3)
    elif fill == "dotted":  # a grid of round dots, about four per row
        spacing = max(3, round(side / 4))
        centre = (spacing - 1) / 2.0
        radius = 0.3 * spacing
        pattern = ((u % spacing) - centre) ** 2 + ((v % spacing) - centre) ** 2 <= radius * radius
    else:
        raise ValueError(f"unknown fill {fill!r}")
    pattern.setflags(write=False)
    return pattern


@lru_cache(maxsize=2048)
def object_masks(shape: str, side: int, fill: str) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int]]:
    """What to paint for one object: (drawn mask [side, side, 1], shaded mask [side, side, 1] or None,
    tight box of the drawn mask in window coordinates (x0, y0, x1, y1), end-exclusive).

    The trailing axis lets np.copyto broadcast the masks over RGB without a copy per call.
    """
    drawn = outline_mask(shape, side) if fill == "outline" else shape_mask(shape, side)
    pattern = fill_pattern(fill, side)
    shaded = None if pattern is None else (drawn & pattern)[:, :, None]
    rows = np.flatnonzero(drawn.any(axis=1))
    cols = np.flatnonzero(drawn.any(axis=0))
    if rows.size == 0:
        raise ValueError(f"{shape} of side {side} px rasterises to no pixel")
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return drawn[:, :, None], shaded, box
