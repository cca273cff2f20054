"""Data-layer hardening: read-time faults counted once (split over readers, and replayed on resume), paths that
are not regular files, elongated images, symlinked ImageFolder subfolders, and `data synth --out FILE`.

Every test here failed on the code before its fix (see each docstring for what used to happen)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from test_reliability_data import _encode, _noise, _preprocess, _tokenizer
from test_shards import _tar_with

from clipforge.cli import main
from clipforge.config import load_config
from clipforge.data.pipeline import build_loader
from clipforge.data.readers import read_image_folder
from clipforge.data.samples import MAX_ASPECT_RATIO, SkipCounter, decode_sample
from clipforge.data.shards import iter_tar_samples
from clipforge.data.sources import open_source
from clipforge.errors import DataError
from clipforge.eval.datasets import EncodedImages
from clipforge.eval.file_datasets import csv_dataset, image_folder_dataset, webdataset_dataset

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    return _encode(_noise(seed, 8))


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _sample(key: str, seed: int, *extra: tuple[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_member(f"{key}.png", _png(seed)), _member(f"{key}.txt", f"caption {key}".encode()),
            *(_member(name, data) for name, data in extra)]


def _cut_in_data_of(shard: Path, member_name: str) -> None:
    """Truncate `shard` in the middle of one member's data (how a crashed copy leaves it)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name == member_name)
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])


# ----------------------------------------------------------------------------------------------------------
# 1. Read-time faults (found while reading the tar, not while decoding) are counted once per epoch


def _faulty_shard(path: Path) -> dict[str, int]:
    """12 listed samples with a fault of every read-time kind spread over them; returns the expected counts."""
    members = []
    for i in range(12):
        key = "k-001" if i == 6 else f"k-{i:03d}"  # sample 6 reuses sample 1's key
        extra = [(f"k-{i:03d}.txt", b"a second caption")] if i == 1 else []
        members += _sample(key, i, *extra)
        if i == 3:
            members.append(_member("stray-member-without-extension", b"?"))
    _tar_with(path, members)
    _cut_in_data_of(path, "k-009.png")
    return {"duplicate_member": 1, "member_no_extension": 1, "duplicate_key": 1, "shard_truncated": 1}


def test_a_shard_read_in_pieces_counts_each_read_time_fault_once(tmp_path):
    """A shard split over workers or ranks used to report its faults once per piece: every reader walks the
    headers before its start, and counted what it walked past (2 workers: {'duplicate_key': 2, ...})."""
    shard = tmp_path / "faulty.tar"
    expected = _faulty_shard(shard)
    whole = SkipCounter()
    assert len(list(iter_tar_samples(str(shard), whole))) == 8  # 9 before the cut, one a duplicate key
    assert whole == expected
    for cuts in ([4], [1, 7], [2, 3, 10], [6], [9], [10, 11]):
        bounds = [0, *cuts, 12]
        counter = SkipCounter()
        keys = [r["__key__"] for a, b in zip(bounds, bounds[1:]) for r in iter_tar_samples(str(shard), counter, a, b)]
        assert keys == [f"k-{i:03d}" for i in (0, 1, 2, 3, 4, 5, 7, 8)], cuts
        assert counter == expected, cuts
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar archive" * 100)
    counter = SkipCounter()
    for a, b in ((0, 2), (2, 5)):  # listed as 5 samples by a sizes.json, read by two workers
        assert list(iter_tar_samples(str(garbage), counter, a, b)) == []
    assert counter == {"shard_unreadable": 1}


def _read_time_fault_shards(folder: Path) -> dict[str, int]:
    """3 shards of 8 listed samples (sizes.json) whose faults are found while reading the tar: duplicate members
    in every shard's first half (so a split shard always holds one), a stray member, a duplicate key, a shard
    cut in its 6th sample; plus one decode-time fault. Returns the counts one epoch must report."""
    folder.mkdir()
    a = []
    for i in range(8):
        a += _sample(f"a-{i:03d}", 100 + i, *([(f"a-{i:03d}.txt", b"again")] if i in (1, 5) else []))
        if i == 2:
            a.append(_member("a-stray", b"?"))
    a = [_member("a-006.png", b"") if info.name == "a-006.png" else (info, data) for info, data in a]  # decode-time
    _tar_with(folder / "a.tar", a)
    b = []
    for i in range(8):
        key = "b-001" if i == 4 else f"b-{i:03d}"
        b += _sample(key, 200 + i, *([(f"{key}.png", _png(9))] if i == 0 else []))
    _tar_with(folder / "b.tar", b)
    c = []
    for i in range(8):
        c += _sample(f"c-{i:03d}", 300 + i, *([(f"c-{i:03d}.txt", b"again")] if i == 1 else []))
    _tar_with(folder / "c.tar", c)
    _cut_in_data_of(folder / "c.tar", "c-005.png")
    (folder / "sizes.json").write_text(json.dumps({"a.tar": 8, "b.tar": 8, "c.tar": 8}))
    return {"duplicate_member": 4, "member_no_extension": 1, "duplicate_key": 1, "shard_truncated": 1,
            "zero_byte_image": 1}


