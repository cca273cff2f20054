"""Who reads what in an epoch: the deterministic split of a dataset over ranks and loader workers.

An epoch is one stream of samples: the source's units (tar shards, or single rows of a CSV or
ImageFolder) in an order shuffled by (seed, epoch), laid end to end. With T samples, W ranks, batch
size B and L logical workers per rank:

- rank r gets the contiguous stretch [r*T//W, (r+1)*T//W) of that stream (T % W samples are dropped),
  and makes `batches_per_rank = (T//W) // B` batches, the same number on every rank, so DDP never
  waits on a rank that ran out;
- those batches are dealt to the rank's logical workers round robin (batch i comes from worker
  i % L), and worker w reads its own contiguous part of the rank's stretch, sized in proportion to its
  batches; the rank's remainder (< B samples) is thus spread over the workers as spares that stand in
  for skipped samples.

So every sample is read by exactly one (rank, worker); shards are split at sample granularity, which
also works when there are fewer shards than ranks x workers (the classic webdataset hang). A worker
skips into the middle of a shard by walking tar headers, without reading the data it skips.

Each worker's records pass through a shuffle buffer seeded by (seed, epoch, rank, worker, pass). If a
worker's part runs short (bad samples were skipped, or a shard is truncated), it wraps around: pass 1
reads the rank's whole stretch, later passes the whole epoch stream, each with a new shuffle, so a few
samples repeat rather than a rank stalling (see `pass_span`).
The epoch length comes from the listed sample counts (manifest / sizes.json / tar headers): knowing how
many samples are *usable* would need decoding them all first. Bad input met again in a wrap-around pass
is not counted again (the loader counts it in pass 0 only).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clipforge.data.transforms import sample_seed
from clipforge.errors import DataError

PASS_END = object()  # marks the end of one pass over a worker's part


@dataclass
class EpochPlan:
    batches_per_rank: int
    quotas: list[int]  # [L] batches each logical worker makes
    spans: list[tuple[int, int]]  # [L] (start, stop) positions in the epoch stream
    order: np.ndarray  # [U] unit order of this epoch
    starts: np.ndarray  # [U + 1] stream position where each unit (in `order`) begins


def plan_epoch(unit_sizes: np.ndarray, *, seed: int, epoch: int, rank: int, world_size: int,
               num_workers: int, batch_size: int, shuffle: bool = True) -> EpochPlan:
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(sizes))
    else:
        order = np.arange(len(sizes))
    starts = np.concatenate([[0], np.cumsum(sizes[order])])
    per_rank = int(starts[-1]) // world_size
    batches = per_rank // batch_size
    quotas = [batches // num_workers + (1 if w < batches % num_workers else 0) for w in range(num_workers)]
    # worker parts in proportion to their quotas, so the rank's spare samples (per_rank - batches * B),
    # which stand in for skipped ones, are spread over the workers
    ends = [per_rank * sum(quotas[: w + 1]) // max(1, batches) for w in range(num_workers)]
    spans = [(rank * per_rank + (ends[w - 1] if w else 0), rank * per_rank + ends[w]) for w in range(num_workers)]
    return EpochPlan(batches, quotas, spans, order, starts)


def segments(plan: EpochPlan, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(unit, first, last+1) pieces covering stream positions [start, stop)."""
    if stop <= start:
        return
    i = int(np.searchsorted(plan.starts, start, side="right")) - 1
    while start < stop:
        unit_start, unit_stop = int(plan.starts[i]), int(plan.starts[i + 1])
        piece_stop = min(stop, unit_stop)
        if piece_stop > start:
            yield int(plan.order[i]), start - unit_start, piece_stop - unit_start
        start = piece_stop
        i += 1


def shuffled(records: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: fill `buffer_size` records, then emit a random one for each new record."""
    if buffer_size <= 1:
        yield from records
        return
    buffer: list = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = record
    while buffer:
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


class CounterRedirect:
    """Forwards skip()/note() to `target`, which can be swapped (replayed records are not counted twice)."""

    def __init__(self, target):
        self.target = target

    def skip(self, kind: str, where: str = "") -> None:
        self.target.skip(kind, where)

    def note(self, kind: str) -> None:
        self.target.note(kind)


def pass_span(plan: EpochPlan, worker: int, pass_index: int) -> tuple[int, int]:
    """Stream positions read in a pass: the worker's own part first; on wrap-around, the rank's whole
    stretch (so a worker whose own part is all bad borrows from its siblings); from the third pass on,
    the whole epoch stream (a rank whose stretch is all bad borrows from the other ranks)."""
    if pass_index == 0:
        return plan.spans[worker]
    if pass_index == 1:
        return plan.spans[0][0], plan.spans[-1][1]
    return 0, int(plan.starts[-1])


def worker_records(source, plan: EpochPlan, worker: int, *, seed: int, epoch: int, rank: int,
                   shuffle_buffer: int, counter: CounterRedirect) -> Iterator:
    """Endless raw records of one logical worker, pass after pass, with PASS_END after each pass.

    Which records come out depends only on (plan, worker, seed, epoch, rank), never on decoding, so a
    resumed loader can replay the stream without decoding it."""
    for pass_index in range(1 << 62):
        start, stop = pass_span(plan, worker, pass_index)
        rng = random.Random(sample_seed(seed, epoch, rank, worker, pass_index, "shuffle"))
        pieces = (
            record
            for unit, first, last in segments(plan, start, stop)
            for record in source.read_unit(unit, first, last, counter)
        )
        emitted = 0
        for record in shuffled(pieces, shuffle_buffer, rng):
            emitted += 1
            yield record
        if emitted == 0 and pass_index >= 2:
            raise DataError(f"no readable samples in {source.spec} (rank {rank} worker {worker})")
        yield PASS_END
