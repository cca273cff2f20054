"""Interleaved image-text documents for LCL: reading them (and image-caption pairs as documents), the batch type
an objective trains on, and the MMC4 / OBELICS jsonl converter.

A document record is DESIGN.md's layout: `key.<i>.png` (any image extension) and `key.json` holding an ordered
`"items"` list of `{"text": str}` / `{"image": i}`. An image-caption pair (`key.png` + `key.txt`) is read as a
two-item document, marked as a pair; whether its image comes before or after the caption is decided when the
batch is built (the family's tokenizer, seeded per sample and epoch), so it changes from epoch to epoch as in
the paper's recipe (image first with probability 0.5).

Bad input, counted by kind (`SkipCounter`; with `data.strict` each one raises):

| kind | effect |
| --- | --- |
| malformed_json (unreadable JSON; `items` not a list; numbered images but no `items`) | document skipped |
| unknown_item (an entry without, or with both, a "text" string and an "image" number >= 0) | that entry dropped |
| missing_image, corrupt_image, truncated_image, image_too_large, ... (a referenced image) | that image dropped |
| too_many_images (beyond the objective's `max_images`, in reading order) | that image dropped |
| document_without_image, document_without_text (after the drops above) | document skipped |
| document_too_long (not even its first image block fits the context; the family's tokenizer) | document skipped |

A document longer than the context is truncated at an image-block boundary by the tokenizer: that is the
method's normal behaviour (MMC4 documents are routinely longer than the context), so it is not counted.
Pairs decode exactly as `decode_sample` does (its kinds: missing_image, missing_caption, ...).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from clipforge.data.batches import DocumentBatch
from clipforge.data.samples import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Document,
    Sample,
    SkipCounter,
    _open_image,
    decode_sample,
    is_document,
    read_image_file,
    read_json_member,
    to_rgb,
)
from clipforge.errors import DataError

PAIR = "__pair__"  # Document.meta key marking an image-caption pair read as a document


# ---- reading ------------------------------------------------------------------------------------------------

def item_kind(item) -> str | None:
    """'text' or 'image' for an items entry with exactly one of a "text" string and an "image" number (other keys
    are metadata and ignored); None for anything else (an unknown kind)."""
    if not isinstance(item, dict):
        return None
    number = item.get("image")
    is_text = isinstance(item.get("text"), str)
    is_image = isinstance(number, int) and not isinstance(number, bool) and number >= 0
    if is_text == is_image:
        return None
    return "text" if is_text else "image"


def is_pair(document: Document) -> bool:
    return bool(document.meta.get(PAIR))


def pair_document(sample: Sample) -> Document:
    """An image-caption pair as a two-item document (image first as stored; the tokenizer picks the order)."""
    return Document(key=sample.key, items=[{"image": 0}, {"text": sample.caption}], images=[sample.image],
                    meta={**sample.meta, PAIR: True})


def read_document(raw: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_images: int | None = None) -> Document | None:
    """Validate and decode an interleaved document record, or an image-caption pair as a two-item document;
    None (after counting why) when unusable. The returned document's `images` hold only the images kept, and
    its items' image numbers index them."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}: {key}"
    try:
        meta = read_json_member(raw)
    except ValueError:
        counter.skip("malformed_json", where)
        return None
    if isinstance(meta, dict) and "items" in meta:
        return _read_interleaved(raw, meta, counter, max_pixels, max_images, key, where)
    if is_document(raw):
        counter.skip("malformed_json", f"{where}: numbered images but no 'items' list")
        return None
    sample = decode_sample(raw, counter, max_pixels, with_regions=False)
    return None if sample is None else pair_document(sample)


