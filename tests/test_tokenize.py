"""`clipforge tokenize encode|decode` (clipforge.models.tokenize): the shards hold exactly the tokenizer's codes and
decode to exactly its own reconstruction, a second encode changes nothing, codes of another tokenizer are refused
with one line naming both, and bad images are skipped and counted while odd sizes are resized."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clipforge.errors import CheckpointError


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, tiny_shards) -> Path:
    """A vq-tiny trained for 8 steps on the 64 tiny SynthScenes images."""
    from clipforge.config import load_config
    from clipforge.engine.loop import train

    folder = tmp_path_factory.mktemp("tokenizer")
    body = {"name": "vq", "seed": 0, "output_dir": str(folder / "vq"),
            "data": {"train": str(tiny_shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
            "model": {"family": "vq", "name": "vq-tiny"}, "objective": {"name": "vq"},
            "train": {"max_steps": 8, "lr": 2e-3, "warmup_steps": 1, "log_every": 4, "weight_decay": 0.0,
                      "tensorboard": False, "progress": False}}
    (folder / "vq.yaml").write_text(yaml.safe_dump(body))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(folder / "vq.yaml")).run_dir
    finally:
        torch.set_num_threads(before)  # later test modules keep the thread count they expect


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, tokenizer_run) -> Path:
    """The same checkpoint with one decoder weight moved: another tokenizer of the same config."""
    from safetensors.torch import load_file, save_file

    from clipforge.models.factory import find_model_weights

    weights = find_model_weights(tokenizer_run)
    folder = tmp_path_factory.mktemp("other") / "checkpoint"
    shutil.copytree(weights.parent, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["decoder.layers.0.weight"] = state["decoder.layers.0.weight"] + 0.01
    save_file(state, str(folder / "model.safetensors"))
    return folder


def read_code_records(folder: Path) -> list[dict]:
    from clipforge.data.samples import SkipCounter
    from clipforge.data.shards import iter_tar_samples, resolve_shards

    counter, records = SkipCounter(), []
    for shard in resolve_shards(str(folder)):
        records.extend(iter_tar_samples(shard.url, counter))
    assert not counter
    return [{"key": r["__key__"], "codes": np.load(io.BytesIO(r["npy"])), "meta": json.loads(r["json"])}
            for r in records]


def source_images(shards: Path) -> list[Image.Image]:
    """The shard images in storage order, decoded as training decodes them."""
    from clipforge.data.batches import ImageTextBatch
    from clipforge.data.samples import SkipCounter
    from clipforge.data.sources import open_source

    counter = SkipCounter()
    return [ImageTextBatch.decode(raw, counter).image for raw in open_source(str(shards)).records(counter)]


def test_encode_then_decode_is_the_tokenizers_own_round_trip(tmp_path, tokenizer_run, tiny_shards):
    from clipforge.models.tokenize import (
        decode_code_shards,
        encode_images,
        images_to_uint8,
        load_image_tokenizer,
        tokenizer_identity,
    )

    tokenizer = load_image_tokenizer(tokenizer_run)
    report = encode_images(tokenizer, [str(tiny_shards)], tmp_path / "codes", batch_size=64, shard_size=40)
    assert (report.images, report.shards, report.skipped, report.written) == (64, 2, {}, True)
    records = read_code_records(tmp_path / "codes")
    images = torch.stack([tokenizer.preprocess(image) for image in source_images(tiny_shards)])  # [64, 3, 32, 32]
    with torch.no_grad():
        codes = tokenizer.model.encode_codes(images)  # [64, 8, 8]
        expected = images_to_uint8(tokenizer.model.decode_codes(codes)).numpy()  # [64, 32, 32, 3]
    assert [r["codes"].dtype for r in records] == [np.int16] * 64
    assert np.array_equal(np.stack([r["codes"] for r in records]), codes.numpy())
    assert all(r["meta"]["tokenizer"] == tokenizer_identity(tokenizer.fingerprint) for r in records)
    assert [r["meta"]["source_key"] for r in records] == [r["key"] for r in records]  # shard keys are kept
    assert all(r["meta"]["caption"] and "label" in r["meta"] for r in records)

    decoded = decode_code_shards(tokenizer, tmp_path / "codes", tmp_path / "png", batch_size=64)
    assert decoded.images == 64 and not decoded.skipped
    pixels = np.stack([np.asarray(Image.open(tmp_path / "png" / f"{r['key']}.png")) for r in records])
    assert np.array_equal(pixels, expected)


def test_a_second_encode_leaves_the_set_as_it_is(tmp_path, tokenizer_run, other_tokenizer, tiny_shards):
    from clipforge.cli import main
    from clipforge.models.tokenize import encode_images, load_image_tokenizer

    out = tmp_path / "codes"
    assert main(["tokenize", "encode", "--model", str(tokenizer_run), "--source", str(tiny_shards), "--out", str(out),
                 "--shard-size", "32", "--no-progress", "--device", "cpu"]) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = encode_images(load_image_tokenizer(tokenizer_run), [str(tiny_shards)], out, shard_size=32)
    assert not again.written and again.images == 64
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    # another tokenizer into the same folder: rewritten in place, one record per image, none left over
    other = encode_images(load_image_tokenizer(other_tokenizer), [str(tiny_shards)], out, shard_size=32)
    assert other.written and len(read_code_records(out)) == 64 == other.images
    assert sorted(p.name for p in out.glob("*.tar")) == ["codes-000000.tar", "codes-000001.tar"]


def test_decoding_codes_of_another_tokenizer_fails_with_one_line_naming_both(tmp_path, tokenizer_run, other_tokenizer,
                                                                           tiny_shards, capsys):
    from clipforge.cli import main
    from clipforge.models.tokenize import decode_code_shards, encode_images, load_image_tokenizer

    made_by, other = load_image_tokenizer(tokenizer_run), load_image_tokenizer(other_tokenizer)
    encode_images(made_by, [str(tiny_shards)], tmp_path / "codes")
    with pytest.raises(CheckpointError) as caught:
        decode_code_shards(other, tmp_path / "codes", tmp_path / "png")
    message = str(caught.value)
    assert "\n" not in message
    for fingerprint in (made_by.fingerprint, other.fingerprint):
        assert fingerprint["weights_sha256"][:12] in message and fingerprint["checkpoint"] in message
    assert not (tmp_path / "png").exists()  # refused before any work
    code = main(["tokenize", "decode", "--model", str(other_tokenizer), "--codes", str(tmp_path / "codes"),
                 "--out", str(tmp_path / "png"), "--no-progress", "--device", "cpu"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("clipforge: error: the codes in")


def test_bad_images_are_skipped_and_counted_and_odd_sizes_resized(tmp_path, tokenizer_run):
    from clipforge.models.tokenize import encode_images, load_image_tokenizer

    folder = tmp_path / "photos"
    folder.mkdir()
    generator = np.random.default_rng(0)
    good = {}
    for name, size in (("wide", (48, 40)), ("big", (64, 64)), ("small", (20, 30))):
        good[name] = Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        good[name].save(folder / f"{name}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(generator.integers(0, 256, 200, dtype=np.uint8)))
    (folder / "empty.jpg").write_bytes(b"")
    tokenizer = load_image_tokenizer(tokenizer_run)
    report = encode_images(tokenizer, [str(folder)], tmp_path / "codes")
    assert report.images == 3
    assert report.skipped == {"corrupt_image": 1, "zero_byte_image": 1}
    by_name = {Path(r["meta"]["source"]).stem: r["codes"] for r in read_code_records(tmp_path / "codes")}
    assert sorted(by_name) == ["big", "small", "wide"]
    for name, image in good.items():  # resized by the tokenizer's own preprocess
        with torch.no_grad():
            codes = tokenizer.model.encode_codes(tokenizer.preprocess(image)[None])[0]
        assert by_name[name].shape == (8, 8) and np.array_equal(by_name[name], codes.numpy())
    meta = json.loads((tmp_path / "codes" / "manifest.json").read_text())["meta"]
    assert meta["counts"] == {"images": 3, "skipped": {"corrupt_image": 1, "zero_byte_image": 1}}
    assert meta["settings"]["tokenizer"]["model_json"]["name"] == "vq-tiny"
