"""Which samples are usable, learned once before training, so every epoch delivers each of them exactly once.

The loader plans an epoch from sample counts (streams.py). Listed counts (manifest, sizes.json, tar
headers, CSV rows) include samples that turn out unusable when decoded: a corrupt image, a missing
caption, a cut shard. When those outnumber the spare samples the plan holds, a worker runs short and
wraps around, and a few good samples repeat. A scan removes the guesswork: it decodes every sample once
with the loader's own validation (the batch type's `decode`; `decode_sample` by default), keeps the storage
index of each usable one, and the source then plans with *usable* counts and reads exactly those samples:

    source = scan_source(open_source("shards/"))       # data.scan: true does this in prepare_data
    source.unit_sizes()                                  # usable samples per unit
    source.scan.usable, source.scan.skipped              # the totals, and the bad input by kind

Every raw record of a unit is still read once per epoch (the bad ones between two usable samples go to the
piece that holds the next usable one, those after the last to the last piece), so the loader keeps counting
bad input per epoch. Under torch.distributed each rank scans every W-th unit and the results are gathered.
The cost is one decode pass over the data; for very large data turn it off (`data.scan: false`) and accept
that an epoch's length comes from the listed counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from clipforge.data.samples import DEFAULT_MAX_PIXELS, SkipCounter, add_counts, decode_sample


@dataclass
class ScanIndex:
    """Usable samples as a compressed row list: unit u's usable storage indices are
    `indices[offsets[u]:offsets[u + 1]]`, in increasing order."""

    offsets: np.ndarray  # [U + 1] int64
    indices: np.ndarray  # [usable] int64, storage index of each usable sample within its unit
    listed: int  # samples the source listed
    skipped: dict[str, int] = field(default_factory=dict)  # bad input met while scanning, by kind

    @property
    def usable(self) -> int:
        return int(self.offsets[-1])

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def unit(self, unit: int) -> np.ndarray:
        return self.indices[self.offsets[unit] : self.offsets[unit + 1]]

    def raw_range(self, unit: int, first: int, stop: int) -> tuple[int, int | None]:
        """Storage range [start, stop) to read for usable samples first..stop-1 of a unit (None: to its end)."""
        good = self.unit(unit)
        start = 0 if first == 0 else int(good[first - 1]) + 1
        end = None if stop >= len(good) else int(good[stop - 1]) + 1
        return start, end


def _decode_with_regions(record: dict, counter: SkipCounter, max_pixels: int):
    return decode_sample(record, counter, max_pixels, with_regions=True)


def _scan_units(source, units, max_pixels: int, strict: bool, decode) -> tuple[dict[int, list[int]], dict]:
    counter = SkipCounter(strict=strict)
    usable: dict[int, list[int]] = {}
    sizes = source.unit_sizes()
    for unit in units:
        good = []
        for record in source.read_unit(unit, 0, int(sizes[unit]), counter):
            if decode(record, counter, max_pixels) is not None:
                good.append(int(record["__index__"]))
        usable[unit] = good
    return usable, dict(counter)


def scan_source(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False,
                decode: Callable | None = None):
    """A copy of `source` that plans and reads its usable samples only (see the module docstring).
    `decode(record, counter, max_pixels)` is the batch type's (default: `decode_sample` with regions).
    With `strict` (data.strict) the first bad sample raises DataError."""
    if source.scan is not None:
        return source
    num_units = len(source.unit_sizes())
    is_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_dist else (0, 1)
    usable, skipped = _scan_units(source, range(rank, num_units, world), max_pixels, strict,
                                  decode or _decode_with_regions)
    if is_dist:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, (usable, skipped))
        usable, skipped = {}, {}
        for part_usable, part_skipped in parts:
            usable.update(part_usable)
            add_counts(skipped, part_skipped)
    counts = np.array([len(usable[u]) for u in range(num_units)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.array([i for u in range(num_units) for i in usable[u]], dtype=np.int64)
    index = ScanIndex(offsets, indices, listed=int(source.num_samples), skipped=dict(sorted(skipped.items())))
    return replace(source, scan=index)
