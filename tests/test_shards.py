"""Shard writing/reading round trips, safe reading of hostile or broken tars, URL resolution, CSV and
ImageFolder readers."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.data.documents import read_document
from clipforge.data.readers import read_csv, read_image_folder
from clipforge.data.samples import SkipCounter, decode_sample
from clipforge.data.shards import (
    count_tar_samples,
    expand_braces,
    iter_tar_samples,
    resolve_shards,
    write_shards,
)
from clipforge.data.sources import detect_format, open_source
from clipforge.data.synth import SynthScenes
from clipforge.errors import DataError


def _png(color=(10, 20, 30), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synth_records():
    return list(SynthScenes(image_size=32, seed=3, split="train").records(0, 14))


def _read_all(spec: str, counter=None) -> list[dict]:
    counter = counter if counter is not None else SkipCounter()
    return [r for shard in resolve_shards(spec) for r in iter_tar_samples(shard.url, counter)]


def test_round_trip_is_exact(tmp_path, synth_records):
    manifest = write_shards(iter(synth_records), tmp_path, shard_size=4, meta={"note": "x"})
    assert [s.num_samples for s in manifest.shards] == [4, 4, 4, 2]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {f"shard-{i:06d}.tar": n for i, n in
                                                                  enumerate([4, 4, 4, 2])}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind

    counter = SkipCounter()
    back = _read_all(str(tmp_path), counter)
    assert counter == {}
    assert [r["__key__"] for r in back] == [r["__key__"] for r in synth_records]
    assert [r["__index__"] for r in back] == [0, 1, 2, 3] * 3 + [0, 1]  # storage index within the shard
    for original, read in zip(synth_records, back):
        assert set(read) - {"__key__", "__url__", "__index__"} == {"png", "txt", "json"}
        for member in ("png", "txt", "json"):
            assert read[member] == original[member]  # byte-identical
        sample = decode_sample(read, counter)
        expected = np.asarray(Image.open(io.BytesIO(original["png"])).convert("RGB"))
        assert np.array_equal(np.asarray(sample.image), expected)
        meta = json.loads(original["json"])
        assert sample.caption == original["txt"].decode() and sample.label == meta["label"]
        assert [list(r.box) for r in sample.regions] == [r["box"] for r in meta["regions"]]
        assert [r.caption for r in sample.regions] == [r["caption"] for r in meta["regions"]]


def test_same_records_give_byte_identical_shards(tmp_path, synth_records):
    write_shards(iter(synth_records), tmp_path / "a", shard_size=5)
    write_shards(iter(synth_records), tmp_path / "b", shard_size=5)
    for a in sorted((tmp_path / "a").glob("*.tar")):
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes()


def test_webdataset_reads_our_shards(tmp_path, synth_records):
    """Parity with the reference reader: webdataset's public API sees the same samples and bytes."""
    import webdataset as wds

    write_shards(iter(synth_records), tmp_path, shard_size=6)
    urls = [s.url for s in resolve_shards(str(tmp_path))]
    theirs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    ours = _read_all(str(tmp_path))
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours]
    for a, b in zip(theirs, ours):
        assert a["png"] == b["png"] and a["txt"] == b["txt"] and a["json"] == b["json"]


def test_rewrite_removes_stale_shards(tmp_path, synth_records):
    write_shards(iter(synth_records), tmp_path, shard_size=2)
    write_shards(iter(synth_records[:3]), tmp_path, shard_size=2)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [r["__key__"] for r in _read_all(str(tmp_path))] == [r["__key__"] for r in synth_records[:3]]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(DataError, match="no dots"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path, shard_size=2)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*tmp"))


def test_documents_round_trip(tmp_path):
    docs = list(SynthScenes(image_size=32, seed=1).documents(0, 3))
    write_shards(iter(docs), tmp_path, shard_size=2, prefix="doc")
    counter = SkipCounter()
    back = _read_all(str(tmp_path), counter)
    assert [d["__key__"] for d in back] == [d["__key__"] for d in docs]
    for original, raw in zip(docs, back):
        document = read_document(raw, counter)
        meta = json.loads(original["json"])
        assert document.items == meta["items"]
        images = sorted(k for k in original if k.endswith(".png"))
        assert len(document.images) == len(images)
        for i, name in enumerate(images):
            assert raw[name] == original[name]
            assert np.array_equal(np.asarray(document.images[i]), np.asarray(Image.open(io.BytesIO(original[name]))))
    assert counter == {}


def test_skip_ahead_and_stop(tmp_path, synth_records):
    write_shards(iter(synth_records), tmp_path, shard_size=20)
    url = resolve_shards(str(tmp_path))[0].url
    counter = SkipCounter()
    part = [r["__key__"] for r in iter_tar_samples(url, counter, start=3, stop=7)]
    assert part == [r["__key__"] for r in synth_records[3:7]]
    assert count_tar_samples(url) == len(synth_records)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def test_unsafe_member_names_are_refused_and_nothing_is_extracted(tmp_path):
    shard = tmp_path / "evil.tar"
    link = tarfile.TarInfo("linked.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar_with(shard, [
        (tarfile.TarInfo("../escape.txt"), b"out"),
        (tarfile.TarInfo("/abs/key.txt"), b"abs"),
        (link, None),
        (tarfile.TarInfo("good.png"), _png()),
        (tarfile.TarInfo("good.txt"), b"a caption"),
        (tarfile.TarInfo("noext"), b"?"),
    ])
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent))
    counter = SkipCounter()
    samples = list(iter_tar_samples(str(shard), counter))
    assert [s["__key__"] for s in samples] == ["good"]
    assert counter == {"unsafe_member": 3, "member_no_extension": 1}
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent)) == before


