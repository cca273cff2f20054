"""The training loader: exact resume, no duplicates across ranks and workers, equal batch counts per rank,
seeded per-sample augmentation, region boxes, and prepare_data."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from clipforge.config import load_config
from clipforge.data.batches import RegionBatch
from clipforge.data.pipeline import DataPosition, build_loader, prepare_data
from clipforge.data.shards import write_shards
from clipforge.data.sources import open_source
from clipforge.data.synth import SynthScenes
from clipforge.errors import DataError

PREPROCESS_TRAIN = image_transform(32, is_train=True)  # RandomResizedCrop: random per sample
PREPROCESS_VAL = image_transform(32, is_train=False)


def tokenizer(texts):
    """A stand-in for open_clip's tokenizer: [N, 16] int64 codes of the first 16 characters."""
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = [ord(c) for c in text[:16]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def _config(*overrides):
    return load_config(None, ["data.batch_size=8", "data.shuffle_buffer=10", "seed=7", *overrides])


def _records(num, start=0):
    return list(SynthScenes(image_size=32, seed=5).records(start, start + num))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """99 samples: 8 shards of 12 and one of 3."""
    folder = tmp_path_factory.mktemp("clean")
    write_shards(_records(99), folder, shard_size=12)
    return open_source(str(folder))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """60 samples of which 6 are unusable (zero-byte or corrupt images, empty captions)."""
    folder = tmp_path_factory.mktemp("dirty")
    records = _records(60)
    for i in (3, 4, 17, 30, 41, 58):
        if i % 2:
            records[i] = dict(records[i], png=b"")
        else:
            records[i] = dict(records[i], txt=b" ")
    write_shards(records, folder, shard_size=10)
    return open_source(str(folder))


def _keys(batches):
    return [list(b.keys) for b in batches]


# ----------------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_where_the_run_stopped(dirty, workers):
    config = _config(f"data.workers={workers}")
    loader = build_loader(dirty, config, preprocess=PREPROCESS_TRAIN, tokenizer=tokenizer, epoch=3)
    full = list(loader)
    assert len(full) == len(loader) == 60 // 8
    for k in (0, 1, len(full) - 2):
        position = json.loads(json.dumps(loader.position_after(full[k])))  # through JSON, as a checkpoint does
        resumed = build_loader(dirty, config, preprocess=PREPROCESS_TRAIN, tokenizer=tokenizer, epoch=3,
                               position=position if k else DataPosition.from_dict(position))
        rest = list(resumed)
        assert _keys(full[: k + 1]) + _keys(rest) == _keys(full)
        for a, b in zip(full[k + 1 :], rest):
            assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
            assert a.skipped == b.skipped  # replayed bad samples are not counted again
    assert loader.skipped and sum(loader.skipped.values()) >= 1
    end = build_loader(dirty, config, preprocess=PREPROCESS_TRAIN, tokenizer=tokenizer, epoch=3,
                       position=loader.position_after(full[-1]))
    assert list(end) == [] and len(end) == len(loader)


def test_resume_refuses_a_position_from_another_setting(clean):
    config = _config()
    loader = build_loader(clean, config, preprocess=PREPROCESS_VAL, tokenizer=tokenizer, epoch=1)
    position = loader.position_after(next(iter(loader)))
    with pytest.raises(DataError, match="cannot resume"):
        build_loader(clean, config, preprocess=PREPROCESS_VAL, tokenizer=tokenizer, epoch=2, position=position)
    with pytest.raises(DataError, match="cannot resume"):
        build_loader(clean, _config("data.batch_size=4"), preprocess=PREPROCESS_VAL, tokenizer=tokenizer,
                     epoch=1, position=position)
    with pytest.raises(DataError, match="malformed"):
        DataPosition.from_dict({"epoch": 1})


# ----------------------------------------------------------------------------------------------------------
# Splitting over ranks and workers


def _rank_keys(source, config, world_size, epoch=0, skipped=None):
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(source, config, preprocess=PREPROCESS_VAL, tokenizer=tokenizer, epoch=epoch,
                              rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b) == config.data.batch_size for b in batches)
        per_rank.append([k for b in batches for k in b.keys])
        for kind, count in loader.skipped.items():
            if skipped is not None:
                skipped[kind] = skipped.get(kind, 0) + count
    return per_rank