@pytest.fixture(scope="module")
def read_faults(tmp_path_factory) -> tuple[str, dict[str, int]]:
    folder = tmp_path_factory.mktemp("read-faults") / "shards"
    expected = _read_time_fault_shards(folder)
    return str(folder), expected


def _loader(spec: str, workers: int, position=None, rank: int = 0, world_size: int = 1):
    config = load_config(None, ["data.batch_size=4", f"data.workers={workers}", "data.shuffle_buffer=5", "seed=11"])
    return build_loader(open_source(spec), config, preprocess=_preprocess(), tokenizer=_tokenizer, epoch=2,
                        position=position, rank=rank, world_size=world_size)


def _total(batches) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for batch in batches:
        counts.update(batch.skipped)
    return dict(counts)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_read_time_faults_reports_what_an_uninterrupted_run_reports(read_faults, workers):
    """Only decode-time faults were tested on resume; faults met while reading the tar are replayed without
    being decoded, so they are the ones a replay could count twice (then the first resumed batch reported
    {'duplicate_member': ...} where the uninterrupted run had {})."""
    spec, expected = read_faults
    loader = _loader(spec, workers)
    full = list(loader)
    assert len(full) == 6
    assert _total(full) == loader.skipped == expected  # each fault once in the epoch
    for k in (0, 2, 4):
        position = json.loads(json.dumps(loader.position_after(full[k])))
        resumed_loader = _loader(spec, workers, position=position)
        resumed = list(resumed_loader)
        assert [b.keys for b in resumed] == [b.keys for b in full[k + 1:]]
        assert [b.skipped for b in resumed] == [b.skipped for b in full[k + 1:]], k
        assert add(_total(full[: k + 1]), resumed_loader.skipped) == expected, k


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return dict(collections.Counter(a) + collections.Counter(b))


def test_one_shard_is_shuffled_anew_every_epoch_and_alike_for_the_same_epoch(tmp_path):
    """With a single shard the unit order cannot change, so only the shuffle buffer's (seed, epoch, ...) seed
    reorders an epoch (benchmarks/mutations.py found no test that would notice it ignoring the epoch)."""
    _tar_with(tmp_path / "only.tar", [member for i in range(24) for member in _sample(f"s{i:02d}", i)])
    config = load_config(None, ["data.batch_size=4", "data.workers=0", "data.shuffle_buffer=8", "seed=5"])

    def order(epoch: int) -> list[str]:
        loader = build_loader(open_source(str(tmp_path)), config, preprocess=_preprocess(), tokenizer=_tokenizer,
                              epoch=epoch)
        return [key for batch in loader for key in batch.keys]

    first, again, second = order(0), order(0), order(1)
    assert first == again and sorted(first) == sorted(second) == [f"s{i:02d}" for i in range(24)]
    assert first != second


def test_two_ranks_report_each_read_time_fault_once(read_faults):
    """A rank's stretch starts in the middle of a shard: both ranks used to count the faults before the cut."""
    spec, expected = read_faults
    totals: dict[str, int] = {}
    for rank in (0, 1):
        loader = _loader(spec, 0, rank=rank, world_size=2)
        list(loader)
        totals = add(totals, loader.skipped)
    assert totals == expected


# ----------------------------------------------------------------------------------------------------------
# 2. Paths that are not regular files, and files too large to read


HOSTILE_ROWS_SCRIPT = textwrap.dedent("""
    import json, sys
    from clipforge.data.readers import read_csv
    from clipforge.data.samples import SkipCounter, decode_sample
    table = read_csv(sys.argv[1])
    counter = SkipCounter()
    kept = [decode_sample(table.record(i), counter) for i in range(len(table))]
    print(json.dumps({"kept": [s.caption for s in kept if s is not None], "skipped": dict(counter)}))
""")


