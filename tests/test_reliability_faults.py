"""Faults while training: SIGKILL at chosen moments then --resume latest, NaN/inf in the loss or the gradients,
a full disk while writing a checkpoint, data gone on resume, a corrupt checkpoint pointer, and a rank of a
2-process gloo run killed.

What must hold: every resumed run ends with weights identical (torch.equal) to an uninterrupted run with the
same seed; `latest.json` always points at a complete checkpoint and no partial one is ever loaded; a numerical
fault stops or skips by policy, says at which step, and leaves the last good checkpoint intact; a rank's death
ends the other rank with an error instead of a hang.

Kill moments are made exact with a wrapper process (PAUSE_WRAPPER) that runs the real `clipforge train` entry
with one function patched to write a marker file and sleep at the chosen call: inside a checkpoint write (with a
half-written file on disk), while `latest.json` is being replaced, while a sample is being decoded, or between
a step's forward and backward. The test waits for the marker and sends SIGKILL. benchmarks/reliability.py
imports these helpers and runs more moments.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipforge.config import load_config
from clipforge.objectives.clip import ClipObjective

ROOT = Path(__file__).resolve().parents[1]



# ----------------------------------------------------------------------------------------------------------
# Configs and checkpoint inspection


def write_config(folder: Path, name: str, world_size: int = 1, **train) -> Path:
    """A tiny run: 48 SynthScenes images of 32 px, batch 8, the micro model, 2 epochs, a checkpoint every 2
    steps: 12 steps (6 per epoch) on one process, 6 steps (3 per epoch) on two."""
    body = {
        "name": name, "seed": 0, "output_dir": str(folder / name),
        "data": {"batch_size": 8, "workers": 0, "shuffle_buffer": 16,
                 "synth": {"num_train": 48, "num_val": 8, "image_size": 32, "shard_size": 16}},
        "model": {"name": "clipforge-vit-micro"},
        "train": {"epochs": 2, "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
                  "save_every_steps": 2, "keep_last": 50, "tensorboard": False, "progress": False, "device": "cpu",
                  **train},
        "eval": {"num_eval": 8, "batch_size": 8},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def latest_pointer(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]
    except (OSError, ValueError, KeyError):
        return None


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / latest_pointer(run_dir) / "model.safetensors"))


def weights_differ(a: dict, b: dict) -> list[str]:
    """Names of tensors that are not bit-identical (all of them if the key sets differ)."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b)) or ["<keys>"]
    return [k for k in a if not torch.equal(a[k], b[k])]