def _cut_points(shard: Path) -> dict[str, int]:
    """Where a crash can leave a shard: inside a member's data, at a header (a block boundary, as
    buffered writes leave it), inside a header, and just before the end-of-archive blocks."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    return {"in data": middle.offset_data + middle.size // 2, "at a header": middle.offset,
            "in a header": middle.offset + 100, "before the end marker": members[-1].offset_data
            + -(-members[-1].size // 512) * 512}


@pytest.mark.parametrize("where", ["in data", "at a header", "in a header", "before the end marker"])
def test_truncated_shards_are_counted_not_fatal(tmp_path, synth_records, where):
    write_shards(iter(synth_records), tmp_path / "ok", shard_size=20)
    shard = tmp_path / "ok" / "shard-000000.tar"
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: _cut_points(shard)[where]])
    counter = SkipCounter()
    samples = list(iter_tar_samples(str(cut), counter))
    assert counter == {"shard_truncated": 1}
    assert len(samples) < len(synth_records)
    for sample, original in zip(samples, synth_records):  # what was read before the break is complete
        assert {k: v for k, v in sample.items() if k not in ("__url__", "__index__")} == original
    with pytest.raises(DataError, match="shard_truncated"):
        list(iter_tar_samples(str(cut), SkipCounter(strict=True)))


def test_unreadable_shards_are_counted_not_fatal(tmp_path):
    garbage, empty = tmp_path / "garbage.tar", tmp_path / "empty.tar"
    garbage.write_bytes(b"this is not a tar archive" * 40)
    empty.write_bytes(b"")
    counter = SkipCounter()
    assert list(iter_tar_samples(str(garbage), counter)) == []
    assert list(iter_tar_samples(str(empty), counter)) == []
    assert list(iter_tar_samples(str(tmp_path / "missing.tar"), counter)) == []
    assert counter == {"shard_unreadable": 3}
    # listed without sizes.json, an unopenable shard keeps one place, so every epoch meets and reports it
    assert [(s.num_samples, s.unreadable) for s in resolve_shards(str(tmp_path))] == [(1, True), (1, True)]


def test_duplicate_keys_are_counted(tmp_path):
    shard = tmp_path / "dup.tar"
    _tar_with(shard, [(tarfile.TarInfo(n), d) for n, d in [
        ("a.txt", b"first"), ("b.txt", b"b"), ("a.txt", b"again"), ("c.txt", b"c")]])
    counter = SkipCounter()
    assert [(s["__key__"], s["txt"]) for s in iter_tar_samples(str(shard), counter)] == \
        [("a", b"first"), ("b", b"b"), ("c", b"c")]
    assert counter == {"duplicate_key": 1}


def test_url_forms_resolve_to_the_same_shards(tmp_path, synth_records):
    write_shards(iter(synth_records), tmp_path, shard_size=4)
    folder = [s.url for s in resolve_shards(str(tmp_path))]
    assert [s.url for s in resolve_shards(str(tmp_path / "shard-*.tar"))] == folder
    assert [s.url for s in resolve_shards(str(tmp_path / "shard-{000000..000003}.tar"))] == folder
    joined = resolve_shards(f"{tmp_path}/shard-000000.tar::{tmp_path}/shard-{{000002,000003}}.tar")
    assert [s.url for s in joined] == [folder[0], folder[2], folder[3]]
    assert [s.num_samples for s in joined] == [4, 4, 2]
    assert expand_braces("x{1..3}y{a,b}") == ["x1ya", "x1yb", "x2ya", "x2yb", "x3ya", "x3yb"]
    # counts come from tar headers when there is no manifest
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "sizes.json").unlink()
    assert [s.num_samples for s in resolve_shards(str(tmp_path))] == [4, 4, 4, 2]
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards(str(tmp_path / "shard-{000000..000009}.tar"))
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no shard matches"):
        resolve_shards(str(tmp_path / "*.nothing"))


def test_csv_reader(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "b.png").write_bytes(_png((0, 255, 0), size=(5, 3)))
    rows = "path;text\nimg/a.png;a red square\n" + f"{tmp_path / 'b.png'};a green one\nmissing.png;gone\n"
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(rows.encode() + b"img/a.png;\xff\xfe bad bytes\n")
    with pytest.raises(DataError, match="no column 'filepath'"):
        read_csv(csv_path, separator=";")
    table = read_csv(csv_path, image_key="path", caption_key="text", separator=";")
    assert len(table) == 4
    counter = SkipCounter()
    samples = [decode_sample(table.record(i), counter) for i in range(len(table))]
    assert samples[0].caption == "a red square" and samples[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert samples[1].caption == "a green one" and samples[1].image.size == (5, 3)  # absolute path kept
    assert samples[2] is None and samples[3] is None
    assert counter == {"missing_file": 1, "caption_not_utf8": 1}
    assert detect_format(str(csv_path)) == "csv"


def test_image_folder_reader(tmp_path):
    for name, color in [("red_circle", (255, 0, 0)), ("blue_square", (0, 0, 255))]:
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(_png(color))
    (tmp_path / "blue_square" / "notes.txt").write_text("not an image")
    assert detect_format(str(tmp_path)) == "imagefolder"
    source = open_source(str(tmp_path))
    assert source.kind == "imagefolder" and source.num_samples == 6
    assert source.classnames == ["blue square", "red circle"]  # sorted folder names; '_' read as space
    counter = SkipCounter()
    samples = [decode_sample(r, counter) for r in source.records(counter)]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [s.classname for s in samples] == ["blue square"] * 3 + ["red circle"] * 3
    assert samples[0].image.getpixel((0, 0)) == (0, 0, 255) and samples[0].caption == "blue square"
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(tmp_path / "red_circle")
