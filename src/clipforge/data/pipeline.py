"""The training data pipeline: resolve the configured data, and build a deterministic, resumable loader.

    sources = prepare_data(config)
    loader = build_loader(sources.train, config, batch_type=ImageTextBatch, preprocess=preprocess,
                          tokenizer=tokenizer, epoch=e, rank=r, world_size=W, position=None)
    for batch in loader:            # len(loader) batches per epoch on every rank
        ...                         # batch.skipped: bad samples met while building it, by kind
        state = loader.position_after(batch).to_dict()   # JSON-able; DataPosition.from_dict(state) resumes

How an epoch is split over ranks and workers, shuffled and wrapped: see streams.py. Each DataLoader
worker runs one *logical worker* and batches by itself (DataLoader(batch_size=None)); batch i of the
rank comes from logical worker i % L, which is also the order in which torch's DataLoader hands
batches out (it polls its workers round robin; a small reorder buffer here makes sure of it). With
data.workers = 0 the same L = 1 stream runs in the main process.

Exact resume: a DataPosition records, for every logical worker, how many raw records its shuffle
buffer had emitted when the batch was made, and how many batches the rank had consumed. A loader built
from it replays each worker's raw stream (reading tar headers/bytes, but decoding no image) up to that
point, forgets the bad-input counts of the replayed part (they were reported before), and rotates the
worker ids so the next batch comes from the right worker. The batches that follow are exactly those an
uninterrupted run would have produced. Every source of randomness is a seed derived from (seed, epoch,
rank, worker) or (seed, epoch, sample key), never from timing or the global RNG.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.batches import ImageTextBatch
from clipforge.data.generate import generate_synth_shards
from clipforge.data.samples import DEFAULT_MAX_PIXELS, SkipCounter, add_counts
from clipforge.data.scan import scan_source
from clipforge.data.sources import DataSource, open_source
from clipforge.data.streams import PASS_END, CounterRedirect, EpochPlan, plan_epoch, worker_records
from clipforge.data.transforms import BatchBuilder, sample_seed
from clipforge.errors import DataError


@dataclass
class DataSources:
    train: DataSource
    val: DataSource | None


# ----------------------------------------------------------------------------------------------------------
# Resolving the configured data


def _synth_folder(config, split: str):
    return config.run_dir / "data" / split


def _generate_synth(config, split: str, num: int, progress) -> None:
    synth = config.data.synth
    # data.synth.classes "all": the training scenes' main objects come from every class (a generative model must
    # see every class's captions); validation stays on the base classes
    content = "all" if split == "train" and synth.classes == "all" else split
    generate_synth_shards(
        _synth_folder(config, split), num=num, split=content, seed=synth.seed, image_size=synth.image_size,
        shard_size=synth.shard_size, omit_fraction=synth.omit_fraction,
        long_tail=synth.long_tail if split == "train" else 0.0,  # evaluation stays balanced
        progress=progress,
    )


def _open_configured(config, key: str, spec: str) -> DataSource:
    data = config.data
    try:
        source = open_source(spec, data.format, data.csv_image_key, data.csv_caption_key, data.csv_separator)
    except DataError as err:
        raise DataError(f"data.{key}: {err}") from None
    unreadable = sum(shard.unreadable for shard in source.shards)
    if source.num_samples - unreadable == 0:
        note = f" ({unreadable} shard(s) cannot be opened)" if unreadable else ""
        raise DataError(f"data.{key}: no samples in '{spec}'{note}")
    return source


def check_batch_size(num_samples: int, batch_size: int, world_size: int, spec: str, size: str = "") -> None:
    """The one batch-size check: every rank needs at least one full batch per epoch."""
    if num_samples < batch_size * world_size:
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        raise DataError(f"data.batch_size ({batch_size}){ranks} is larger than the training set '{spec}' "
                        f"({size or f'{num_samples} samples'}): no full batch per epoch")


def prepare_data(config, progress: Callable[[int], None] | None = None, world_size: int = 1,
                 decode: Callable | None = None) -> DataSources:
    """Resolve data.train / data.val into DataSources; generate SynthScenes shards into run_dir/data/{train,val}
    when data.train is 'synth' (skipped when an identical set is already there). The data scan decodes with
    `decode` (the batch type's, e.g. `objective.batch_type.decode`; default: scan_source's).

    Under torch.distributed, rank 0 generates and the others wait. Raises DataError (one line) for a
    missing path, an empty dataset, or a batch size larger than the training set.
    """
    data = config.data
    train_synth = data.train == "synth"
    val_synth = data.val == "synth" or (data.val is None and train_synth)
    # configured paths are checked before any SynthScenes shards are written into the run folder, so a missing
    # path leaves no run folder behind
    train = None if train_synth else _open_configured(config, "train", data.train)
    val = None if val_synth or data.val is None else _open_configured(config, "val", data.val)
    if train_synth:  # before any shard is written: a batch larger than the set to generate fails now
        check_batch_size(data.synth.num_train, data.batch_size, world_size, "synth",
                         f"data.synth.num_train={data.synth.num_train}")
    if train_synth or val_synth:
        is_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not is_dist or torch.distributed.get_rank() == 0:
            if train_synth:
                _generate_synth(config, "train", data.synth.num_train, progress)
            if val_synth:
                _generate_synth(config, "val", data.synth.num_val, progress)
        if is_dist:
            torch.distributed.barrier()
    if train_synth:
        train = open_source(str(_synth_folder(config, "train")), "wds")
    if val_synth:
        val = open_source(str(_synth_folder(config, "val")), "wds")
    size = f"{train.num_samples} samples"
    if data.scan:
        train = scan_source(train, strict=data.strict, decode=decode)
        if train.scan.usable == 0:
            raise DataError(f"data.train: no usable samples in '{train.spec}' (all {train.num_samples} were "
                            f"skipped: {train.scan.skipped})")
        size = f"{train.scan.usable} usable of {size}"
    check_batch_size(int(train.unit_sizes().sum()), data.batch_size, world_size, train.spec, size)
    return DataSources(train=train, val=val)


# ----------------------------------------------------------------------------------------------------------
# Positions


class DataPosition(dict):
    """Where a rank's epoch stream stands. A plain dict underneath, so json.dumps takes it as is; the
    dict read back from JSON can be passed to build_loader directly (or through from_dict)."""

    FIELDS = ("epoch", "batches_done", "emitted", "rank", "world_size", "batch_size", "num_samples")

    def __init__(self, epoch: int, batches_done: int, emitted: list[int], rank: int = 0, world_size: int = 1,
                 batch_size: int = 0, num_samples: int = 0):
        super().__init__(epoch=epoch, batches_done=batches_done, emitted=list(emitted), rank=rank,
                         world_size=world_size, batch_size=batch_size, num_samples=num_samples)

    epoch = property(lambda self: self["epoch"])
    batches_done = property(lambda self: self["batches_done"])  # batches of this epoch the rank consumed
    emitted = property(lambda self: self["emitted"])  # [L] records each logical worker's buffer emitted
    rank = property(lambda self: self["rank"])
    world_size = property(lambda self: self["world_size"])
    batch_size = property(lambda self: self["batch_size"])
    num_samples = property(lambda self: self["num_samples"])

    @property
    def num_workers(self) -> int:
        return len(self["emitted"])

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))

    @classmethod
    def from_dict(cls, body: dict) -> DataPosition:
        try:
            position = cls(**{name: body[name] for name in cls.FIELDS})
            values = [position[name] for name in cls.FIELDS if name != "emitted"] + position.emitted
            if not position.emitted or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data position {body!r} is malformed") from None
        return position


# ----------------------------------------------------------------------------------------------------------
# The per-epoch dataset (runs inside DataLoader workers)


def _identity(batch):
    return batch


@dataclass
class _Settings:
    seed: int
    epoch: int
    rank: int
    batch_size: int
    shuffle_buffer: int
    strict: bool
    max_pixels: int
    decode: Callable  # the batch type's decode(record, counter, max_pixels)


@dataclass
class _EpochDataset(IterableDataset):
    source: DataSource
    plan: EpochPlan
    settings: _Settings
    builder: BatchBuilder
    batches_done: int
    start_emitted: list[int] = field(default_factory=list)

    @property
    def num_logical(self) -> int:
        return len(self.plan.quotas)

    def logical_for_slot(self, slot: int) -> int:
        """Physical worker `slot` runs the logical worker whose batch is next, then the one after, ..."""
        return (self.batches_done + slot) % self.num_logical

    def _done_by(self, worker: int) -> int:
        count = self.num_logical
        return self.batches_done // count + (1 if worker < self.batches_done % count else 0)

    def __iter__(self) -> Iterator[ImageTextBatch]:
        info = get_worker_info()
        if info is not None:
            yield from self._worker_batches(self.logical_for_slot(info.id))
            return
        # in the main process: all logical workers, round robin, like the DataLoader would poll them
        streams = [self._worker_batches(self.logical_for_slot(s)) for s in range(self.num_logical)]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch

    def _worker_batches(self, worker: int) -> Iterator[ImageTextBatch]:
        s = self.settings
        done = self._done_by(worker)
        remaining = self.plan.quotas[worker] - done
        if remaining <= 0:
            return
        counter = SkipCounter(strict=s.strict)  # what this worker reports, batch by batch
        already_counted = SkipCounter()  # replayed records, and wrap-around passes: counted before
        redirect = CounterRedirect(already_counted)
        records = worker_records(self.source, self.plan, worker, seed=s.seed, epoch=s.epoch, rank=s.rank,
                                 shuffle_buffer=s.shuffle_buffer, counter=redirect)
        emitted = self.start_emitted[worker] if self.start_emitted else 0
        replayed = passes = 0
        while replayed < emitted:
            if next(records) is PASS_END:
                passes += 1
            else:
                replayed += 1
        redirect.target = counter if passes == 0 else already_counted
        valid_in_pass = 1 if replayed else 0
        for index in range(done, done + remaining):
            samples = []
            while len(samples) < s.batch_size:
                record = next(records)
                if record is PASS_END:
                    if valid_in_pass == 0 and passes >= 2:  # a pass over the whole epoch stream
                        raise DataError(f"no usable sample in {self.source.spec}: every sample was skipped "
                                        f"({dict(counter) or dict(already_counted)})")
                    valid_in_pass = 0
                    passes += 1
                    redirect.target = already_counted
                    continue
                emitted += 1
                sample = s.decode(record, redirect.target, s.max_pixels)
                if sample is not None:
                    samples.append(sample)
                    valid_in_pass += 1
            batch = self.builder(samples)
            batch.skipped = counter.take()
            batch.position = {"worker": worker, "index": index, "emitted": emitted}
            yield batch


# ----------------------------------------------------------------------------------------------------------
# The loader


def _one_line(err: Exception) -> str:
    """DataLoader re-raises worker errors with the worker traceback in the message: keep the last line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    prefix = "clipforge.errors.DataError: "
    return last.split(prefix, 1)[1] if prefix in last else last


