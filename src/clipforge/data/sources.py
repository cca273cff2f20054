"""A data source: where samples come from (shards, a CSV, an ImageFolder) and how to read a piece of it.

`open_source(spec, format)` resolves what a user wrote in `data.train` / `data.val` into a
`DataSource`: a list of units (a tar shard, or one row of a CSV / ImageFolder) with their sample
counts, and `read_unit(unit, first, stop, counter)` which yields raw records. The loader's planning
(streams.py) works on units only, so every kind of source is split, shuffled and resumed the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipforge.data.readers import CsvTable, ImageFolderTable, read_csv, read_image_folder
from clipforge.data.samples import IMAGE_EXTENSIONS
from clipforge.data.scan import ScanIndex
from clipforge.data.shards import ShardInfo, iter_tar_samples, read_manifest, resolve_shards
from clipforge.errors import DataError


@dataclass
class DataSource:
    kind: str  # "wds" | "csv" | "imagefolder"
    spec: str  # what the user wrote (a folder, glob, brace pattern, .csv, ...)
    num_samples: int
    shards: list[ShardInfo] = field(default_factory=list)  # wds
    table: CsvTable | ImageFolderTable | None = None  # csv / imagefolder
    classnames: list[str] | None = None  # label -> name, when known
    meta: dict = field(default_factory=dict)  # e.g. the SynthScenes settings from the manifest
    scan: ScanIndex | None = None  # usable samples, once scanned (scan.py): then units count and read those only

    def unit_sizes(self) -> np.ndarray:
        """[U] samples per unit: per shard, or 1 per row (so rows shuffle individually); usable ones if scanned."""
        if self.scan is not None:
            return self.scan.sizes()
        if self.kind == "wds":
            return np.array([s.num_samples for s in self.shards], dtype=np.int64)
        return np.ones(self.num_samples, dtype=np.int64)

    def read_unit(self, unit: int, first: int, stop: int, counter) -> Iterator[dict]:
        """Raw records first..stop-1 of one unit, each with its storage index as "__index__". Scanned, the
        positions count usable samples, and the unusable records around them are read too (and skipped by
        the decoder, which counts them), so each raw record is read once per epoch."""
        raw_stop: int | None = stop
        if self.scan is not None:
            first, raw_stop = self.scan.raw_range(unit, first, stop)
        if self.kind == "wds":
            yield from iter_tar_samples(self.shards[unit].url, counter, first, raw_stop)
        elif first == 0 and (raw_stop is None or raw_stop >= 1):
            record = self.table.record(unit)
            record["__index__"] = 0
            yield record

    def records(self, counter) -> Iterator[dict]:
        """Every raw record in storage order (for inspection and evaluation)."""
        for unit, size in enumerate(self.unit_sizes()):
            yield from self.read_unit(unit, 0, int(size), counter)


def _looks_like_image_folder(folder: Path) -> bool:
    suffixes = {f".{ext}" for ext in IMAGE_EXTENSIONS}
    for sub in folder.iterdir():
        if sub.is_dir() and any(f.suffix.lower() in suffixes for f in sub.iterdir() if f.is_file()):
            return True
    return False


def detect_format(spec: str) -> str:
    """'wds', 'csv' or 'imagefolder' for a path/pattern; DataError if it does not exist."""
    first = spec.split("::")[0]
    path = Path(first)
    if first.lower().endswith((".csv", ".tsv")):
        return "csv"
    if any(c in first for c in "{}*?[") or first.endswith((".tar", ".tar.gz", ".tgz")):
        return "wds"
    if path.is_dir():
        if read_manifest(path) is not None or any(p.name.endswith(".tar") for p in path.iterdir()):
            return "wds"
        if _looks_like_image_folder(path):
            return "imagefolder"
        raise DataError(f"'{spec}' holds neither .tar shards nor class folders of images")
    raise DataError(f"data path '{spec}' does not exist")


def open_source(spec: str, format: str = "auto", csv_image_key: str = "filepath",
                csv_caption_key: str = "caption", csv_separator: str = ",") -> DataSource:
    kind = detect_format(spec) if format == "auto" else format
    if kind == "wds":
        shards = resolve_shards(spec)
        source = DataSource("wds", spec, sum(s.num_samples for s in shards), shards=shards)
        if len(shards) and Path(shards[0].url).parent.is_dir():
            body = read_manifest(Path(shards[0].url).parent) or {}
            source.meta = dict(body.get("meta", {}))
            names = source.meta.get("classnames")
            source.classnames = list(names) if isinstance(names, list) else None
        return source
    if kind == "csv":
        table = read_csv(spec, csv_image_key, csv_caption_key, csv_separator)
        return DataSource("csv", spec, len(table), table=table)
    if kind == "imagefolder":
        table = read_image_folder(spec)
        return DataSource("imagefolder", spec, len(table), table=table, classnames=list(table.classnames))
    raise DataError(f"unknown data format '{format}'")
