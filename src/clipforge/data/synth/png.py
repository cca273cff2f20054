"""A minimal, deterministic PNG writer for RGB uint8 arrays.

Why not PIL's `Image.save(format="PNG")`: at 64 x 64 its fixed cost and per-row adaptive filter search
take 130-370 us per image, more than drawing the scene; writing the three chunks ourselves with filter
type 0 and zlib level 1 takes 30-130 us, keeping shard generation above 2,000 images/s on one core.
The output is a standard 8-bit RGB PNG (PIL, torchvision and browsers read it); the bytes depend only on
the pixels and the zlib build, never on time or metadata.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COMPRESS_LEVEL = 1


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_png_array(pixels: np.ndarray) -> bytes:
    """PNG bytes of an [H, W, 3] uint8 image."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    scanlines = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # leading 0 per row: filter "None"
    scanlines[:, 1:] = pixels.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), _COMPRESS_LEVEL)) + _chunk(b"IEND", b""))
