"""Image tokenizers as dataset tools: images -> code shards -> images (`clipforge tokenize encode|decode`).

An image tokenizer is a trained clipforge run whose model has `encode_codes` and `decode_codes` (the `vq`
family). It is identified by its fingerprint: its model.json (the family's resolved config) and the sha256 of
its weight file. Codes are only meaningful to the tokenizer that made them, so every code record carries the
fingerprint's identity and decoding refuses codes of another tokenizer with one line naming both.

    tokenizer = load_image_tokenizer("runs/lgvq_synth_tiny")
    report = encode_images(tokenizer, ["data/synth_train"], "data/synth_codes")    # shards, ImageFolder, files
    decode_code_shards(tokenizer, "data/synth_codes", "decoded/")                    # one PNG per record

Code shards are webdataset shards (`codes-000000.tar`, written atomically by `data.shards.write_shards`):
    <key>.npy    the code grid [h, w], int16 (int32 when the codebook has more than 32767 codes)
    <key>.json   {"source_key", "source", "caption" (when the image had one), "label" (when it had one),
                 "tokenizer": {"name", "weights_sha256", "config_sha256"}}
The manifest's meta holds `settings` (the full fingerprint, the source's identity, the shard size) and
`counts` (images encoded, bad inputs skipped by kind). Encoding is idempotent: a folder that already holds a
complete set made with the same settings is left as it is. Images are resized by the tokenizer's own
preprocess; corrupt or unreadable images are skipped and counted by kind, as training counts them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from clipforge.data.samples import IMAGE_EXTENSIONS, SkipCounter
from clipforge.errors import CheckpointError, ConfigError, DataError

CODES_FORMAT = "clipforge.codes/1"
CODES_PREFIX = "codes"
ProgressFn = Callable[[int, int], None]  # (images done, bad inputs skipped so far)


# ---- the tokenizer and its fingerprint -----------------------------------------------------------------------

def tokenizer_fingerprint(checkpoint: str | Path) -> dict:
    """What identifies a tokenizer run: its model.json, the sha256 of its weights and where they were read."""
    from clipforge.models.factory import find_model_weights, read_model_json
    from clipforge.models.text_prior import file_sha256

    weights = find_model_weights(checkpoint)
    model_json = read_model_json(weights.parent)
    if model_json is None:
        raise CheckpointError(f"'{checkpoint}' has no model.json beside its weights: not a clipforge run")
    canonical = json.dumps(model_json, sort_keys=True, separators=(",", ":"))
    return {"name": model_json["name"], "family": model_json["family"], "checkpoint": str(weights.parent.resolve()),
            "weights_sha256": file_sha256(weights), "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
            "model_json": model_json}


def tokenizer_identity(fingerprint: dict) -> dict:
    """The part of a fingerprint two tokenizers must share for their codes to mean the same thing."""
    return {key: fingerprint.get(key) for key in ("name", "weights_sha256", "config_sha256")}


def describe_tokenizer(fingerprint: dict) -> str:
    """'vq-tiny' (runs/vq/checkpoints/step_000060, weights 1a2b3c4d5e6f) -- for one-line errors."""
    where = f"{fingerprint['checkpoint']}, " if fingerprint.get("checkpoint") else ""
    return f"'{fingerprint.get('name')}' ({where}weights {str(fingerprint.get('weights_sha256'))[:12]})"


@dataclass
class ImageTokenizer:
    model: nn.Module  # encode_codes(images) -> [B, h, w] int64; decode_codes(codes) -> [B, 3, S, S] in [-1, 1]
    preprocess: Callable  # PIL image -> [3, S, S] (resizes any image to the tokenizer's size)
    fingerprint: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_image_tokenizer(checkpoint: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    """A trained tokenizer run (or checkpoint folder) in eval mode; ConfigError when it holds no tokenizer."""
    from clipforge.models.factory import load_model

    fingerprint = tokenizer_fingerprint(checkpoint)
    model, preprocess, _ = load_model(None, checkpoint=checkpoint, device=device)
    if not all(callable(getattr(model, name, None)) for name in ("encode_codes", "decode_codes")):
        raise ConfigError(f"'{checkpoint}' holds a '{fingerprint['name']}' model of the {fingerprint['family']} "
                          f"family, not an image tokenizer (it has no encode_codes/decode_codes)")
    return ImageTokenizer(model.eval(), preprocess, fingerprint)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [-1, 1] -> [B, S, S, 3] uint8 (clamped, rounded to the nearest level)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---- sources: shards, an ImageFolder, a CSV, or image files --------------------------------------------------

@dataclass
class ImageSource:
    total: int  # records listed (before decoding)
    records: Callable[[SkipCounter], Iterator[dict]]  # raw records, as the data layer reads them
    identity: dict  # what the source is, for idempotence: its paths and a digest of their sizes and times


def _stat_digest(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _flat_image_folder(path: Path) -> list[Path] | None:
    """The images directly inside `path` when it holds images and no shards or class folders, else None."""
    if not path.is_dir() or any(p.name.endswith(".tar") for p in path.iterdir()):
        return None
    images = sorted(p for p in path.iterdir() if p.is_file() and _is_image_file(p))
    return images or None


def open_image_source(specs: list[str]) -> ImageSource:
    """One shard folder/glob/pattern, ImageFolder root or .csv; or image files (a folder of them, or paths)."""
    from clipforge.data.readers import _safe_key_part
    from clipforge.data.sources import open_source

    if not specs:
        raise DataError("no source given: name a shard folder, an ImageFolder root, a .csv or image files")
    flat = _flat_image_folder(Path(specs[0])) if len(specs) == 1 else None
    if flat is None and len(specs) == 1 and not _is_image_file(Path(specs[0])):
        source = open_source(specs[0])
        paths = [s.url for s in source.shards] if source.kind == "wds" else \
            [source.table.path if source.kind == "csv" else source.table.root, *source.table.image_paths]
        identity = {"kind": source.kind, "spec": specs[0], "digest": _stat_digest(paths)}
        return ImageSource(source.num_samples, source.records, identity)
    files = [str(p) for p in flat] if flat is not None else list(specs)
    for path in files:
        if not _is_image_file(Path(path)):
            raise DataError(f"'{path}' is not an image file ({', '.join(IMAGE_EXTENSIONS)}); give one shard folder, "
                            f"ImageFolder root or .csv, or image files")

    def records(counter: SkipCounter) -> Iterator[dict]:
        for index, path in enumerate(files):
            yield {"__key__": f"file-{index:09d}-{_safe_key_part(Path(path).stem)}", "__url__": path,
                   "__path__": path}

    identity = {"kind": "files", "spec": [str(Path(p).resolve()) for p in files], "digest": _stat_digest(files)}
    return ImageSource(len(files), records, identity)


# ---- encode ----------------------------------------------------------------------------------------------------

@dataclass
class EncodeReport:
    out_dir: Path
    images: int  # records written (one per usable image)
    skipped: dict[str, int]  # bad inputs by kind (and repairs such as converted_L)
    shards: int
    seconds: float
    written: bool  # False: an identical set was already there


def _code_dtype(codebook_size: int):
    return np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


def _output_key(key: str, seen: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]+", "_", key).strip("_") or "x"
    name, number = base, 1
    while name in seen:  # two sources may use the same key: each record keeps its own
        name, number = f"{base}-{number}", number + 1
    seen.add(name)
    return name


def _read_manifest_meta(folder: Path) -> dict | None:
    from clipforge.data.shards import read_manifest

    body = read_manifest(folder)
    meta = body.get("meta") if body is not None else None
    return meta if isinstance(meta, dict) else None


@torch.no_grad()
def encode_images(tokenizer: ImageTokenizer, sources: list[str], out_dir: str | Path, *, batch_size: int = 64,
                  shard_size: int = 1000, progress: ProgressFn | None = None) -> EncodeReport:
    """Encode every usable image of `sources` into code shards under `out_dir` (see the module docstring)."""
    from clipforge.data.batches import CaptionOptionalBatch
    from clipforge.data.shards import manifest_is_complete, write_shards

    if batch_size < 1 or shard_size < 1:
        raise DataError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    out = Path(out_dir)
    source = open_image_source(list(sources))
    settings = {"format": CODES_FORMAT, "tokenizer": tokenizer.fingerprint, "source": source.identity,
                "shard_size": shard_size}
    existing = _read_manifest_meta(out)
    if existing is not None and existing.get("settings") == settings and manifest_is_complete(out, existing):
        counts = existing.get("counts", {})
        return EncodeReport(out, int(counts.get("images", 0)), dict(counts.get("skipped", {})),
                            len(list(out.glob(f"{CODES_PREFIX}-*.tar"))), 0.0, written=False)
    model, identity = tokenizer.model, tokenizer_identity(tokenizer.fingerprint)
    dtype = _code_dtype(int(model.codebook_size))
    counter = SkipCounter()
    counts: dict = {"images": 0, "skipped": {}}
    seen: set[str] = set()
    start = time.perf_counter()

    def flush(pending: list[tuple[dict, torch.Tensor]]) -> Iterator[dict]:
        if not pending:
            return
        images = torch.stack([image for _, image in pending]).to(tokenizer.device)  # [B, 3, S, S]
        codes = model.encode_codes(images).cpu().numpy().astype(dtype)  # [B, h, w]
        for (meta, _), grid in zip(pending, codes):
            buffer = io.BytesIO()
            np.save(buffer, grid, allow_pickle=False)
            yield {"__key__": _output_key(meta["source_key"], seen), "npy": buffer.getvalue(), "json": meta}
        counts["images"] += len(pending)
        if progress is not None:
            progress(counts["images"], sum(counter.values()))

    def records() -> Iterator[dict]:
        pending: list[tuple[dict, torch.Tensor]] = []
        for raw in source.records(counter):
            sample = CaptionOptionalBatch.decode(raw, counter)  # keeps images without a caption
            if sample is None:
                continue
            meta = {"source_key": sample.key, "source": str(raw.get("__url__", "")), "tokenizer": identity}
            if sample.caption:
                meta["caption"] = sample.caption
            if sample.label is not None:
                meta["label"] = sample.label
            pending.append((meta, tokenizer.preprocess(sample.image)))
            if len(pending) == batch_size:
                yield from flush(pending)
                pending = []
        yield from flush(pending)
        counts["skipped"] = dict(counter)

    manifest = write_shards(records(), out, shard_size, prefix=CODES_PREFIX,
                            meta={"settings": settings, "counts": counts})
    if counts["images"] == 0:
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts["skipped"].items()) or "none listed"
        raise DataError(f"no usable image in {', '.join(sources)[:200]} (skipped: {kinds})")
    return EncodeReport(out, counts["images"], counts["skipped"], len(manifest.shards),
                        time.perf_counter() - start, written=True)


# ---- decode ----------------------------------------------------------------------------------------------------

@dataclass
class DecodeReport:
    out_dir: Path
    images: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def check_same_tokenizer(made_by: dict, tokenizer: ImageTokenizer, where: str) -> None:
    """CheckpointError, one line naming both tokenizers, unless `made_by` (an identity) is `tokenizer`'s."""
    if tokenizer_identity(made_by) != tokenizer_identity(tokenizer.fingerprint):
        raise CheckpointError(f"the codes in '{where}' were made by tokenizer {describe_tokenizer(made_by)}, not by "
                              f"{describe_tokenizer(tokenizer.fingerprint)}; decode them with the tokenizer that made "
                              f"them")


