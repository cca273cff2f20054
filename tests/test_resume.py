"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with --resume latest ends with the same
weights as an uninterrupted run (bit for bit on CPU), plus the NaN policy and an incompatible resume.

Why exact equality holds on CPU: the same thread count and deterministic kernels make every step
bit-reproducible; the checkpoint restores everything a step depends on (weights, Adam moments and step
counts as exact fp32 tensors, the schedule position, the RNG states, and the data loader's position,
from which the pipeline replays the remaining batches of the epoch in the same order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipforge.config import load_config
from clipforge.engine.loop import TrainingDiverged, train
from clipforge.errors import CheckpointError, ConfigError
from clipforge.objectives.clip import ClipObjective

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # the same in this process and the subprocesses (and fast on a shared 2-core machine)


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """160 SynthScenes training images in 3 shards, shared by every run in this file."""
    from clipforge.data.generate import generate_synth_shards

    folder = tmp_path_factory.mktemp("shards")
    generate_synth_shards(folder, num=160, split="train", image_size=32, shard_size=64)
    return folder


def write_config(folder: Path, shards: Path, name: str, **train_overrides) -> Path:
    body = {
        "name": name,
        "seed": 0,
        "output_dir": str(folder / name),
        "data": {"train": str(shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 64},
        "model": {"name": "clipforge-vit-micro"},
        "train": {"epochs": 3, "lr": 2e-3, "warmup_steps": 2, "log_every": 1, "save_every_steps": 4,
                  "keep_last": 50, "tensorboard": False, "progress": False, **train_overrides},
        "eval": {"num_eval": 16, "batch_size": 16},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: " \
                          f"max |diff| {float((a[different[0]] - b[different[0]]).abs().max())}"


def cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clipforge", "train", str(config), "--no-progress", *extra]


def latest_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_mid_epoch_then_resume_latest_equals_an_uninterrupted_run(tmp_path, shards):
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    killed_config = write_config(tmp_path, shards, "killed")
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(cli(killed_config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_step(run_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest_step(run_dir)
    assert killed_at is not None and killed_at < 30  # 10 steps per epoch, 3 epochs
    assert killed_at % 10 != 0, "the kill should land mid-epoch (checkpoints every 4 steps)"
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(cli(killed_config, "--resume", "latest"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_'}" in resumed.stderr

    # the reference: the same config, uninterrupted, in this process (same thread count)
    reference = load_config(write_config(tmp_path, shards, "straight"))
    result = train(reference)
    assert result.steps == 30
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 30
    assert_identical(final_weights(run_dir), final_weights(tmp_path / "straight"))
    # the history reads as one run: one record per step, no duplicates from the killed part
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "event" not in json.loads(line)]
    assert steps == list(range(1, 31))


def test_resume_at_an_epoch_boundary_with_more_steps_equals_an_uninterrupted_run(tmp_path, shards):
    # a constant schedule, so that stopping early (max_steps) does not change the first steps' learning rates
    straight = load_config(write_config(tmp_path, shards, "straight", schedule="constant", epochs=2))
    train(straight)
    first = load_config(write_config(tmp_path, shards, "parts", schedule="constant", epochs=2), ["train.max_steps=10"])
    assert train(first).steps == 10
    second = load_config(write_config(tmp_path, shards, "parts", schedule="constant", epochs=2))
    assert train(second, resume="latest").steps == 20
    assert_identical(final_weights(tmp_path / "parts"), final_weights(tmp_path / "straight"))


def test_resuming_with_an_incompatible_model_fails_before_the_first_step(tmp_path, shards):
    config = load_config(write_config(tmp_path, shards, "run"), ["train.max_steps=4"])
    train(config)
    other = load_config(write_config(tmp_path, shards, "run"), ["model.name=clipforge-vit-tiny"])
    with pytest.raises(ConfigError) as caught:
        train(other, resume="latest")
    message = str(caught.value)
    assert "model.name=clipforge-vit-tiny" in message and "clipforge-vit-micro" in message and "\n" not in message
    other_file = tmp_path / "other.safetensors"  # the weights themselves are still checked by shape
    import shutil

    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors", other_file)
    with pytest.raises(CheckpointError, match="does not match model 'clipforge-vit-tiny'"):
        train(load_config(write_config(tmp_path, shards, "fresh"), ["model.name=clipforge-vit-tiny",
                                                                     f"model.pretrained={other_file}"]))
    assert latest_step(tmp_path / "run") == 4  # nothing was written


class NanAtStep(ClipObjective):
    """CLIP, except that the loss of the 6th call is NaN."""

    calls = 0

    def forward(self, model, batch):
        output = super().forward(model, batch)
        NanAtStep.calls += 1
        if NanAtStep.calls == 6:
            output.losses["contrastive"] = output.losses["contrastive"] * float("nan")
        return output


@pytest.fixture
def nan_objective(monkeypatch):
    from clipforge.objectives import registry

    NanAtStep.calls = 0
    monkeypatch.setitem(registry.OBJECTIVES, "clip", f"{__name__}:NanAtStep")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shards, nan_objective):
    config = load_config(write_config(tmp_path, shards, "nan"), ["train.max_steps=10"])
    with pytest.raises(TrainingDiverged) as caught:
        train(config)
    message = str(caught.value)
    assert "at step 6 " in message and "step_00000004" in message and "\n" not in message
    assert latest_step(tmp_path / "nan") == 4
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "nan").values())


def test_nan_loss_skips_the_step_by_policy(tmp_path, shards, nan_objective):
    config = load_config(write_config(tmp_path, shards, "skip", nan_policy="skip"), ["train.max_steps=10"])
    result = train(config)
    assert result.steps == 10 and result.summary["skipped_steps"] == 1
    logged = [json.loads(line)["step"] for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
              if "event" not in json.loads(line)]
    assert 6 not in logged and 7 in logged  # the skipped step has no loss record
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "skip").values())