def _limit_memory() -> None:  # runs in the child: reading /dev/zero whole ends in MemoryError, not a dead host
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_csv_rows_naming_a_fifo_a_device_a_folder_or_a_huge_file_are_skipped_and_counted(tmp_path):
    """A row naming a FIFO used to block training forever; /dev/zero was read until memory ran out; a 65 MiB
    file was read whole. Run in a child process with a time and memory limit, so the old code fails, not hangs."""
    (tmp_path / "good.png").write_bytes(_png(1))
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    with open(tmp_path / "huge.png", "wb") as handle:  # sparse: no disk space used
        handle.truncate(65 * 1024 * 1024)
    rows = ["good.png,a good image", "fifo.png,a fifo", "/dev/zero,endless zeros", "folder.png,a folder",
            "huge.png,65 MiB of nothing", "gone.png,missing"]
    (tmp_path / "rows.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OPENBLAS_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", HOSTILE_ROWS_SCRIPT, str(tmp_path / "rows.csv")], env=env,
                              capture_output=True, text=True, timeout=30, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("reading the CSV's images hung (a FIFO was opened for reading)")
    assert done.returncode == 0, done.stderr[-1500:]
    result = json.loads(done.stdout)
    assert result == {"kept": ["a good image"],
                      "skipped": {"not_a_regular_file": 3, "file_too_large": 1, "missing_file": 1}}


def _within(seconds: float, work, fifos: list[Path]):
    """Run `work()` in a thread. If it still runs after `seconds`, release whatever reader is blocked on one of
    `fifos` (opening a FIFO for writing and closing it gives its reader an end of file), and fail."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=work()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader on it at the moment
                    pass
            thread.join(0.05)
        pytest.fail(f"still blocked after {seconds} s on one of {[f.name for f in fifos]}")
    return result["value"]


def test_a_fifo_among_image_folder_images_is_counted_by_the_loader_and_skipped_in_evaluation(tmp_path):
    """A FIFO named like an image used to vanish from an ImageFolder silently; as a CSV row it blocked the loader."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(_png(i + (10 if name == "dog" else 0)))
    fifo = tmp_path / "dog" / "pipe.png"
    os.mkfifo(fifo)
    config = load_config(None, ["data.batch_size=2", "data.workers=0", "data.shuffle_buffer=0"])

    def one_epoch():
        loader = build_loader(open_source(str(tmp_path)), config, preprocess=_preprocess(), tokenizer=_tokenizer)
        return sorted(k for batch in loader for k in batch.keys), loader.skipped

    keys, skipped = _within(20, one_epoch, [fifo])
    assert skipped == {"not_a_regular_file": 1} and len(keys) == 6
    with pytest.warns(UserWarning, match="not_a_regular_file"):
        dataset = image_folder_dataset(tmp_path)
    assert len(dataset) == 6 and dataset.info["skipped"] == {"not_a_regular_file": 1}
    assert "dog/pipe.png" not in dataset.keys


def test_a_fifo_named_like_a_shard_or_a_manifest_is_unreadable_not_a_hang(tmp_path):
    """Listing and reading shards opened every `*.tar` (and sizes.json) found, a FIFO among them included."""
    _tar_with(tmp_path / "a.tar", [member for i in range(4) for member in _sample(f"a{i}", i)])
    os.mkfifo(tmp_path / "b.tar")
    os.mkfifo(tmp_path / "sizes.json")
    config = load_config(None, ["data.batch_size=2", "data.workers=0", "data.shuffle_buffer=0"])

    def one_epoch():
        loader = build_loader(open_source(str(tmp_path)), config, preprocess=_preprocess(), tokenizer=_tokenizer)
        return sorted(k for batch in loader for k in batch.keys), loader.skipped

    keys, skipped = _within(20, one_epoch, [tmp_path / "b.tar", tmp_path / "sizes.json"])
    assert keys == ["a0", "a1", "a2", "a3"] and skipped == {"shard_unreadable": 1}


# ----------------------------------------------------------------------------------------------------------
# 3. Elongated images: one guard for training and evaluation


def _strip_png(width: int, height: int) -> bytes:
    return _encode(Image.new("RGB", (width, height), (200, 30, 30)))


