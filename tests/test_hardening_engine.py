"""What a new user hit in training: run folders reused or shared, refused resumes that wrote files, state.json
damage, non-finite weights, repairs counted as skips, silent config changes on resume, and one-line errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from clipforge.config import load_config
from clipforge.engine.loop import train
from clipforge.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture
def shards(tiny_shards) -> Path:
    return tiny_shards


def write_config(folder: Path, shards: Path, name: str = "run", **train) -> Path:
    body = {"name": name, "seed": 0, "output_dir": str(folder / name),
            "data": {"train": str(shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
            "model": {"family": "toy", "name": "toy-classifier-tiny"}, "objective": {"name": "classify"},
            "train": {"max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "save_every_steps": 2,
                      "keep_last": 10, "tensorboard": False, **train}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (the lock file aside: it holds the last pid)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_fresh_start_in_a_run_folder_is_refused_and_overwrite_starts_over(tmp_path, shards):
    config = write_config(tmp_path, shards)
    train(load_config(config))
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run.*--resume latest.*--overwrite") as caught:
        train(load_config(config))
    assert "\n" not in str(caught.value)
    assert snapshot(tmp_path / "run") == before  # nothing truncated, replaced or pruned
    result = train(load_config(config, ["train.max_steps=2"]), overwrite=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and steps == [1, 2]  # a new history
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002"]


def test_a_second_training_into_a_folder_in_use_is_refused(tmp_path, shards):
    from clipforge.engine.preflight import RunLock

    config = write_config(tmp_path, shards)
    (tmp_path / "run").mkdir()
    holder = RunLock(tmp_path / "run").acquire()  # another training holds the folder
    try:
        with pytest.raises(ConfigError, match="in use by another training") as caught:
            train(load_config(config))
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert train(load_config(config)).steps == 4  # free again


def test_a_refused_resume_writes_nothing(tmp_path, shards):
    config = write_config(tmp_path, shards, tensorboard=True, save_every_steps=3, max_steps=6)
    killed = load_config(config, ["train.max_steps=3"])
    train(killed)  # stops at step 3, mid-epoch (8 batches per epoch)
    before = snapshot(tmp_path / "run")
    tb_files = sorted((tmp_path / "run" / "tb").iterdir())
    refusals = [
        (["objective.name=toy_gan"], ConfigError, "cannot resume .* objective.name=toy_gan"),
        (["model.name=toy-classifier-frozen-stem"], ConfigError, "cannot resume .* model.name"),
        (["data.batch_size=4"], DataError, "cannot resume: the data position"),
    ]
    for overrides, error, message in refusals:
        with pytest.raises(error, match=message) as caught:
            train(load_config(config, overrides), resume="latest")
        assert "\n" not in str(caught.value)
        assert snapshot(tmp_path / "run") == before, overrides  # config.yaml, metrics, checkpoints untouched
        assert sorted((tmp_path / "run" / "tb").iterdir()) == tb_files  # no new TensorBoard file


def test_a_clip_checkpoint_cannot_resume_as_siglip(tmp_path):
    from clipforge.data.generate import generate_synth_shards

    generate_synth_shards(tmp_path / "shards", num=32, split="train", image_size=32, shard_size=32)
    body = {"name": "clip", "output_dir": str(tmp_path / "clip"),
            "data": {"train": str(tmp_path / "shards"), "batch_size": 16, "shuffle_buffer": 16},
            "model": {"name": "clipforge-vit-micro"},
            "train": {"max_steps": 1, "warmup_steps": 0, "tensorboard": False}}
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(body))
    train(load_config(path))
    with pytest.raises(ConfigError, match="objective.name=siglip: it was trained with clip"):
        train(load_config(path, ["objective.name=siglip", "train.max_steps=2"]), resume="latest")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update(surprise=1), "unknown key 'training.surprise'"),
    (lambda t: t.update(step="4"), "'training.step' must be a non-negative integer"),
    (lambda t: t.update(step=-1), "'training.step' must be a non-negative integer"),
])
def test_a_damaged_state_json_is_one_line_and_leaves_nothing_behind(tmp_path, shards, edit, message):
    config = write_config(tmp_path, shards)
    train(load_config(config, ["train.max_steps=2"]))
    state_file = tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json"
    payload = json.loads(state_file.read_text())
    edit(payload["training"])
    state_file.write_text(json.dumps(payload))
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=message) as caught:
        train(load_config(config), resume="latest")
    assert "\n" not in str(caught.value) and snapshot(tmp_path / "run") == before


def test_non_finite_weights_are_refused_at_load(tmp_path, shards):
    from safetensors.torch import load_file, save_file

    from clipforge.models import load_model

    config = write_config(tmp_path, shards)
    result = train(load_config(config, ["train.max_steps=2"]))
    weights = result.checkpoint / "model.safetensors"
    state = load_file(str(weights))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="non-finite values .* 'head.weight'"):
        load_model(None, checkpoint=result.checkpoint)
    with pytest.raises(CheckpointError, match="non-finite"):
        train(load_config(config), resume="latest")


def test_repairs_are_counted_apart_from_skips():
    from clipforge.cli.train import summary_table
    from clipforge.engine.records import split_sample_counts

    counts = {"corrupt_image": 1, "converted_L": 7, "converted_CMYK": 5, "box_clipped": 2}
    skipped, repaired = split_sample_counts(counts)
    assert skipped == {"corrupt_image": 1} and repaired == {"converted_L": 7, "converted_CMYK": 5, "box_clipped": 2}
    summary = {"name": "r", "steps": 1, "epochs": 1, "samples_seen": 8, "train_time_s": 1.0, "samples_per_s": 8.0,
               "final_loss": 1.0, "best_loss": 1.0, "final_metrics": {}, "skipped_steps": 0,
               "skipped_samples": skipped, "converted_samples": repaired, "checkpoint": None}
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "0 / 1" in text and "converted_L 7" in text


def test_changed_settings_on_resume_are_reported(tmp_path, shards):
    config = write_config(tmp_path, shards, max_steps=6, save_every_steps=3)
    train(load_config(config, ["train.max_steps=3"]))
    events = []
    train(load_config(config, ["train.lr=2e-3", "seed=5"]), resume="latest", on_event=events.append)
    changes = next(e for e in events if e.kind == "start").data["config_changes"]
    assert changes == {"seed": [0, 5], "train.lr": [1e-3, 2e-3], "train.max_steps": [3, 6]}


def test_fineclip_on_data_without_boxes_warns():
    from clipforge.config import ModelConfig
    from clipforge.data.batches import RegionBatch
    from clipforge.models import create_model
    from clipforge.objectives.fineclip import FineclipObjective

    bundle = create_model(ModelConfig(name="clipforge-vit-micro"))
    objective = FineclipObjective()
    objective.prepare_model(bundle.model)
    texts = bundle.tokenizer(["a red circle", "a blue square"])
    batch = RegionBatch(images=torch.randn(2, 3, 32, 32), texts=texts, labels=torch.tensor([-1, -1]), keys=["a", "b"],
                        boxes=torch.zeros(2, 2, 4), region_texts=torch.zeros(2, 2, texts.shape[1], dtype=torch.long),
                        region_valid=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.warns(UserWarning, match="no region boxes.*plain CLIP"):
        objective(bundle.model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run, not every step
        objective(bundle.model, batch)


@pytest.mark.parametrize(("override", "message"), [
    ("seed=18446744073709551616", "key 'seed' must be <= 9223372036854775807"),
    ("data.csv_separator=ab", "data.csv_separator' must be one character"),
    ("train.beta1=1.0", "key 'train.beta1' must be < 1.0"),
])
def test_values_the_libraries_would_refuse_are_one_config_line(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(overrides=[override])
    assert "\n" not in str(caught.value)


def test_a_duplicate_yaml_key_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 5.0e-3\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice in one section \\(line 4\\)"):
        load_config(path)


def test_the_lost_rank_line_drops_the_backend_build_path():
    from clipforge.engine.loop import _backend_reason

    error = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                         "[127.0.0.1]:29500\nException raised from ... at /opt/build/torch/csrc/x.cpp:12")
    reason = _backend_reason(error)
    assert reason == "Connection closed by peer [127.0.0.1]:29500" and "/" not in reason