def checkpoint_problem(folder: Path) -> str | None:
    """None when `folder` is a complete, loadable checkpoint; otherwise what is wrong with it."""
    from clipforge.engine.checkpointing import read_checkpoint
    from clipforge.errors import CheckpointError

    for name in ("model.safetensors", "state.safetensors", "state.json"):
        if not (folder / name).is_file():
            return f"{name} missing"
    try:
        loaded = read_checkpoint(folder)
        weights = load_file(str(folder / "model.safetensors"))
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        return f"unreadable ({err})"
    if f"step_{loaded.training.step:08d}" != folder.name:
        return f"state.json says step {loaded.training.step}"
    if not all(torch.isfinite(v).all() for v in weights.values()):
        return "non-finite weights"
    return None


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def partial_folders(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp")) if root.is_dir() else []


# ----------------------------------------------------------------------------------------------------------
# Killing at a chosen moment

PAUSE_WRAPPER = r"""
import os, sys, time
where, count = os.environ["REL_PAUSE"].split(":")
count, marker, calls = int(count), os.environ["REL_MARKER"], [0]

def pause(note=""):
    calls[0] += 1
    if calls[0] == count:
        with open(marker + ".tmp", "w") as handle:
            handle.write(f"{where}:{count} {note}")
        os.replace(marker + ".tmp", marker)
        time.sleep(3600)

if where == "checkpoint":  # a half-written model.safetensors in the temporary checkpoint folder
    import clipforge.models.checkpoint as weights
    original_save = weights.save_file
    def save_file(tensors, path, *args, **kwargs):
        original_save(tensors, path, *args, **kwargs)
        if calls[0] + 1 == count:
            size = os.path.getsize(path)
            with open(path, "r+b") as handle:
                handle.truncate(size // 2)
        pause(path)
    weights.save_file = save_file
elif where == "latest":  # the new step folder is in place, latest.json not yet replaced
    import clipforge.engine.checkpointing as checkpointing
    original_write = checkpointing.write_json_atomic
    def write_json(path, payload):
        if path.name == "latest.json":
            pause(str(path))
        original_write(path, payload)
    checkpointing.write_json_atomic = write_json
elif where == "data":  # while a sample is being decoded (by its batch type)
    import clipforge.data.batches as batches
    original_decode = batches.decode_sample
    def decode_sample(*args, **kwargs):
        pause()
        return original_decode(*args, **kwargs)
    batches.decode_sample = decode_sample
elif where == "step":  # after a step's forward, before its backward
    from clipforge.objectives.clip import ClipObjective
    original_forward = ClipObjective.forward
    def forward(self, model, batch):
        output = original_forward(self, model, batch)
        pause()
        return output
    ClipObjective.forward = forward
from clipforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class KillMoment:
    where: str  # checkpoint | latest | data | step | time
    count: int  # the call at which to pause (for 'time': milliseconds after the first logged step)

    @property
    def label(self) -> str:
        return f"{self.where}:{self.count}"


def random_moments(seed: int, n: int) -> list[KillMoment]:
    """n moments drawn by `seed`, cycling through the kinds: during a checkpoint write, while latest.json is
    replaced, during data loading, mid-step, and at a random time."""
    rng = random.Random(seed)
    kinds = ["checkpoint", "data", "step", "latest", "time"]
    ranges = {"checkpoint": (2, 5), "latest": (2, 5), "data": (5, 90), "step": (2, 11), "time": (0, 1500)}
    return [KillMoment(kinds[i % len(kinds)], rng.randint(*ranges[kinds[i % len(kinds)]])) for i in range(n)]


def child_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def start_paused(config: Path, moment: KillMoment, marker: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """Start `clipforge train` in a wrapper that pauses at `moment` (not for 'time', which needs no hook)."""
    env = child_env(**(extra_env or {}))
    if moment.where != "time":
        env.update(REL_PAUSE=moment.label, REL_MARKER=str(marker))
        argv = [sys.executable, "-c", PAUSE_WRAPPER, "train", str(config), "--no-progress"]
    else:
        argv = [sys.executable, "-m", "clipforge", "train", str(config), "--no-progress"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_and_kill(process: subprocess.Popen, moment: KillMoment, marker: Path, run_dir: Path,
                  timeout: float = 300) -> bool:
    """SIGKILL the process at its moment; False if it finished (or failed) before reaching it."""
    deadline = time.monotonic() + timeout
    if moment.where == "time":
        while not (run_dir / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(moment.count / 1000)
    else:
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    reached = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return reached


@dataclass
class KillReport:
    moment: str
    killed: bool
    latest_before: str | None  # what latest.json pointed at after the kill
    latest_problem: str | None  # None = complete
    partial: list[str]  # temporary checkpoint folders left by the kill
    resumed_from: str | None
    resumed_digest_unchanged: bool  # the checkpoint read by the resume was not modified by it
    steps: int
    identical: bool
    differing: int
    partial_after: list[str]


def resume_and_compare(config: Path, run_dir: Path, reference: dict, moment: KillMoment, killed: bool) -> KillReport:
    """Inspect the killed run folder, resume it (in this process) with --resume latest, compare the weights."""
    from clipforge.engine.loop import train

    latest = latest_pointer(run_dir)
    folder = run_dir / "checkpoints" / latest if latest else None
    problem = checkpoint_problem(folder) if folder else None
    digest = folder_digest(folder) if folder and folder.is_dir() else None
    partial = partial_folders(run_dir)
    events = []
    result = train(load_config(config), resume="latest", on_event=events.append)
    start = next(e for e in events if e.kind == "start")
    resumed_from = start.data.get("resumed_from")
    unchanged = digest is None or (folder.is_dir() and folder_digest(folder) == digest) or \
        not folder.is_dir()  # pruned later is fine: it was read intact at the start
    different = weights_differ(final_weights(run_dir), reference)
    return KillReport(moment.label, killed, latest, problem, partial,
                      Path(resumed_from).name if resumed_from else None, unchanged, result.steps, not different,
                      len(different), partial_folders(run_dir))


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Final weights of the uninterrupted run (in this process, same thread count as the children)."""
    from clipforge.engine.loop import train

    folder = tmp_path_factory.mktemp("reference")
    result = train(load_config(write_config(folder, "straight")))
    assert result.steps == 12
    return final_weights(folder / "straight")


# ----------------------------------------------------------------------------------------------------------
# Crash and resume


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_latest_ends_identical(tmp_path, reference):
    """Killed inside a checkpoint write (a half-written file on disk), during data loading, and mid-step; the
    three killed runs go at once (their start-up dominates), then each is resumed and compared."""
    rng = random.Random(6)
    moments = [KillMoment("checkpoint", rng.randint(2, 4)), KillMoment("data", rng.randint(10, 80)),
               KillMoment("step", rng.randint(3, 10))]
    runs = []
    for i, moment in enumerate(moments):
        config = write_config(tmp_path, f"killed{i}")
        marker = tmp_path / f"marker{i}"
        runs.append((config, tmp_path / f"killed{i}", marker, moment, start_paused(config, moment, marker)))
    killed = [(config, run_dir, moment, wait_and_kill(process, moment, marker, run_dir))
              for config, run_dir, marker, moment, process in runs]
    for config, run_dir, moment, reached in killed:
        assert reached, f"{moment.label}: the run ended before the kill"
        report = resume_and_compare(config, run_dir, reference, moment, reached)
        if moment.where == "checkpoint":
            assert report.partial, "the kill should have left a partial checkpoint folder"
        assert report.latest_problem is None, report
        assert report.resumed_from == report.latest_before, report  # the complete one, never the partial one
        assert report.resumed_digest_unchanged
        assert report.steps == 12 and report.identical, report
        assert report.partial_after == []  # the resumed run cleaned up what the kill left


# ----------------------------------------------------------------------------------------------------------
# Numerical faults


class _NanGrad(torch.autograd.Function):
    """Value 0 (the loss stays finite), gradient NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class FaultyClip(ClipObjective):
    """CLIP with a fault injected at one forward call: a NaN or inf loss, or a NaN gradient behind a finite loss."""

    fault = "loss_nan"
    at_call = 5
    calls = 0

    def forward(self, model, batch):
        output = super().forward(model, batch)
        FaultyClip.calls += 1
        if FaultyClip.calls == FaultyClip.at_call:
            name = next(iter(output.losses))
            if FaultyClip.fault == "loss_nan":
                output.losses[name] = output.losses[name] * float("nan")
            elif FaultyClip.fault == "loss_inf":
                output.losses[name] = output.losses[name] + float("inf")
            elif FaultyClip.fault == "grad_nan":
                output.losses[name] = output.losses[name] + _NanGrad.apply(model.logit_scale)
        return output


@pytest.fixture
def inject(monkeypatch):
    from clipforge.objectives import registry

    def arm(fault: str, at_call: int) -> None:
        FaultyClip.fault, FaultyClip.at_call, FaultyClip.calls = fault, at_call, 0

    monkeypatch.setitem(registry.OBJECTIVES, "clip", f"{__name__}:FaultyClip")
    return arm


def _all_checkpoints_good(run_dir: Path) -> dict[str, str | None]:
    root = run_dir / "checkpoints"
    if not root.is_dir():  # stopped before the first checkpoint
        return {}
    return {p.name: checkpoint_problem(p) for p in sorted(root.iterdir()) if p.name.startswith("step_")}


def test_an_infinite_loss_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, inject):
    """(A NaN loss is covered by tests/test_resume.py; here inf, through the CLI.)"""
    import clipforge.cli

    inject("loss_inf", at_call=5)
    config = write_config(tmp_path, "diverge")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = clipforge.cli.main(["train", str(config), "--no-progress"])
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("clipforge: error")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in stderr.getvalue()
    assert "at step 5 " in lines[0] and "step_00000004" in lines[0]
    run_dir = tmp_path / "diverge"
    assert latest_pointer(run_dir) == "step_00000004"
    assert _all_checkpoints_good(run_dir) == {"step_00000002": None, "step_00000004": None}


def test_a_non_finite_loss_is_skipped_by_policy_and_the_run_goes_on(tmp_path, inject):
    from clipforge.engine.loop import train

    inject("loss_inf", at_call=3)
    events = []
    result = train(load_config(write_config(tmp_path, "skip", nan_policy="skip", max_steps=4)),
                   on_event=events.append)
    skips = [e for e in events if e.kind == "skip"]
    assert len(skips) == 1 and skips[0].step == 3 and "step 3 " in skips[0].data["where"]
    assert result.steps == 4 and result.summary["skipped_steps"] == 1
    assert all(problem is None for problem in _all_checkpoints_good(tmp_path / "skip").values())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_gradient_is_caught_at_its_step_and_never_checkpointed(tmp_path, inject, policy):
    from clipforge.engine.loop import TrainingDiverged, train

    inject("grad_nan", at_call=2)  # step 2 is also a checkpoint step
    config = load_config(write_config(tmp_path, "grad", nan_policy=policy, max_steps=4))
    if policy == "stop":
        with pytest.raises(TrainingDiverged) as caught:
            train(config)
        assert "gradient norm became nan at step 2 " in str(caught.value) and "\n" not in str(caught.value)
    else:
        result = train(config)
        assert result.steps == 4 and result.summary["skipped_steps"] == 1
    checkpoints = _all_checkpoints_good(tmp_path / "grad")
    assert all(problem is None for problem in checkpoints.values()), checkpoints


# ----------------------------------------------------------------------------------------------------------
# Preflight and the run folder


def _fail_second_checkpoint(monkeypatch) -> None:
    """The disk fills up in the middle of writing the second checkpoint's weights."""
    import clipforge.models.checkpoint as weights

    original = weights.save_file
    calls = [0]

    def save_file(tensors, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            original(tensors, path, *args, **kwargs)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(weights, "save_file", save_file)


def test_a_full_disk_during_a_checkpoint_leaves_latest_intact_and_the_run_resumable(tmp_path, monkeypatch,
                                                                                    reference):
    from clipforge.engine.loop import train
    from clipforge.errors import CheckpointError

    config = write_config(tmp_path, "full")
    with monkeypatch.context() as patch:
        _fail_second_checkpoint(patch)
        with pytest.raises(CheckpointError) as caught:
            train(load_config(config))
    assert "step 4" in str(caught.value) and "No space" in str(caught.value)
    run_dir = tmp_path / "full"
    assert latest_pointer(run_dir) == "step_00000002"
    assert checkpoint_problem(run_dir / "checkpoints" / "step_00000002") is None
    assert not (run_dir / "checkpoints" / "step_00000004").exists()  # the half-written one never took its name
    result = train(load_config(config), resume="latest")
    assert result.steps == 12 and not weights_differ(final_weights(run_dir), reference)
    assert partial_folders(run_dir) == []


def test_a_full_disk_during_a_checkpoint_is_reported_in_one_line(tmp_path, monkeypatch):
    import clipforge.cli

    _fail_second_checkpoint(monkeypatch)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = clipforge.cli.main(["train", str(write_config(tmp_path, "full")), "--no-progress"])
        except OSError:
            status = "traceback"
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("clipforge: error")]
    assert status == 2 and len(lines) == 1 and "No space" in lines[0]


def test_resume_with_the_data_gone_fails_before_the_first_step_and_touches_nothing(tmp_path):
    """Real shards (not synth, which would be regenerated) moved away between the runs."""
    import clipforge.cli
    from clipforge.data.shards import write_shards
    from clipforge.data.synth import SynthScenes
    from clipforge.engine.loop import train

    shards = tmp_path / "shards"
    write_shards(SynthScenes(image_size=32, seed=1).records(0, 32), shards, shard_size=16)
    config = write_config(tmp_path, "gone", max_steps=2)
    body = yaml.safe_load(config.read_text())
    body["data"]["train"] = str(shards)
    config.write_text(yaml.safe_dump(body))
    train(load_config(config))
    run_dir = tmp_path / "gone"
    before = {p.name: folder_digest(p) if p.is_dir() else p.read_bytes() for p in sorted(run_dir.rglob("*"))
              if p.is_file() or p.name.startswith("step_")}
    shards.rename(tmp_path / "moved")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = clipforge.cli.main(["train", str(config), "--resume", "latest", "--no-progress"])
    assert status == 2 and stderr.getvalue().count("\n") == 1 and "does not exist" in stderr.getvalue()
    after = {p.name: folder_digest(p) if p.is_dir() else p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() or p.name.startswith("step_")}
    assert after == before


def test_resume_latest_with_an_unreadable_pointer_does_not_silently_start_over(tmp_path):
    from clipforge.engine.loop import train
    from clipforge.errors import CheckpointError

    config = write_config(tmp_path, "pointer", max_steps=2)
    train(load_config(config))
    (tmp_path / "pointer" / "checkpoints" / "latest.json").write_text('{"path": "step_000')  # torn write
    events = []
    try:
        train(load_config(config, ["train.max_steps=4"]), resume="latest", on_event=events.append)
    except CheckpointError:
        return  # refusing is fine
    start = next(e for e in events if e.kind == "start")
    assert start.step == 2, f"resumed at step {start.step}: the progress of the first run was dropped"


@pytest.mark.parametrize("name", ["/etc", "../../elsewhere", "..", "step_00000002/../.."])
def test_resume_latest_refuses_a_pointer_outside_the_checkpoints_folder(tmp_path, name):
    from clipforge.engine.checkpointing import resolve_resume
    from clipforge.errors import CheckpointError

    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "latest.json").write_text(json.dumps({"path": name, "step": 2}))
    with pytest.raises(CheckpointError, match="not a checkpoint folder beside it"):
        resolve_resume(tmp_path / "run", "latest")