def _read_interleaved(raw: dict, meta: dict, counter: SkipCounter, max_pixels: int, max_images: int | None,
                      key: str, where: str) -> Document | None:
    items = meta["items"]
    if not isinstance(items, list):
        counter.skip("malformed_json", f"{where}: 'items' is not a list")
        return None
    members = {}
    for name, data in raw.items():
        head, _, ext = name.partition(".")
        if head.isdigit() and ext.lower() in IMAGE_EXTENSIONS:
            members[int(head)] = data
    kept: list[dict] = []
    images = []
    decoded: dict[int, int] = {}  # stored image number -> index in `images` (an image may be referenced twice)
    has_text = False
    for position, item in enumerate(items):
        kind = item_kind(item)
        if kind is None:
            counter.skip("unknown_item", f"{where}: item {position}")
            continue
        if kind == "text":
            if item["text"].strip():
                kept.append({"text": item["text"]})
                has_text = True
            continue
        number = item["image"]
        if number not in decoded:
            if max_images is not None and len(images) >= max_images:
                counter.skip("too_many_images", f"{where}: image {number} (max_images={max_images})")
                continue
            if number not in members:
                counter.skip("missing_image", f"{where}: image {number}")
                continue
            image, problem = _open_image(members[number], max_pixels)
            if image is not None:
                image, problem = to_rgb(image)
                if image is not None and problem:
                    counter.note(problem)
                    problem = None
            if image is None:
                counter.skip(problem, f"{where}: image {number}")
                continue
            decoded[number] = len(images)
            images.append(image)
        kept.append({"image": decoded[number]})
    if not images:
        counter.skip("document_without_image", where)
        return None
    if not has_text:
        counter.skip("document_without_text", where)
        return None
    return Document(key=key, items=kept, images=images, meta=meta)


@dataclass
class DocumentImage:
    """One image of a document, keyed for per-sample seeding (BatchBuilder.image_tensor)."""

    key: str
    image: object  # PIL image


def document_images(document: Document, numbers: list[int]) -> list[DocumentImage]:
    """The images `numbers` of a document in the order given; a pair's image is keyed by the pair's key (so it is
    augmented as ImageTextBatch would), a document's k-th occurrence by `key.k`."""
    if is_pair(document):
        return [DocumentImage(document.key, document.images[n]) for n in numbers]
    return [DocumentImage(f"{document.key}.{k}", document.images[n]) for k, n in enumerate(numbers)]


class DocumentBatchType:
    """What an objective names as its `batch_type` to train on DocumentBatch under one model's limits.

    `decode` reads documents and pairs (read_document, at most `max_images` images) and fits them to the model
    with `tokenizer.fit_document(document, counter)` (tokenises the text once, skips a document whose first image
    block does not fit); `collate` is the tokenizer's `collate_documents`. An instance, not a class, because the
    limits are the model's and the config's; it pickles, so DataLoader workers started by spawn receive it.
    """

    def __init__(self, tokenizer, max_images: int | None = None, image_first_prob: float = 0.5):
        self.__name__ = "DocumentBatch"  # what BatchBuilder's messages call it
        self.tokenizer = tokenizer
        self.max_images = max_images
        self.image_first_prob = image_first_prob

    def decode(self, record: dict, counter: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS) -> Document | None:
        document = read_document(record, counter, max_pixels, self.max_images)
        return None if document is None else self.tokenizer.fit_document(document, counter)

    def image_transform(self, preprocess, image_size: int | None = None):
        return DocumentBatch.image_transform(preprocess, image_size)

    def collate(self, documents: list[Document], builder) -> DocumentBatch:
        return self.tokenizer.collate_documents(documents, builder, image_first_prob=self.image_first_prob)


# ---- converting MMC4 / OBELICS-style jsonl ------------------------------------------------------------------

IMAGE_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class ConversionReport:
    lines: int = 0  # jsonl lines read
    documents: int = 0  # documents written
    images: int = 0  # images written
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # bad input by kind


