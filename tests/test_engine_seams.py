"""The engine's seams: golden CLIP/SigLIP/FineCLIP steps, optimiser phases, pointer writes, per-rank RNG on
resume, batch metadata, and a config that loads without the heavy libraries."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "helpers" / "train_until_killed.py"

# Recorded with the code before the engine-families change (commit f5eaff6), on this configuration: tiny CLIP,
# SigLIP and FineCLIP, 3 steps on 64 SynthScenes images at 32 px, batch 16, one thread. Losses as float.hex().
GOLDEN = {
    "clip": (["0x1.a50bf40000000p+1", "0x1.6f45500000000p+1", "0x1.86fbe80000000p+1"],
             "33f73f798d3e0f1d0668792bd608e15512bf2006f6094c8a865bdd3ef0dc0fb3", 30511.13361640044),
    "siglip": (["0x1.f8fa840000000p+2", "0x1.20fa9c0000000p+2", "0x1.e1163c0000000p+1"],
               "1244de88c4d6df4df67ba5a3e906bbaae33a20fbd271be7d46aa3d320a38dcd5", 30521.331607625852),
    "fineclip": (["0x1.308c440000000p+3", "0x1.2749740000000p+3", "0x1.1140900000000p+3"],
                 "e7451ca0bde74c6172ddf7b264e3f2925abefaa2d29f4fcb89c2d7dcc240cc9d", 30535.929926988916),
}
GOLDEN_CPU = "AVX512"  # bit-for-bit holds on the CPU kernels the values were recorded with


@pytest.fixture
def shards(tiny_shards) -> Path:
    return tiny_shards


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


@pytest.mark.parametrize("objective", sorted(GOLDEN))
def test_golden_steps_equal_the_code_before_model_families(tmp_path, shards, objective, one_thread):
    from clipforge.engine.loop import train

    body = {"name": objective, "seed": 0, "output_dir": str(tmp_path / objective),
            "data": {"train": str(shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
            "model": {"name": "clipforge-vit-micro"}, "objective": {"name": objective},
            "train": {"max_steps": 3, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "tensorboard": False,
                      "progress": False}}
    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(body))
    train(load_config(path))
    records = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    weights = latest_weights(tmp_path / objective)
    expected_losses, expected_hash, expected_abs_sum = GOLDEN[objective]
    if torch.backends.cpu.get_cpu_capability() == GOLDEN_CPU:
        digest = hashlib.sha256()
        for key in sorted(weights):
            digest.update(key.encode())
            digest.update(weights[key].numpy().tobytes())
        assert [float(x).hex() for x in losses] == expected_losses
        assert digest.hexdigest() == expected_hash
    else:  # other SIMD kernels round differently: the same numbers to float precision
        assert losses == pytest.approx([float.fromhex(x) for x in expected_losses], rel=1e-5)
        assert sum(float(v.double().abs().sum()) for v in weights.values()) == pytest.approx(expected_abs_sum,
                                                                                             rel=1e-6)


def test_a_second_phase_has_its_own_lr_schedule_and_start_step(tmp_path, shards, one_thread):
    from clipforge.engine.loop import train
    from clipforge.engine.optim import learning_rate
    from clipforge.objectives.toy_gan import DISC_LR, DISC_START

    body = {"name": "gan", "output_dir": str(tmp_path / "gan"),
            "data": {"train": str(shards), "batch_size": 8, "shuffle_buffer": 32},
            "model": {"family": "toy", "name": "toy-classifier-tiny"}, "objective": {"name": "toy_gan"},
            "train": {"max_steps": 5, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "tensorboard": False}}
    path = tmp_path / "gan.yaml"
    path.write_text(yaml.safe_dump(body))
    result = train(load_config(path))
    records = [json.loads(line) for line in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        step = record["step"] - 1  # the optimiser step the record's lr was set for
        assert record["lr"] == pytest.approx(learning_rate(step, 1e-3, 2, 5, "cosine"))
        # the discriminator: its own base lr, no warm-up, a cosine counted from its start step
        assert record["lr/discriminator"] == pytest.approx(
            learning_rate(max(step, DISC_START) - DISC_START, DISC_LR, 0, 5 - DISC_START, "cosine"))
        assert ("loss/discriminator/hinge" in record) == (step >= DISC_START)
        assert ("loss/adversarial" in record) == (step > DISC_START)
    state = load_file(str(result.checkpoint / "state.safetensors"))
    assert any(k.startswith("optimizer@discriminator.") for k in state)
    assert result.summary["final_metrics"]["lr/discriminator"] == records[-1]["lr/discriminator"]


def test_a_torn_pointer_write_keeps_the_previous_checkpoint_and_best_survives_pruning(tmp_path, monkeypatch):
    import clipforge.engine.checkpointing as checkpointing
    from clipforge.config import ModelConfig
    from clipforge.engine.checkpointing import TrainingState, resolve_resume, save_checkpoint
    from clipforge.errors import CheckpointError
    from clipforge.models import create_model

    bundle = create_model(ModelConfig(family="toy", name="toy-classifier-tiny"))
    optimizer = {"main": torch.optim.AdamW(bundle.model.parameters())}
    root = tmp_path / "run" / "checkpoints"

    def save(step, best):
        state = TrainingState(step=step, best_loss=1.0 / step)
        return save_checkpoint(root, bundle, optimizer, None, state, [], {}, keep_last=1, is_best=best)

    save(1, True)
    save(2, False)
    real_dump = json.dump

    def torn_dump(payload, handle, **kwargs):  # half of the pointer reaches the disk, then the disk fails
        if isinstance(payload, dict) and set(payload) >= {"path", "step"}:
            text = json.dumps(payload)
            handle.write(text[: len(text) // 2])
            handle.flush()
            raise OSError(28, "No space left on device")
        return real_dump(payload, handle, **kwargs)

    monkeypatch.setattr(checkpointing.json, "dump", torn_dump)
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        save(3, True)
    monkeypatch.setattr(checkpointing.json, "dump", real_dump)
    for pointer, step in (("latest.json", 2), ("best.json", 1)):
        body = json.loads((root / pointer).read_text())  # still parses
        assert body["path"] == f"step_{step:08d}" and (root / body["path"] / "model.safetensors").is_file()
    assert resolve_resume(tmp_path / "run", "latest") == root / "step_00000002"
    save(4, False)  # keep_last=1 prunes everything but the newest and what the pointers name
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert "step_00000001" in kept and "step_00000004" in kept and "step_00000002" not in kept
    assert json.loads((root / "best.json").read_text())["path"] == "step_00000001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_with_dropout_resume_each_with_its_own_rng_state(tmp_path, shards):
    """Dropout draws differ per rank; a resume that gave every rank rank 0's stream would differ from this."""
    def config(name: str) -> Path:
        body = {"name": name, "seed": 0, "output_dir": str(tmp_path / name),
                "data": {"train": str(shards), "batch_size": 4, "workers": 0, "shuffle_buffer": 16},
                "model": {"family": "toy", "name": "toy-classifier-tiny"}, "objective": {"name": "classify"},
                "train": {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "log_every": 1, "save_every_steps": 3,
                          "keep_last": 10, "tensorboard": False, "progress": False}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    killed = torchrun(str(KILLER), str(config("killed")), "3")
    assert killed.returncode != 0 and json.loads(
        (tmp_path / "killed" / "checkpoints" / "latest.json").read_text())["step"] == 3, killed.stderr[-2000:]
    state = json.loads((tmp_path / "killed" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert len(state["rng"]) == 2 and state["rng"][0]["torch"] != state["rng"][1]["torch"]
    resumed = torchrun("-m", "clipforge", "train", str(config("killed")), "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = torchrun("-m", "clipforge", "train", str(config("straight")), "--no-progress")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = latest_weights(tmp_path / "killed"), latest_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_batch_type_keeps_skipped_and_position_when_moved():
    from clipforge.data.batches import (
        IGNORE_INDEX,
        DocumentBatch,
        ImageTextBatch,
        LabelledImageBatch,
        RegionBatch,
    )

    common = {"skipped": {"truncated_image": 2}, "position": {"worker": 0, "index": 3}}
    batches = [
        LabelledImageBatch(images=torch.zeros(2, 3, 4, 4), labels=torch.tensor([0, 1]), keys=["a", "b"], **common),
        ImageTextBatch(images=torch.zeros(2, 3, 4, 4), texts=torch.zeros(2, 5, dtype=torch.long),
                       labels=torch.tensor([0, 1]), keys=["a", "b"], **common),
        RegionBatch(images=torch.zeros(2, 3, 4, 4), texts=torch.zeros(2, 5, dtype=torch.long),
                    labels=torch.tensor([0, 1]), keys=["a", "b"], boxes=torch.zeros(2, 1, 4),
                    region_texts=torch.zeros(2, 1, 5, dtype=torch.long), region_valid=torch.ones(2, 1, dtype=torch.bool),
                    **common),
        DocumentBatch(images=torch.zeros(1, 3, 4, 4), tokens=torch.zeros(2, 6, dtype=torch.long),
                      attention_mask=torch.ones(2, 6, dtype=torch.bool),
                      targets=torch.full((2, 6), IGNORE_INDEX), image_spans=torch.tensor([[0, 1, 3]]),
                      keys=["d0", "d1"], **common),
    ]
    for batch in batches:
        moved = batch.to("cpu")
        assert type(moved) is type(batch) and moved.skipped == common["skipped"]
        assert moved.position == common["position"] and len(moved) == 2


def test_loading_a_config_imports_neither_torch_nor_sklearn_nor_open_clip():
    code = ("import sys; from clipforge.config import load_config; "
            "load_config('configs/clip_synth_tiny.yaml', ['objective.name=fineclip', 'eval.tasks=[regions]']); "
            "print(sorted(m for m in ('torch', 'sklearn', 'open_clip', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_objective_registered_at_run_time_is_a_valid_config_name(monkeypatch):
    from clipforge.errors import ConfigError
    from clipforge.registry import OBJECTIVES

    with pytest.raises(ConfigError, match="unknown objective 'mine'"):
        load_config(overrides=["objective.name=mine"])
    monkeypatch.setitem(OBJECTIVES, "mine", "clipforge.objectives.clip:ClipObjective")
    assert load_config(overrides=["objective.name=mine"]).objective.name == "mine"


def test_recorded_losses_and_metrics_are_means_over_ranks(tmp_path, shards, one_thread, monkeypatch):
    """A second rank that reports zeros halves every recorded number; a name only one rank reports keeps its
    value (ranks may differ, e.g. a batch with no regions)."""
    import clipforge.engine.loop as loop
    from clipforge.engine.loop import train

    body = {"name": "r", "output_dir": str(tmp_path / "r"),
            "data": {"train": str(shards), "batch_size": 16, "shuffle_buffer": 32},
            "model": {"name": "clipforge-vit-micro"},
            "train": {"max_steps": 2, "warmup_steps": 1, "log_every": 1, "tensorboard": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    alone = train(load_config(path)).summary["final_metrics"]
    gather = loop.dist_utils.all_gather_objects

    def with_a_zero_rank(obj):
        if isinstance(obj, dict) and obj and all(isinstance(v, float) for v in obj.values()):
            other = {k: 0.0 for k in obj if k != "logit_scale"}  # the other rank: zeros, and no logit_scale
            return [obj, other]
        return gather(obj)

    monkeypatch.setattr(loop.dist_utils, "all_gather_objects", with_a_zero_rank)
    two = train(load_config(path, ["output_dir=" + str(tmp_path / "r2")]))
    records = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["i2t_acc"] == pytest.approx(alone["i2t_acc"] / 2)
    assert records[-1]["loss/contrastive"] == pytest.approx(alone["loss/contrastive"] / 2)
    assert records[-1]["logit_scale"] == pytest.approx(alone["logit_scale"])  # reported by one rank only
    assert two.summary["final_loss"] == pytest.approx(records[-1]["loss"])