def test_resume_refuses_a_checkpoint_with_truncated_weights_in_one_line(tmp_path):
    from clipforge.engine.loop import train
    from clipforge.errors import CheckpointError

    config = write_config(tmp_path, "torn", max_steps=2)
    train(load_config(config))
    weights = tmp_path / "torn" / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as caught:
        train(load_config(config, ["train.max_steps=4"]), resume="latest")
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------------
# Distributed faults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(config: Path, port: int, pause_rank1: KillMoment | None, marker: Path,
                 extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Two gloo processes running the real train entry, with the environment torchrun would set."""
    processes = []
    for rank in range(2):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if rank == 1 and pause_rank1 is not None:
            env.update(REL_PAUSE=pause_rank1.label, REL_MARKER=str(marker))
            argv = [sys.executable, "-c", PAUSE_WRAPPER, "train", str(config), "--no-progress", *extra]
        else:
            argv = [sys.executable, "-m", "clipforge", "train", str(config), "--no-progress", *extra]
        processes.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    return processes


@dataclass
class RankKillReport:
    killed: bool
    survivor_status: int | None  # None = still running after the timeout (a hang)
    survivor_seconds: float
    survivor_lines: list[str]  # the last lines of its stderr
    survivor_traceback: bool
    latest_before: str | None
    resumed_status: int | None
    resumed_steps: int | None
    latest_after: str | None


def kill_a_rank_then_resume(folder: Path, moment: KillMoment, timeout: float = 120) -> RankKillReport:
    config = write_config(folder, "ddp", world_size=2)
    run_dir = folder / "ddp"
    marker = folder / "rank1-marker"
    ranks = launch_ranks(config, free_port(), moment, marker)
    killed = wait_and_kill(ranks[1], moment, marker, run_dir, timeout=300)
    started = time.monotonic()
    try:
        _, stderr = ranks[0].communicate(timeout=timeout)
        status = ranks[0].returncode
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        _, stderr = ranks[0].communicate()
        status = None
    seconds = time.monotonic() - started
    lines = [line for line in (stderr or "").splitlines() if line.strip()]
    latest = latest_pointer(run_dir)
    resumed = launch_ranks(config, free_port(), None, marker, ("--resume", "latest"))
    statuses = []
    for process in resumed:
        try:
            process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        statuses.append(process.returncode)
    summary = run_dir / "summary.json"
    steps = json.loads(summary.read_text())["steps"] if summary.is_file() else None
    return RankKillReport(killed, status, seconds, lines[-3:], any("Traceback" in line for line in lines), latest, max(statuses, key=abs), steps,
                          latest_pointer(run_dir))


@pytest.fixture(scope="module")
def rank_kill(tmp_path_factory) -> RankKillReport:
    return kill_a_rank_then_resume(tmp_path_factory.mktemp("ddp"), KillMoment("step", 4))


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_with_an_error_not_a_hang_and_the_run_resumes(rank_kill):
    report = rank_kill
    assert report.killed, "rank 1 finished before the kill"
    assert report.survivor_status not in (None, 0), report  # it ended by itself, with a failure status
    assert report.latest_before is not None  # checkpoints every 2 steps: step 2 or 4 was complete
    assert report.resumed_status == 0 and report.resumed_steps == 6, report
    assert report.latest_after == "step_00000006"


@pytest.mark.slow
def test_a_killed_rank_is_reported_in_one_line(rank_kill):
    lines = rank_kill.survivor_lines
    assert lines and lines[-1].startswith("clipforge: error") and not rank_kill.survivor_traceback, lines
    assert "lost contact with another rank at step" in lines[-1]