def _write_png(pixels: np.ndarray, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(pixels, "RGB").save(temporary, format="PNG")
    os.replace(temporary, path)


def _read_grid(raw: dict, grid_size: int, codebook_size: int) -> np.ndarray | None:
    try:
        grid = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
    except (KeyError, ValueError, OSError, EOFError):
        return None
    if grid.shape != (grid_size, grid_size) or grid.dtype.kind not in "iu" or grid.size == 0:
        return None
    return grid if 0 <= int(grid.min()) and int(grid.max()) < codebook_size else None


@torch.no_grad()
def decode_code_shards(tokenizer: ImageTokenizer, codes_dir: str | Path, out_dir: str | Path, *,
                       batch_size: int = 64, progress: ProgressFn | None = None) -> DecodeReport:
    """Every record of the code shards in `codes_dir` as `out_dir/<key>.png`. Codes of another tokenizer are
    refused before any work (the manifest) and record by record (each record names its tokenizer)."""
    from clipforge.data.samples import read_json_member
    from clipforge.data.shards import iter_tar_samples, resolve_shards

    folder = Path(codes_dir)
    meta = _read_manifest_meta(folder) if folder.is_dir() else None
    settings = (meta or {}).get("settings")
    if not isinstance(settings, dict) or settings.get("format") != CODES_FORMAT:
        raise DataError(f"'{codes_dir}' holds no code shards (no {CODES_FORMAT} manifest); write them with "
                        f"'clipforge tokenize encode'")
    check_same_tokenizer(settings.get("tokenizer") or {}, tokenizer, str(codes_dir))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot write images into '{out}': {err.strerror or type(err).__name__}") from None
    model, counter, written, start = tokenizer.model, SkipCounter(), 0, time.perf_counter()
    grid_size, codebook_size = int(model.grid_size), int(model.codebook_size)
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal written
        codes = torch.from_numpy(np.stack([grid for _, grid in pending]).astype(np.int64)).to(tokenizer.device)
        pixels = images_to_uint8(model.decode_codes(codes)).numpy()  # [B, S, S, 3]
        for (key, _), image in zip(pending, pixels):
            _write_png(image, out / f"{key}.png")
        written += len(pending)
        pending.clear()
        if progress is not None:
            progress(written, sum(counter.values()))

    for shard in resolve_shards(str(folder)):
        for raw in iter_tar_samples(shard.url, counter):
            try:
                record_meta = read_json_member(raw) or {}
            except ValueError:
                counter.skip("malformed_json", f"{shard.url}: {raw['__key__']}")
                continue
            check_same_tokenizer(record_meta.get("tokenizer") or {}, tokenizer, f"{shard.url}: {raw['__key__']}")
            grid = _read_grid(raw, grid_size, codebook_size)
            if grid is None:
                counter.skip("bad_codes", f"{shard.url}: {raw['__key__']}")
                continue
            pending.append((raw["__key__"], grid))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return DecodeReport(out, written, dict(counter), time.perf_counter() - start)