def jsonl_items(record: dict, *, min_similarity: float | None = None,
                rng: random.Random | None = None) -> list[tuple[str, str]] | None:
    """A jsonl document as [("text", sentence) | ("image", reference)] in reading order; None if no layout fits.

    - OBELICS: parallel lists `texts` and `images`, exactly one of the two non-null at each position.
    - MMC4: `text_list` and `image_info` [{"image_name" (or "raw_url"), "matched_text_index", "matched_sim"}];
      images with `matched_sim` under `min_similarity` are dropped; each image goes right before or right after
      its matched sentence (`rng`: even odds, as LCL places them; without it, after).
    - clipforge: `items` [{"text"} | {"image": file name}].
    """
    if isinstance(record.get("texts"), list) and isinstance(record.get("images"), list):
        if len(record["texts"]) != len(record["images"]):
            return None
        items = []
        for text, image in zip(record["texts"], record["images"]):
            if isinstance(image, str) and image:
                items.append(("image", image))
            elif isinstance(text, str):
                items.append(("text", text))
        return items
    if isinstance(record.get("text_list"), list) and isinstance(record.get("image_info"), list):
        sentences = [s if isinstance(s, str) else "" for s in record["text_list"]]
        before: dict[int, list[str]] = {}
        after: dict[int, list[str]] = {}
        for info in record["image_info"]:
            if not isinstance(info, dict):
                continue
            reference = info.get("image_name") or info.get("raw_url")
            index = info.get("matched_text_index")
            similarity = info.get("matched_sim")
            if not isinstance(reference, str) or not isinstance(index, int) or not 0 <= index < len(sentences):
                continue
            if min_similarity is not None and isinstance(similarity, int | float) and similarity < min_similarity:
                continue
            side = before if rng is not None and rng.random() < 0.5 else after
            side.setdefault(index, []).append(reference)
        items = []
        for index, sentence in enumerate(sentences):
            items += [("image", r) for r in before.get(index, [])]
            items.append(("text", sentence))
            items += [("image", r) for r in after.get(index, [])]
        return items
    if isinstance(record.get("items"), list):
        items = []
        for item in record["items"]:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                items.append(("text", item["text"]))
            elif isinstance(item, dict) and isinstance(item.get("image"), str):
                items.append(("image", item["image"]))
        return items
    return None


def image_file_name(reference: str) -> str:
    """The file name an image reference is stored under in the images folder: the last path component of a URL
    or path (so a reference can never point outside the folder)."""
    path = urlparse(reference).path if "://" in reference else reference
    return Path(path.replace("\\", "/")).name


def _document_record(number: int, record: dict, images_dir: Path, counter: SkipCounter, *,
                     min_similarity: float | None, seed: int, max_pixels: int) -> dict | None:
    key = f"doc-{number:09d}"
    where = f"line {number + 1}"
    items = jsonl_items(record, min_similarity=min_similarity, rng=random.Random(f"{seed}/{number}"))
    if items is None:
        counter.skip("malformed_json", f"{where}: neither OBELICS (texts/images), MMC4 (text_list/image_info) "
                                       f"nor clipforge (items) layout")
        return None
    sample: dict = {"__key__": key}
    out_items: list[dict] = []
    has_text = False
    for kind, value in items:
        if kind == "text":
            if value.strip():
                out_items.append({"text": value.strip()})
                has_text = True
            continue
        name = image_file_name(value)
        data, problem = read_image_file(images_dir / name) if name else (None, "missing_file")
        if data is None:
            counter.skip("missing_image" if problem == "missing_file" else problem, f"{where}: {name}")
            continue
        image, problem = _open_image(data, max_pixels)
        if image is None:
            counter.skip(problem, f"{where}: {name}")
            continue
        extension = IMAGE_FORMAT_EXTENSIONS.get(image.format or "", "png")
        number_in_document = len(sample) - 1
        sample[f"{number_in_document}.{extension}"] = data
        out_items.append({"image": number_in_document})
    if len(sample) == 1:
        counter.skip("document_without_image", where)
        return None
    if not has_text:
        counter.skip("document_without_text", where)
        return None
    source = record.get("url")  # MMC4 names the page; kept for provenance
    sample["json"] = {"items": out_items, **({"source": source} if isinstance(source, str) else {})}
    return sample