def test_two_ranks_two_workers_read_every_sample_once(clean):
    config = _config("data.workers=2")
    per_rank = _rank_keys(clean, config, world_size=2)
    assert len(per_rank[0]) == len(per_rank[1]) == 48  # (99 // 2) // 8 batches of 8 on each rank
    union = per_rank[0] + per_rank[1]
    assert len(set(union)) == len(union) == 96  # no key twice; only the 3-sample remainder dropped
    assert set(union) <= {f"train-{i:09d}" for i in range(99)}


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    write_shards(_records(40), tmp_path, shard_size=100)  # a single shard
    per_rank = _rank_keys(open_source(str(tmp_path)), _config("data.workers=2"), world_size=2)
    union = per_rank[0] + per_rank[1]
    assert len(per_rank[0]) == len(per_rank[1]) == 16 and len(set(union)) == 32


def test_csv_rows_are_split_like_shards(tmp_path):
    lines = ["filepath,caption"]
    for record in _records(20):
        (tmp_path / f"{record['__key__']}.png").write_bytes(record["png"])
        lines.append(f"{record['__key__']}.png,{record['txt'].decode()}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "pairs.csv"))
    per_rank = _rank_keys(source, _config("data.batch_size=4"), world_size=2)
    union = per_rank[0] + per_rank[1]
    assert len(per_rank[0]) == 8 and len(set(union)) == len(union) == 16


def test_every_rank_gets_the_same_number_of_full_batches_when_one_runs_short(tmp_path):
    records = _records(40)
    for i in range(10):  # the first shard is all bad; whichever rank reads it must wrap around
        records[i] = dict(records[i], png=b"")
    write_shards(records, tmp_path, shard_size=10)
    (tmp_path / "sizes.json").unlink()
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "zz-broken.tar").write_bytes(b"not a tar at all")  # listed, cannot be opened
    source = open_source(str(tmp_path))
    for workers in (0, 2):
        skipped = {}
        per_rank = _rank_keys(source, _config("data.batch_size=5", f"data.workers={workers}"), 2, skipped=skipped)
        assert len(per_rank[0]) == len(per_rank[1]) == 20
        assert all(int(k.split("-")[1]) >= 10 for keys in per_rank for k in keys)
        # each problem counted once in the epoch, though the short rank read its part several times
        assert skipped == {"zero_byte_image": 10, "shard_unreadable": 1}


def test_all_bad_data_is_a_clear_error(tmp_path):
    write_shards([dict(r, png=b"") for r in _records(10)], tmp_path, shard_size=10)
    loader = build_loader(open_source(str(tmp_path)), _config("data.batch_size=2"), preprocess=PREPROCESS_VAL,
                          tokenizer=tokenizer)
    with pytest.raises(DataError, match="no usable sample"):
        list(loader)


# ----------------------------------------------------------------------------------------------------------
# Determinism


def test_order_depends_on_seed_and_epoch_only(clean):
    config = _config()
    first = _rank_keys(clean, config, 1, epoch=1)[0]
    assert _rank_keys(clean, config, 1, epoch=1)[0] == first
    assert _rank_keys(clean, config, 1, epoch=2)[0] != first
    assert _rank_keys(clean, _config("seed=8"), 1, epoch=1)[0] != first
    ordered = build_loader(clean, config, preprocess=PREPROCESS_VAL, tokenizer=tokenizer, shuffle=False)
    assert [k for b in ordered for k in b.keys] == [f"train-{i:09d}" for i in range(96)]


def test_augmentation_is_seeded_per_sample_and_leaves_the_global_rng_alone(clean):
    images = {}
    for workers in (0, 2):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        loader = build_loader(clean, _config(f"data.workers={workers}"), preprocess=PREPROCESS_TRAIN,
                              tokenizer=tokenizer, epoch=4)
        images[workers] = {k: b.images[i] for b in loader for i, k in enumerate(b.keys)}
        assert torch.equal(torch.get_rng_state(), state)
    common = set(images[0]) & set(images[2])  # the dropped remainder (3 samples) may differ
    assert len(common) >= 93
    for key in common:  # the same crop for a sample whichever worker built it
        assert torch.equal(images[0][key], images[2][key])
    plain = build_loader(clean, _config(), preprocess=PREPROCESS_VAL, tokenizer=tokenizer, shuffle=False)
    batch = next(iter(plain))
    assert not torch.equal(batch.images[0], images[0][batch.keys[0]])  # the random crop did something


# ----------------------------------------------------------------------------------------------------------
# Region batches


