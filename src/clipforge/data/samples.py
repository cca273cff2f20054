"""Decode and validate one raw record into a `Sample`; every problem is counted by kind, never fatal.

A raw record is what a reader yields: {"__key__", "__url__", and members such as "png", "txt",
"json", "cls"} for shards, or {"__key__", "__url__", "__path__", "txt" | "cls"...} for CSV and
ImageFolder rows (the image file is read here, so a replayed stream costs no I/O).

Kinds of bad input and what happens (`SkipCounter` counts each by kind):

| kind | effect |
| --- | --- |
| missing_image, zero_byte_image, corrupt_image, truncated_image, image_too_large, unsupported_mode | sample skipped |
| image_too_elongated (one side more than MAX_ASPECT_RATIO times the other) | sample skipped |
| missing_file, not_a_regular_file (FIFO, device, socket, folder), file_too_large (> DEFAULT_MAX_FILE_BYTES) | sample skipped |
| missing_caption, empty_caption, caption_not_utf8, malformed_json, bad_label | sample skipped |
| box_malformed, box_nan, box_negative (x1 < x0 or y1 < y0), box_zero_area, box_outside | that region dropped, sample kept |
| region_no_caption | that region dropped, sample kept |
| box_clipped | box partly outside the image: clipped to it, kept |
| converted_<mode> (L, LA, P, RGBA, CMYK, I16, ...) | image converted to RGB, kept |

Non-RGB images are converted, not skipped, because that is what users of open_clip expect (its
preprocess converts to RGB); they are still counted so a dataset of unexpected modes is visible.
Alpha is composited on white; 16-bit images are scaled to 8 bits (value / 257).
With `strict=True` every kind that drops data (a sample or a region) raises DataError instead;
conversions and clipped boxes are repairs and are only counted.

Decompression bombs: the header size is checked by `image_size_problem` (pixel count against
`max_pixels`, and the aspect ratio) before any pixel is decoded, and Pillow's own
DecompressionBombWarning/Error are turned into `image_too_large` too. The aspect ratio is bounded because
the pixel count alone is not enough: a 375-byte 100000x1 PNG passes any pixel limit, and open_clip's
preprocess (resize the shorter side to the model input) would blow it up to gigabytes.
Evaluation uses the same guard (clipforge.eval).

Image files named by a CSV row or found in an ImageFolder are read by `read_image_file`: a FIFO, a device
(/dev/zero), a socket or a folder is refused before a byte is read (a FIFO would block training forever,
/dev/zero would fill the memory), and a file larger than DEFAULT_MAX_FILE_BYTES is refused from its size.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipforge.errors import DataError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels
MAX_ASPECT_RATIO = 50  # longer side / shorter side; panoramas are ~4:1, a 100000x1 strip is an attack
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024  # an image file larger than this is refused from its size, unread
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
REPAIR_KINDS_PREFIX = ("converted_", "box_clipped")  # counted, never fatal


class SkipCounter(dict):
    """dict kind -> count of bad input met. `skip()` raises DataError instead when strict."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict

    def skip(self, kind: str, where: str = "") -> None:
        """Count something dropped (a sample, a region, a shard's rest)."""
        if self.strict:
            detail = f": {where}" if where else ""
            raise DataError(f"bad input '{kind}'{detail} (data.strict is on; turn it off to skip and count)")
        self[kind] = self.get(kind, 0) + 1

    def note(self, kind: str) -> None:
        """Count a repair (a converted image, a clipped box); never fatal."""
        self[kind] = self.get(kind, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts so far, as a plain dict; the counter starts again from zero."""
        counts = dict(self)
        self.clear()
        return counts


def add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + n
    return total


@dataclass
class Region:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the stored image
    caption: str


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB
    caption: str
    regions: list[Region] = field(default_factory=list)
    label: int | None = None
    classname: str | None = None
    captions: list[str] = field(default_factory=list)  # other phrasings, if the data has them
    meta: dict = field(default_factory=dict)  # the record's JSON, as read


# ----------------------------------------------------------------------------------------------------------
# Images


_FORMAT_BY_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WEBP"))


def image_size_problem(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """The guard every decode passes (training and evaluation), from the header size alone:
    'corrupt_image' (an empty side), 'image_too_large' (more than `max_pixels`), 'image_too_elongated'
    (one side more than MAX_ASPECT_RATIO times the other), or None when the image may be decoded."""
    if width <= 0 or height <= 0:
        return "corrupt_image"
    if width * height > max_pixels:
        return "image_too_large"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return "image_too_elongated"
    return None


def image_file_problem(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """Why the file at `path` is not to be read as an image, from its status alone (symlinks followed):
    'missing_file', 'not_a_regular_file' (FIFO, device, socket, folder) or 'file_too_large'; else None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return "missing_file"
    if not stat.S_ISREG(info.st_mode):
        return "not_a_regular_file"
    if info.st_size > max_bytes:
        return "file_too_large"
    return None


def read_image_file(path: str | os.PathLike,
                    max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) or (None, the kind from `image_file_problem`).

    The file is opened non-blocking and checked again on the open descriptor, so a FIFO swapped in after the
    first check cannot block; at most `max_bytes` are read, whatever the file claims."""
    problem = image_file_problem(path, max_bytes)
    if problem is not None:
        return None, problem
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return None, "missing_file"
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not_a_regular_file"
        try:
            data = handle.read(max_bytes + 1)
        except OSError:
            return None, "missing_file"
    if len(data) > max_bytes:  # it grew since it was checked
        return None, "file_too_large"
    return data, None


def image_header_problem(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """`image_size_problem` for an image not decoded yet (a path, a file object or bytes), from its header
    only; 'corrupt_image' when no header can be read. Evaluation screens its images with this."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # reads the header only
                return image_size_problem(*image.size, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image_too_large"
    except Exception:  # Pillow plugins raise many types for hostile files
        return "corrupt_image"


def _open_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """(image decoded and loaded, None) or (None, kind of failure)."""
    if len(data) == 0:
        return None, "zero_byte_image"
    # the format from the magic bytes spares Pillow from probing every plugin (~0.1 ms an image)
    formats = next(([name] for magic, name in _FORMAT_BY_MAGIC if data.startswith(magic)), None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
            problem = image_size_problem(*image.size, max_pixels)
            if problem is not None:
                return None, problem
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large"
    except UnidentifiedImageError:
        return None, "corrupt_image"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err).lower()
        truncated = "truncated" in text or "unexpected end" in text or isinstance(err, EOFError)
        return None, "truncated_image" if truncated else "corrupt_image"
    except Exception:  # Pillow plugins raise a zoo of types for hostile files
        return None, "corrupt_image"
    return image, None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image | None, str | None]:
    """(RGB image, repair kind or None). Unsupported modes return (None, 'unsupported_mode')."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    kind = "converted_" + mode.replace(";", "")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            return _composite_on_white(image.convert("RGBA")), kind
        if mode == "P":
            has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
            return (_composite_on_white(image.convert("RGBA")) if has_alpha else image.convert("RGB")), kind
        if mode.startswith("I;16") or mode == "I":
            # 16-bit (or 32-bit int holding 16-bit) grey: scale 0..65535 to 0..255
            values = np.asarray(image, dtype=np.float64)
            grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB"), kind
        if mode == "F":  # float grey: values in [0, 1] are scaled, larger ones taken as 8-bit
            values = np.asarray(image, dtype=np.float64)
            scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
            grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB"), kind
        return image.convert("RGB"), kind  # L, 1, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError):
        return None, "unsupported_mode"


# ----------------------------------------------------------------------------------------------------------
# Text, JSON, regions


def _check_box(raw_box, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """(box clipped to the image, None | 'box_clipped') or (None, kind why the box is unusable)."""
    if not isinstance(raw_box, list | tuple) or len(raw_box) != 4:
        return None, "box_malformed"
    try:
        x0, y0, x1, y1 = (float(v) for v in raw_box)
    except (TypeError, ValueError):
        return None, "box_malformed"
    if any(isinstance(v, bool) for v in raw_box):
        return None, "box_malformed"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "box_nan"
    if x1 < x0 or y1 < y0:
        return None, "box_negative"
    if x1 == x0 or y1 == y0:
        return None, "box_zero_area"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "box_outside"
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return clipped, ("box_clipped" if clipped != (x0, y0, x1, y1) else None)


def _read_regions(raw_regions, width: int, height: int, counter: SkipCounter, where: str) -> list[Region]:
    if raw_regions is None:
        return []
    if not isinstance(raw_regions, list):
        counter.skip("box_malformed", f"{where}: 'regions' is not a list")
        return []
    regions = []
    for i, entry in enumerate(raw_regions):
        if not isinstance(entry, dict):
            counter.skip("box_malformed", f"{where}: region {i}")
            continue
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            counter.skip("region_no_caption", f"{where}: region {i}")
            continue
        box, kind = _check_box(entry.get("box"), width, height)
        if box is None:
            counter.skip(kind, f"{where}: region {i} box {entry.get('box')!r}")
            continue
        if kind:
            counter.note(kind)
        regions.append(Region(box, caption.strip()))
    return regions


def _image_member(raw: dict) -> tuple[str | None, bytes | None]:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return ext, raw[ext]
    return None, None


def read_json_member(raw: dict):
    """The parsed `json` member of a raw record (None when it has none); ValueError when it does not parse."""
    if "json" not in raw:
        return None
    data = raw["json"]
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, ValueError, TypeError):
        raise ValueError("malformed_json") from None


def decode_sample(
    raw: dict,
    counter: SkipCounter,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    with_regions: bool = True,
) -> Sample | None:
    """Validate and decode a raw record; None (after counting why) when it is unusable."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}: {key}"

    # metadata first: it is cheap, and a sample with broken JSON is skipped before decoding pixels
    try:
        meta = read_json_member(raw)
    except ValueError:
        counter.skip("malformed_json", where)
        return None
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        counter.skip("malformed_json", f"{where}: top level is not an object")
        return None

    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8") if isinstance(raw["txt"], bytes) else str(raw["txt"])
        except UnicodeDecodeError:
            counter.skip("caption_not_utf8", where)
            return None
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    else:
        counter.skip("missing_caption", where)
        return None
    caption = caption.strip()
    if not caption:
        counter.skip("empty_caption", where)
        return None

    label = meta.get("label")
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            counter.skip("bad_label", where)
            return None
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        counter.skip("bad_label", f"{where}: label {label!r}")
        return None
    classname = raw.get("classname") or meta.get("classname")

    if "__path__" in raw:
        data, problem = read_image_file(raw["__path__"])
        if data is None:
            counter.skip(problem, f"{where}: {raw['__path__']}")
            return None
    else:
        _, data = _image_member(raw)
        if data is None:
            counter.skip("missing_image", where)
            return None
    image, problem = _open_image(data, max_pixels)
    if image is None:
        counter.skip(problem, where)
        return None
    image, repair = to_rgb(image)
    if image is None:
        counter.skip(repair, where)
        return None
    if repair:
        counter.note(repair)

    regions = _read_regions(meta.get("regions"), *image.size, counter, where) if with_regions else []
    captions = [c for c in meta.get("captions", []) if isinstance(c, str) and c.strip()] \
        if isinstance(meta.get("captions"), list) else []
    return Sample(key=key, image=image, caption=caption, regions=regions, label=label,
                  classname=classname if isinstance(classname, str) else None, captions=captions, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# Interleaved documents


@dataclass
class Document:
    key: str
    items: list[dict]  # [{"text": str} | {"image": int}] in reading order
    images: list[Image.Image]  # RGB, indexed by the items' "image" numbers
    meta: dict = field(default_factory=dict)


def is_document(raw: dict) -> bool:
    """True for an interleaved document record (images stored as `key.0.png`, `key.1.png`, ...)."""
    return any(k.split(".", 1)[0].isdigit() and "." in k for k in raw if not k.startswith("__"))