def convert_jsonl_documents(
    jsonl: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    min_similarity: float | None = None,
    seed: int = 0,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> ConversionReport:
    """Convert an MMC4- or OBELICS-style jsonl (one document per line) with its images in `images_dir` (looked up
    by file name, see `image_file_name`) into document shards `doc-000000.tar`, ... in `out_dir`.

    Each image is checked by decoding it; a missing or unreadable one is dropped and counted, and a document left
    without an image or text is skipped and counted (`strict`: the first one raises DataError). Shards are written
    atomically by `write_shards`, the manifest last, with the settings and the counts. `progress(lines_read)`.
    The same inputs give the same shards (MMC4 placement is seeded by `seed` and the line number).
    """
    from clipforge.data.shards import write_shards

    jsonl, images_dir = Path(jsonl), Path(images_dir)
    if not jsonl.is_file():
        raise DataError(f"jsonl file '{jsonl}' does not exist")
    if not images_dir.is_dir():
        raise DataError(f"images folder '{images_dir}' does not exist")
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    counter = SkipCounter(strict=strict)
    report = ConversionReport()
    # write_shards writes the manifest after the last record, so counts filled in while writing are recorded
    meta = {"converter": "clipforge data documents", "source": jsonl.name, "min_similarity": min_similarity,
            "seed": seed, "skipped": {}}

    def records() -> Iterator[dict]:
        with jsonl.open("r", encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines):
                report.lines = number + 1
                if progress is not None:
                    progress(report.lines)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    counter.skip("malformed_json", f"line {number + 1}")
                    continue
                if not isinstance(record, dict):
                    counter.skip("malformed_json", f"line {number + 1}: not an object")
                    continue
                document = _document_record(number, record, images_dir, counter, min_similarity=min_similarity,
                                            seed=seed, max_pixels=max_pixels)
                if document is not None:
                    report.documents += 1
                    report.images += len(document) - 2  # members other than __key__ and json
                    yield document
        meta["skipped"] = dict(sorted(counter.items()))

    manifest = write_shards(records(), out_dir, shard_size, prefix="doc", meta=meta)
    report.skipped = dict(sorted(counter.items()))
    report.shards = [os.fspath(s.url) for s in manifest.shards]
    if report.documents == 0:
        raise DataError(f"no usable document in '{jsonl}' ({report.lines} lines; skipped: {report.skipped})")
    return report


# ---- mined pairs: the CLIP baseline's data ----------------------------------------------------------------------

def mine_document_pairs(documents_dir: str | Path, out_dir: str | Path, shard_size: int = 1000,
                        progress: Callable[[int], None] | None = None) -> tuple[int, dict]:
    """Image-caption pairs mined from interleaved document shards: each image with the sentence that describes it,
    as CLIP trained on "the pairs mined from the same documents" sees them (LCL's baseline).

    The describing sentence is `images[i]["caption_item"]` of the document's json (SynthScenes records it; MMC4's
    `matched_text_index` plays that part). Images without one are not mined, and counted. Returns (pairs written,
    skip counts by kind); the shards are written atomically with a manifest recording the source.
    """
    from clipforge.data.shards import iter_tar_samples, resolve_shards, write_shards

    counter = SkipCounter()
    unmatched = 0

    def records() -> Iterator[dict]:
        nonlocal unmatched
        for shard in resolve_shards(str(documents_dir)):
            for raw in iter_tar_samples(shard.url, counter):
                try:
                    meta = read_json_member(raw)
                except ValueError:
                    counter.skip("malformed_json", raw.get("__key__", "?"))
                    continue
                items = meta.get("items") if isinstance(meta, dict) else None
                images = meta.get("images") if isinstance(meta, dict) else None
                if not isinstance(items, list) or not isinstance(images, list):
                    counter.skip("malformed_json", raw.get("__key__", "?"))
                    continue
                for number, image in enumerate(images):
                    where = image.get("caption_item") if isinstance(image, dict) else None
                    png = raw.get(f"{number}.png")
                    if png is None or not isinstance(where, int) or not 0 <= where < len(items) or \
                            not isinstance(items[where], dict) or not isinstance(items[where].get("text"), str):
                        unmatched += 1
                        continue
                    label = {k: image[k] for k in ("label", "classname") if k in image}
                    yield {"__key__": f"{raw['__key__']}-{number}", "png": png, "txt": items[where]["text"],
                           "json": {"source": raw["__key__"], "image": number, **label}}

    manifest = write_shards(records(), out_dir, shard_size, prefix="pairs", progress=progress,
                            meta={"mined_from": str(documents_dir)})
    skipped = dict(counter)
    if unmatched:
        skipped["image_without_describing_sentence"] = unmatched
    return sum(s.num_samples for s in manifest.shards), skipped