class Loader:
    """Iterates one epoch of one rank: `len(self)` batches in total (a resumed loader yields the rest)."""

    def __init__(self, dataset: _EpochDataset, num_workers: int, generator_seed: int, pin_memory: bool,
                 position: DataPosition):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.start = position
        self.generator_seed = generator_seed
        self.skipped: dict[str, int] = {}  # totals over the batches yielded so far
        self.batches_done = position.batches_done

    def __len__(self) -> int:
        return self.dataset.plan.batches_per_rank

    @property
    def remaining(self) -> int:
        return len(self) - self.batches_done

    @property
    def epoch(self) -> int:
        return self.start.epoch

    def _batches(self) -> Iterator[ImageTextBatch]:
        if self.num_workers == 0:
            return iter(self.dataset)
        # our own generator, so creating the iterator never draws from the global torch RNG
        generator = torch.Generator().manual_seed(self.generator_seed)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, generator=generator, persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> Iterator[ImageTextBatch]:
        count = self.dataset.num_logical
        emitted = list(self.start.emitted)
        index = self.start.batches_done
        self.batches_done, self.skipped = index, {}
        pending: dict[tuple[int, int], ImageTextBatch] = {}
        batches = self._batches()
        try:
            while index < len(self):
                expected = (index % count, index // count)
                while expected not in pending:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise RuntimeError(f"data loader stopped after {index} of {len(self)} batches") from None
                    except DataError as err:
                        raise DataError(_one_line(err)) from None
                    pending[(batch.position["worker"], batch.position["index"])] = batch
                batch = pending.pop(expected)
                emitted[expected[0]] = batch.position["emitted"]
                batch.position = {"epoch": self.epoch, "batch_index": index, "emitted": list(emitted)}
                add_counts(self.skipped, batch.skipped)
                index += 1
                self.batches_done = index
                yield batch
        finally:
            # Stop worker processes now (an error, or the caller stopped early). Left to garbage
            # collection, torch's shutdown can wait 5 s per worker on half-collected queues.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def position_after(self, batch: ImageTextBatch) -> DataPosition:
        """The position that resumes right after `batch` (a batch this loader yielded)."""
        where = batch.position
        if where.get("epoch") != self.epoch or "batch_index" not in where:
            raise ValueError("position_after needs a batch yielded by this loader")
        fields = dict(self.start, batches_done=where["batch_index"] + 1, emitted=list(where["emitted"]))
        return DataPosition(**fields)


def build_loader(
    source: DataSource,
    config,
    batch_type: type = ImageTextBatch,
    preprocess: Callable | None = None,
    tokenizer: Callable | None = None,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    position: DataPosition | dict | None = None,
    *,
    shuffle: bool = True,
    image_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pin_memory: bool = False,
) -> Loader:
    """A loader for one epoch of one rank. `shuffle=False` (evaluation) reads in storage order, with no
    shuffle buffer and no per-sample random seeding. `position` (from `position_after`) resumes."""
    if preprocess is None:
        raise TypeError("build_loader needs the model's preprocess")
    data = config.data
    batch_size = data.batch_size
    if position is not None:
        position = DataPosition.from_dict(position)
    num_samples = int(source.unit_sizes().sum())  # the samples an epoch is planned over (usable ones, if scanned)
    logical = position.num_workers if position is not None else max(1, data.workers)
    if position is not None:
        recorded = (position.epoch, position.rank, position.world_size, position.batch_size, position.num_samples)
        if recorded != (epoch, rank, world_size, batch_size, num_samples):
            raise DataError(
                f"cannot resume: the data position was recorded for (epoch, rank, world size, batch size, "
                f"samples) = {recorded}, now {(epoch, rank, world_size, batch_size, num_samples)}")
    else:
        position = DataPosition(epoch=epoch, batches_done=0, emitted=[0] * logical, rank=rank,
                                world_size=world_size, batch_size=batch_size, num_samples=num_samples)
    plan = plan_epoch(source.unit_sizes(), seed=config.seed, epoch=epoch, rank=rank, world_size=world_size,
                      num_workers=logical, batch_size=batch_size, shuffle=shuffle)
    if plan.batches_per_rank == 0:
        check_batch_size(num_samples, batch_size, world_size, source.spec)
        raise DataError(f"data '{source.spec}' gives no full batch of {batch_size} per rank and epoch")
    settings = _Settings(seed=config.seed, epoch=epoch, rank=rank, batch_size=batch_size,
                         shuffle_buffer=data.shuffle_buffer if shuffle else 0, strict=data.strict,
                         max_pixels=max_pixels, decode=batch_type.decode)
    builder = BatchBuilder(batch_type, preprocess, tokenizer, seed=config.seed, epoch=epoch,
                           max_regions=data.max_regions, randomize=shuffle, image_size=image_size)
    dataset = _EpochDataset(source, plan, settings, builder, position.batches_done, list(position.emitted))
    physical = logical if data.workers > 0 else 0
    return Loader(dataset, physical, sample_seed(config.seed, epoch, rank, "loader"), pin_memory, position)
