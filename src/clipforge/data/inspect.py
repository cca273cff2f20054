"""Look inside a dataset: counts, bad-input counts, class histogram, caption examples and a contact sheet.

The library part: `inspect_data(spec)` returns an `InspectReport`; `contact_sheet(...)` writes a PNG of
samples (upscaled so the 64 px images and their labels are legible) with every region box drawn and
numbered, and its caption written under the image. The CLI (`clipforge data inspect`) prints the report.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clipforge.data.documents import read_document
from clipforge.data.samples import (
    DEFAULT_MAX_PIXELS,
    Document,
    Sample,
    SkipCounter,
    decode_sample,
    is_document,
)
from clipforge.data.sources import open_source

BOX_COLORS = ((255, 60, 60), (40, 200, 255), (255, 210, 0), (60, 230, 90), (255, 120, 255), (255, 150, 40))


@dataclass
class InspectReport:
    spec: str
    kind: str  # wds | csv | imagefolder
    num_listed: int  # samples the manifest / table says there are
    num_read: int  # raw records read
    num_valid: int  # records that decode and validate
    skipped: dict[str, int]  # bad input by kind (and repairs such as converted_L)
    classes: dict[str, int]  # classname (or label) -> valid samples
    examples: list[tuple[str, str]]  # (key, caption)
    num_regions: int = 0
    num_documents: int = 0
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    meta: dict = field(default_factory=dict)
    samples: list[Sample | Document] = field(default_factory=list)  # the first few, for the contact sheet


def inspect_data(spec: str, format: str = "auto", *, limit: int | None = None, num_examples: int = 8,
                 num_sheet: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> InspectReport:
    """Read (up to `limit`) samples of a dataset, validating each exactly as training does."""
    source = open_source(spec, format)
    counter = SkipCounter(strict=False)
    classes: Counter = Counter()
    sizes: Counter = Counter()
    examples, kept = [], []
    read = valid = regions = documents = 0
    for raw in source.records(counter):
        if limit is not None and read >= limit:
            break
        read += 1
        if is_document(raw):
            document = read_document(raw, counter, max_pixels)
            if document is None:
                continue
            valid += 1
            documents += 1
            for image in document.images:
                sizes[f"{image.width}x{image.height}"] += 1
            if len(examples) < num_examples:
                text = " ".join(i["text"] for i in document.items if isinstance(i.get("text"), str))
                examples.append((document.key, text))
            if len(kept) < num_sheet:
                kept.append(document)
            continue
        sample = decode_sample(raw, counter, max_pixels)
        if sample is None:
            continue
        valid += 1
        regions += len(sample.regions)
        sizes[f"{sample.image.width}x{sample.image.height}"] += 1
        if sample.classname is not None or sample.label is not None:
            classes[sample.classname if sample.classname is not None else str(sample.label)] += 1
        if len(examples) < num_examples:
            examples.append((sample.key, sample.caption))
        if len(kept) < num_sheet:
            kept.append(sample)
    return InspectReport(spec=spec, kind=source.kind, num_listed=source.num_samples, num_read=read,
                         num_valid=valid, skipped=dict(sorted(counter.items())), classes=dict(classes.most_common()),
                         examples=examples, num_regions=regions, num_documents=documents,
                         image_sizes=dict(sizes.most_common()), meta=source.meta, samples=kept)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _first_image(item: Sample | Document) -> Image.Image:
    if isinstance(item, Document):
        return item.images[0] if item.images else Image.new("RGB", (64, 64), "white")
    return item.image


def _tile(item: Sample | Document, scale: int, font, line_height: int, width_chars: int) -> Image.Image:
    if isinstance(item, Document):
        image = _first_image(item)
        lines = [f"{item.key} ({len(item.images)} images)"]
        for entry in item.items[:6]:
            text = f"[image {entry['image']}]" if "image" in entry else str(entry.get("text", ""))
            lines += textwrap.wrap(text, width_chars)[:2]
        regions = []
    else:
        image, regions = item.image, item.regions
        label = f"  [{item.classname}]" if item.classname else ""
        lines = [item.key + label] + textwrap.wrap(item.caption, width_chars)[:3]
        for number, region in enumerate(regions):
            lines += textwrap.wrap(f"{number}: {region.caption}", width_chars)[:1]
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    height = big.height + 6 + line_height * len(lines)
    tile = Image.new("RGB", (big.width, height), (255, 255, 255))
    tile.paste(big, (0, 0))
    draw = ImageDraw.Draw(tile)
    for number, region in enumerate(regions):
        color = BOX_COLORS[number % len(BOX_COLORS)]
        x0, y0, x1, y1 = (v * scale for v in region.box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=2)
        draw.text((x0 + 3, y0 + 1), str(number), fill=color, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    for i, line in enumerate(lines):
        color = (0, 0, 0)
        if regions and i >= len(lines) - len(regions):
            color = tuple(c * 2 // 3 for c in BOX_COLORS[(i - (len(lines) - len(regions))) % len(BOX_COLORS)])
        draw.text((3, big.height + 3 + i * line_height), line, fill=color, font=font)
    return tile


def contact_sheet(items: list[Sample | Document], out_path: str | Path, columns: int = 4,
                  target_width: int = 256) -> Path:
    """Write a PNG grid of samples with their boxes (numbered) and region captions; returns its path."""
    if not items:
        raise ValueError("no samples to draw")
    widest = max(_first_image(item).width for item in items)
    scale = max(1, target_width // max(1, widest))
    font_size = 11
    font, line_height = _font(font_size), font_size + 3
    tiles = [_tile(item, scale, font, line_height, width_chars=max(20, widest * scale // 6)) for item in items]
    columns = min(columns, len(tiles))
    cell_w = max(t.width for t in tiles) + 8
    cell_h = max(t.height for t in tiles) + 8
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * cell_w + 8, rows * cell_h + 8), (235, 235, 235))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (8 + (i % columns) * cell_w, 8 + (i // columns) * cell_h))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