def test_region_batch_boxes_follow_the_squash_resize(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 48, 3), dtype=np.uint8)  # 48 wide, 24 high
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    regions = [{"box": [0, 0, 12, 6], "caption": "first"}, {"box": [24, 12, 48, 24], "caption": "second"},
               {"box": [6, 3, 30, 21], "caption": "third"}]
    records = [{"__key__": f"s{i}", "png": buffer.getvalue(), "txt": "a caption",
                "json": {"regions": regions[: 1 + i % 3]}} for i in range(4)]
    write_shards(records, tmp_path, shard_size=4)
    config = _config("data.batch_size=4", "data.max_regions=2")
    source = open_source(str(tmp_path))
    batch = next(iter(build_loader(source, config, RegionBatch, PREPROCESS_TRAIN, tokenizer, shuffle=False)))
    assert batch.keys == ["s0", "s1", "s2", "s3"]
    assert batch.boxes.shape == (4, 2, 4) and batch.region_texts.shape == (4, 2, 16)
    assert batch.region_valid.tolist() == [[True, False], [True, True], [True, True], [True, False]]
    sx, sy = 32 / 48, 32 / 24
    assert batch.boxes[1].tolist() == [[0, 0, 12 * sx, 6 * sy], [24 * sx, 12 * sy, 48 * sx, 24 * sy]]
    assert torch.equal(batch.region_texts[1], tokenizer(["first", "second"]))
    # s2 has 3 regions for 2 slots: a seeded choice, kept in order, the same on every build
    chosen = [c for c in ("first", "second", "third") if any(torch.equal(tokenizer([c])[0], t)
                                                            for t in batch.region_texts[2])]
    assert len(chosen) == 2
    again = next(iter(build_loader(source, config, RegionBatch, PREPROCESS_TRAIN, tokenizer, shuffle=False)))
    assert torch.equal(again.boxes, batch.boxes) and torch.equal(again.region_texts, batch.region_texts)
    # the image is the squash-resized picture, normalised like open_clip (no random crop for regions)
    squashed = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC)
    expected = PREPROCESS_TRAIN.transforms[-1](torch.from_numpy(np.array(squashed)).permute(2, 0, 1) / 255.0)
    assert torch.allclose(batch.images[0], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# prepare_data


def test_prepare_data_generates_synth_once(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}/run", "data.synth.num_train=40", "data.synth.num_val=16",
                                "data.synth.shard_size=16", "data.synth.image_size=32", "data.batch_size=8"])
    sources = prepare_data(config)
    assert sources.train.num_samples == 40 and [s.num_samples for s in sources.train.shards] == [16, 16, 8]
    assert sources.val.num_samples == 16
    assert sources.train.classnames and len(sources.train.classnames) == 64
    data = tmp_path / "run" / "data"
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    again = prepare_data(config)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == stamps  # nothing rewritten
    assert [s.url for s in again.train.shards] == [s.url for s in sources.train.shards]
    expected = SynthScenes(image_size=32, seed=0, split="val").record(5)
    counter_free = list(sources.val.records(counter=_NoCounter()))
    assert counter_free[5]["png"] == expected["png"] and counter_free[5]["json"] == expected["json"]
    # other settings: regenerated
    config.data.synth.seed = 1
    assert prepare_data(config).train.num_samples == 40
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.tar")} != {p: s for p, s in stamps.items()
                                                                     if p.suffix == ".tar"}


class _NoCounter:
    def skip(self, kind, where=""):
        raise AssertionError(kind)

    def note(self, kind):
        raise AssertionError(kind)


def test_prepare_data_errors_are_one_line(tmp_path):
    def config_for(train, batch_size=8):
        config = load_config(None, [f"output_dir={tmp_path}/run", f"data.train={train}"])
        config.data.batch_size = batch_size
        return config

    with pytest.raises(DataError, match="data.train: data path .* does not exist"):
        prepare_data(config_for(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "empty" / "shard-000000.tar", "w"):
        pass  # a valid tar without members
    with pytest.raises(DataError, match="no samples in"):
        prepare_data(config_for(str(tmp_path / "empty")))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "shard-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(DataError, match=r"no samples in .* \(1 shard\(s\) cannot be opened\)"):
        prepare_data(config_for(str(tmp_path / "broken")))
    write_shards(_records(5), tmp_path / "small", shard_size=5)
    with pytest.raises(DataError, match=r"batch_size \(8\) is larger than the training set"):
        prepare_data(config_for(str(tmp_path / "small")))
    with pytest.raises(DataError, match=r"batch_size \(4\) x 2 ranks is larger than the training set"):
        build_loader(open_source(str(tmp_path / "small")), config_for(str(tmp_path / "small"), 4),
                     preprocess=PREPROCESS_VAL, tokenizer=tokenizer, world_size=2)
