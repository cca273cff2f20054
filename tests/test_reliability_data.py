"""Corrupt data through the real loader: shards that mix every bad-input kind of the foundation issue, a
truncated tar and shards that cannot be opened. An epoch must never crash, never deliver a bad sample, count
every problem by kind, and deliver each good sample exactly once (with 0 and 2 loader workers).

`build_corrupt_dataset()` and `run_epoch()` are also used by benchmarks/reliability.py at a larger size.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import load_config
from clipforge.data.batches import RegionBatch
from clipforge.data.pipeline import build_loader
from clipforge.data.scan import scan_source
from clipforge.data.shards import write_shards
from clipforge.data.sources import open_source
from clipforge.errors import DataError

BATCH = 4


# ----------------------------------------------------------------------------------------------------------
# Building the data


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    at = data.index(b"IHDR")
    data[at + 4: at + 12] = struct.pack(">II", width, height)
    data[at + 17: at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at: at + 17])) & 0xFFFFFFFF)
    return bytes(data)


def _scrambled_png(seed: int) -> bytes:
    data = bytearray(_encode(_noise(seed, 32)))
    start = data.index(b"IDAT") + 8
    for i in range(start, min(start + 200, len(data) - 16)):
        data[i] ^= 0x5A
    return bytes(data)


def _bad_records(seed: int) -> list[tuple[str, dict]]:
    """(kind counted, record) for every sample-level bad-input kind; each record must be skipped."""
    png = _encode(_noise(seed))
    jpeg = _encode(_noise(seed).convert("RGB"), "JPEG")
    region = {"regions": [{"box": [1, 1, 8, 8], "caption": "a thing"}]}
    return [
        ("corrupt_image", {"png": _scrambled_png(seed), "txt": "scrambled pixels"}),
        ("corrupt_image", {"png": b"this is not an image at all" * 4, "txt": "text pretending to be a png"}),
        ("truncated_image", {"png": png[: len(png) // 2], "txt": "half a png"}),
        ("truncated_image", {"jpg": jpeg[: len(jpeg) // 2], "txt": "half a jpeg"}),
        ("zero_byte_image", {"png": b"", "txt": "empty file"}),
        ("image_too_large", {"png": _png_claiming(100_000, 100_000), "txt": "a pixel bomb"}),
        ("missing_image", {"txt": "no image member"}),
        ("missing_caption", {"png": png}),
        ("empty_caption", {"png": png, "txt": " \n\t "}),
        ("caption_not_utf8", {"png": png, "txt": b"caf\xe9 \xff\xfe"}),
        ("malformed_json", {"png": png, "txt": "ok", "json": b'{"regions": [{"box": [1, 2'}),
        ("malformed_json", {"png": png, "txt": "ok", "json": b"[1, 2, 3]"}),
        ("bad_label", {"png": png, "txt": "ok", "json": json.dumps({"label": "seven", **region}).encode()}),
    ]


def _repaired_records(seed: int) -> list[tuple[str, dict]]:
    """(kind counted, record) for samples that are kept: non-RGB images (converted) and bad boxes (dropped)."""
    base = _noise(seed)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    palette = base.convert("P")
    cmyk = _encode(base.convert("CMYK"), "JPEG")
    out = [
        ("converted_L", {"png": _encode(base.convert("L"))}),
        ("converted_LA", {"png": _encode(base.convert("LA"))}),
        ("converted_P", {"png": _encode(palette)}),
        ("converted_RGBA", {"png": _encode(base.convert("RGBA"))}),
        ("converted_CMYK", {"jpg": cmyk}),
        ("converted_I", {"png": _encode(grey16)}),  # 16-bit grey: 'I;16' or 'I' depending on Pillow
    ]
    boxes = [("box_negative", [8, 8, 2, 2]), ("box_nan", [float("nan"), 1, 4, 4]), ("box_zero_area", [3, 3, 3, 9]),
             ("box_outside", [40, 40, 50, 50]), ("box_malformed", [1, 2, 3]), ("box_malformed", "1,2,3,4")]
    for kind, box in boxes:
        regions = [{"box": box, "caption": "a broken box"}, {"box": [2, 2, 10, 10], "caption": "a good box"}]
        out.append((kind, {"png": _encode(base), "json": json.dumps({"regions": regions}).encode()}))
    regions = [{"box": [2, 2, 10, 10]}, {"box": [2, 2, 10, 10], "caption": "kept"}]
    out.append(("region_no_caption", {"png": _encode(base), "json": json.dumps({"regions": regions}).encode()}))
    for i, (_, record) in enumerate(out):
        record.setdefault("txt", f"a repaired sample {i}")
    return out


@dataclass
class CorruptSet:
    spec: str
    good: list[str]  # keys that must each be delivered once per epoch
    bad: list[str]  # keys that must never be delivered
    expected: dict[str, int]  # kind -> count, once per epoch
    unreadable_shards: int
    info: dict = field(default_factory=dict)


def build_corrupt_dataset(folder: Path, good: int = 40, copies: int = 1, seed: int = 0,
                          with_sizes: bool = True, unopenable: tuple[str, ...] = ("garbage", "folder")) -> CorruptSet:
    """A shard folder: `good` clean samples, `copies` of every bad and repaired kind spread among them, a truncated
    shard and the unopenable shards named in `unopenable` ('garbage' bytes, a 'folder' named .tar, 'no_permission').
    `with_sizes` writes sizes.json (as img2dataset does) so the readers know the counts without opening shards."""
    folder.mkdir(parents=True)
    stage = folder.parent / f".{folder.name}-stage"
    records, good_keys, bad_keys = [], [], []
    expected: collections.Counter = collections.Counter()
    for i in range(good):
        records.append({"__key__": f"g-{i:06d}", "png": _encode(_noise(seed * 100_003 + i)), "txt": f"good {i}"})
        good_keys.append(f"g-{i:06d}")
    extra = []
    for copy in range(copies):
        for j, (kind, record) in enumerate(_bad_records(seed + copy)):
            extra.append(({"__key__": f"b-{copy:03d}-{j:02d}", **record}, False))
            expected[kind] += 1
        for j, (kind, record) in enumerate(_repaired_records(seed + copy)):
            extra.append(({"__key__": f"r-{copy:03d}-{j:02d}", **record}, True))
            expected[kind] += 1
    rng = np.random.default_rng(seed)
    for record, is_good in extra:  # spread among the clean samples
        records.insert(int(rng.integers(0, len(records) + 1)), record)
        (good_keys if is_good else bad_keys).append(record["__key__"])
    write_shards(records, stage, shard_size=10, prefix="mixed")
    sizes = json.loads((stage / "sizes.json").read_text())

    # a shard cut in the middle of its 4th sample's image: 3 samples readable, the rest lost
    truncated = [{"__key__": f"t-{i:06d}", "png": _encode(_noise(900 + i, 32)), "txt": f"truncated {i}"}
                 for i in range(6)]
    write_shards(truncated, stage / "t", shard_size=6, prefix="truncated")
    tar_path = stage / "t" / "truncated-000000.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name == "t-000003.png")
    tar_path.write_bytes(tar_path.read_bytes()[: member.offset_data + member.size // 2])
    shutil.move(str(tar_path), folder / "truncated-000000.tar")
    sizes["truncated-000000.tar"] = 6
    good_keys += [f"t-{i:06d}" for i in range(3)]
    bad_keys += [f"t-{i:06d}" for i in range(3, 6)]
    expected["shard_truncated"] += 1
    for path in stage.glob("*.tar"):
        shutil.move(str(path), folder / path.name)
    shutil.rmtree(stage)

    for name in unopenable:
        target = folder / f"zz-{name}-000000.tar"
        if name == "garbage":
            target.write_bytes(np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        elif name == "folder":
            target.mkdir()
        elif name == "no_permission":
            target.write_bytes(b"\0" * 1024)
            target.chmod(0)
        sizes[target.name] = 5
        expected["shard_unreadable"] += 1
    if with_sizes:
        (folder / "sizes.json").write_text(json.dumps(sizes))
    return CorruptSet(str(folder), good_keys, bad_keys, dict(expected), len(unopenable),
                      info={"samples_in_headers": sum(sizes.values())})


# ----------------------------------------------------------------------------------------------------------
# Running an epoch


def _tokenizer(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def _preprocess():
    from open_clip.transform import image_transform

    return image_transform(16, is_train=False)


@dataclass
class EpochFigures:
    batches: int
    delivered: list[str]
    skipped: dict[str, int]  # sample- and region-level drops, repairs, shard problems
    error: str | None = None

    def counts(self) -> collections.Counter:
        return collections.Counter(self.delivered)


SAMPLE_KINDS = ("corrupt_image", "truncated_image", "zero_byte_image", "image_too_large", "missing_image",
                "missing_caption", "empty_caption", "caption_not_utf8", "malformed_json", "bad_label")


def run_epoch(dataset: CorruptSet, workers: int, epoch: int = 0, strict: bool = False,
              scan: bool = False) -> EpochFigures:
    """One epoch through the real loader; `scan` first learns which samples are usable (data.scan, the
    training default), without it the epoch is planned from the listed counts."""
    config = load_config(None, [f"data.batch_size={BATCH}", f"data.workers={workers}", "data.shuffle_buffer=16",
                                f"data.strict={str(strict).lower()}", "data.max_regions=2", "seed=3"])
    source = open_source(dataset.spec)
    if scan:
        source = scan_source(source, strict=strict)
    loader = build_loader(source, config, batch_type=RegionBatch, preprocess=_preprocess(), tokenizer=_tokenizer,
                          epoch=epoch)
    delivered, skipped = [], collections.Counter()
    batches = 0
    for batch in loader:
        assert len(batch) == BATCH  # every batch is full
        delivered += list(batch.keys)
        skipped.update(batch.skipped)
        batches += 1
    assert batches == len(loader)
    return EpochFigures(batches, delivered, dict(skipped))


def _normalise(counts: dict[str, int]) -> dict[str, int]:
    """16-bit grey is 'I;16' or 'I' by Pillow version: count both as converted_I; drop repair-only kinds."""
    out: collections.Counter = collections.Counter()
    for kind, n in counts.items():
        out["converted_I" if kind.startswith("converted_I") else kind] += n
    out.pop("box_clipped", None)
    return dict(out)


# ----------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> CorruptSet:
    return build_corrupt_dataset(tmp_path_factory.mktemp("corrupt") / "shards")


@pytest.fixture(scope="module")
def epochs(corrupt) -> dict[int, EpochFigures]:
    return {workers: run_epoch(corrupt, workers) for workers in (0, 2)}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_epoch_completes_and_never_delivers_a_bad_sample(corrupt, epochs, workers):
    figures = epochs[workers]
    counts = figures.counts()
    assert not set(counts) & set(corrupt.bad)
    assert set(counts) <= set(corrupt.good)
    assert figures.batches * BATCH == len(figures.delivered) > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_every_kind_of_bad_input_is_counted_by_kind(corrupt, epochs, workers):
    counted = _normalise(epochs[workers].skipped)
    assert set(counted) == set(corrupt.expected), (counted, corrupt.expected)
    for kind, n in corrupt.expected.items():
        assert counted[kind] >= n


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_input_is_counted_once_per_epoch(corrupt, epochs, workers):
    assert _normalise(epochs[workers].skipped) == corrupt.expected


@pytest.fixture(scope="module")
def scanned(corrupt):
    return scan_source(open_source(corrupt.spec))


@pytest.fixture(scope="module")
def scanned_epochs(corrupt) -> dict[int, EpochFigures]:
    return {workers: run_epoch(corrupt, workers, scan=True) for workers in (0, 2)}


def test_the_scan_finds_every_usable_sample_and_counts_every_bad_input_once(corrupt, scanned):
    assert scanned.scan.usable == len(corrupt.good)
    assert _normalise(scanned.scan.skipped) == corrupt.expected


@pytest.mark.parametrize("workers", [0, 2])
def test_each_good_sample_is_delivered_exactly_once_per_epoch(corrupt, scanned_epochs, workers):
    counts = scanned_epochs[workers].counts()
    repeated = {k: n for k, n in counts.items() if n > 1}
    never = [k for k in corrupt.good if k not in counts]
    assert not repeated, f"{len(repeated)} good samples delivered more than once"
    assert not set(counts) - set(corrupt.good)
    # only the samples that do not fill a last batch are left, fewer than one batch
    assert len(never) == len(corrupt.good) % BATCH, f"{len(never)} good samples never delivered"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_scanned_epoch_still_counts_the_bad_input_it_reads_once(corrupt, scanned_epochs, workers):
    """Every raw record of a shard with a usable sample is read once per epoch; shards with none are skipped
    whole (the scan counted them)."""
    counted = _normalise(scanned_epochs[workers].skipped)
    assert counted and all(counted[kind] <= corrupt.expected.get(kind, 0) for kind in counted)


def test_without_a_scan_a_short_worker_repeats_rather_than_stalls(corrupt, epochs):
    """data.scan: false plans from the listed counts: the epoch keeps its length, and when the bad samples
    outnumber the spares some good samples come twice (documented trade-off for data too large to scan)."""
    counts = epochs[0].counts()
    assert epochs[0].batches * BATCH > len(corrupt.good)
    assert any(n > 1 for n in counts.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_truncated_shard_gives_its_readable_samples(corrupt, epochs, workers):
    counts = epochs[workers].counts()
    assert all(counts[f"t-{i:06d}"] >= 1 for i in range(3))
    assert not any(counts[f"t-{i:06d}"] for i in range(3, 6))


def test_the_next_epoch_is_as_robust(corrupt):
    figures = run_epoch(corrupt, workers=0, epoch=1)
    assert not set(figures.counts()) & set(corrupt.bad)
    assert set(_normalise(figures.skipped)) == set(corrupt.expected)


@pytest.mark.parametrize("with_sizes", [True, False])
def test_a_shard_that_cannot_be_opened_is_counted_not_silently_dropped(tmp_path, with_sizes):
    kinds = ("garbage", "folder") + (("no_permission",) if os.geteuid() != 0 else ())
    dataset = build_corrupt_dataset(tmp_path / "shards", good=12, with_sizes=with_sizes, unopenable=kinds)
    figures = run_epoch(dataset, workers=0)
    assert figures.skipped.get("shard_unreadable", 0) >= len(kinds)


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_mode_stops_at_the_first_bad_sample_with_one_line(corrupt, workers):
    with pytest.raises(DataError) as caught:
        run_epoch(corrupt, workers=workers, strict=True)
    message = str(caught.value)
    assert "\n" not in message and "data.strict" in message and "Traceback" not in message


@pytest.mark.slow
def test_training_on_corrupt_shards_reports_the_skips_in_metrics_and_summary(corrupt, tmp_path):
    """The real loop over the corrupt set: no crash, counts in metrics.jsonl and summary.json."""
    from clipforge.engine.loop import train

    config = load_config(None, [
        "name=corrupt", f"output_dir={tmp_path / 'run'}", f"data.train={corrupt.spec}", f"data.batch_size={BATCH}",
        "data.shuffle_buffer=16", "model.name=clipforge-vit-micro", "train.max_steps=6", "train.warmup_steps=0",
        "train.log_every=1", "train.tensorboard=false", "train.progress=false", "train.device=cpu"])
    result = train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.steps == summary["steps"] == 6
    counted = summary["skipped_samples"]
    assert counted and set(_normalise(counted)) <= set(corrupt.expected)  # 6 batches meet some of the bad input
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "event" not in r][-1]
    assert {k[len("skipped/"):]: v for k, v in last.items() if k.startswith("skipped/")} == counted


def _scan_worker(rank: int, port: int, spec: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        index = scan_source(open_source(spec)).scan  # each rank decodes every other shard, then all-gather
        torch.save({"offsets": torch.from_numpy(index.offsets), "indices": torch.from_numpy(index.indices),
                    "skipped": index.skipped}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_scan_split_over_two_ranks_equals_the_single_process_scan(corrupt, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_scan_worker, args=(port, corrupt.spec, str(tmp_path)), nprocs=2, join=True)
    single = scan_source(open_source(corrupt.spec)).scan
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert np.array_equal(got["offsets"].numpy(), single.offsets)
        assert np.array_equal(got["indices"].numpy(), single.indices)
        assert got["skipped"] == single.skipped