def test_a_100000x1_png_is_skipped_in_training_and_in_evaluation_never_decoded(tmp_path):
    """375 bytes, 100000 pixels: under the pixel limit, yet ~3 GB once resized for evaluation."""
    strip = _strip_png(100_000, 1)
    assert len(strip) < 1000
    counter = SkipCounter()
    assert decode_sample({"__key__": "strip", "png": strip, "txt": b"a strip"}, counter) is None
    assert counter == {"image_too_elongated": 1}
    # the bound is MAX_ASPECT_RATIO:1, both ways round
    for size, kept in (((2 * MAX_ASPECT_RATIO, 2), True), ((2, 2 * MAX_ASPECT_RATIO), True),
                       ((2 * MAX_ASPECT_RATIO + 1, 2), False), ((2, 2 * MAX_ASPECT_RATIO + 1), False)):
        sample = decode_sample({"__key__": "s", "png": _strip_png(*size), "txt": b"x"}, SkipCounter())
        assert (sample is not None) == kept, size

    # evaluation: ImageFolder, CSV and shards skip it with a counted reason; the decoder refuses it too
    (tmp_path / "folder" / "stripes").mkdir(parents=True)
    (tmp_path / "folder" / "stripes" / "strip.png").write_bytes(strip)
    (tmp_path / "folder" / "stripes" / "fine.png").write_bytes(_png(3))
    with pytest.warns(UserWarning, match="image_too_elongated"):
        folder = image_folder_dataset(tmp_path / "folder")
    assert folder.keys == ["stripes/fine.png"] and folder.info["skipped"] == {"image_too_elongated": 1}
    (tmp_path / "rows.csv").write_text("filepath,caption\nfolder/stripes/strip.png,a strip\n"
                                       "folder/stripes/fine.png,fine\n")
    with pytest.warns(UserWarning, match="image_too_elongated"):
        rows = csv_dataset(tmp_path / "rows.csv")
    assert rows.keys == ["fine.png"] and rows.captions == [["fine"]]
    _tar_with(tmp_path / "strip.tar", [_member("s0.png", strip), _member("s0.txt", b"a strip"),
                                       *_sample("s1", 4)])
    with pytest.warns(UserWarning, match="image_too_elongated"):
        shards = webdataset_dataset(str(tmp_path / "strip.tar"))
    assert shards.keys == ["s1"] and shards.info["skipped"] == {"image_too_elongated": 1}
    with pytest.raises(DataError, match="image_too_elongated"):
        EncodedImages([strip], ["strip"])[0]


# ----------------------------------------------------------------------------------------------------------
# 4. Symlinked ImageFolder subfolders


def test_image_folder_follows_symlinked_folders_and_ends_a_symlink_loop(tmp_path):
    """Images under a symlinked subfolder used to be dropped silently (pathlib's rglob does not follow links)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "more_cats").mkdir(parents=True)
    (elsewhere / "birds").mkdir()
    for name in ("b.png", "c.png"):
        (elsewhere / "more_cats" / name).write_bytes(_png(len(name)))
    (elsewhere / "birds" / "e.png").write_bytes(_png(5))
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "a.png").write_bytes(_png(1))
    (root / "dog" / "d.png").write_bytes(_png(4))
    (root / "cat" / "more").symlink_to(elsewhere / "more_cats", target_is_directory=True)
    (root / "bird").symlink_to(elsewhere / "birds", target_is_directory=True)  # a symlinked class folder
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)  # dog/loop/loop/... forever
    table = read_image_folder(root)
    listed = [(table.classnames[label], str(Path(path).relative_to(root)))
              for path, label in zip(table.image_paths, table.labels)]
    assert listed == [("bird", "bird/e.png"), ("cat", "cat/a.png"), ("cat", "cat/more/b.png"),
                      ("cat", "cat/more/c.png"), ("dog", "dog/d.png")]
    dataset = image_folder_dataset(root)
    assert dataset.keys == [path for _, path in listed] and dataset.labels == [0, 1, 1, 1, 2]
    assert open_source(str(root)).num_samples == 5


# ----------------------------------------------------------------------------------------------------------
# 5. `clipforge data synth --out FILE`


@pytest.mark.parametrize("where", ["the file", "below the file"])
def test_synth_into_an_existing_file_is_one_line_exit_2(tmp_path, capsys, where):
    """Used to end in a FileExistsError / NotADirectoryError traceback."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    out = existing if where == "the file" else existing / "shards"
    code = main(["data", "synth", "--out", str(out), "--num", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("clipforge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(out) in err
    assert existing.read_text() == "keep me"
