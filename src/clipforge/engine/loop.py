"""The one training loop. Every objective (CLIP, SigLIP, FineCLIP, classify, ...) trains through `train()`.

Read top to bottom, one stage per function:
  _set_up      check everything a user can get wrong, before any work (run folder, resume, config changes)
  _build       the model (through its family), objective, DDP wrapper, data and optimiser phases
  _restore     optimiser, scaler, RNG and data position from the checkpoint being resumed
  _open        the run folder's records, once every check has passed
  _step        one optimiser step: micro-batches, forward, backward, each optimiser phase
  _record      a log record from whatever the objective returned (losses and metrics)
  _finish      plots and the summary
The loop knows the objective contract (objectives/base.py) and the ModelBundle, never a model's insides: it
reads no attribute of the model. Evaluation is not the engine's: `clipforge train` runs the configured
evaluation tasks after `train()` returns (eval.at_end).

Gradient accumulation (train.accum_steps = k) is plain accumulation: each of the k micro-batches is a
separate contrastive problem (its negatives are its own batch), and their gradients are averaged. For CLIP
that is an approximation of one k-times larger batch (fewer negatives per row), not the two-pass
cached-feature scheme of GradCache; the gradient is exact for the mean of the micro-batch losses.

The library does not print: progress is reported through `on_event(TrainEvent)`, which the CLI renders.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.deterministic
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge import distributed as dist_utils
from clipforge.config import ExperimentConfig, read_yaml, save_config, to_dict
from clipforge.engine.checkpointing import (
    LoadedCheckpoint,
    TrainingState,
    capture_rng,
    config_hash,
    read_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from clipforge.engine.optim import (
    PhaseOptimizer,
    build_phase_optimizers,
    reset_base_learning_rates,
    set_phase_learning_rate,
)
from clipforge.engine.precision import autocast, check_precision, grad_scaler, resolve_device
from clipforge.engine.preflight import (
    RunLock,
    check_not_a_previous_run,
    check_not_locked,
    check_output_dir,
    clear_previous_run,
    make_output_dir,
)
from clipforge.engine.records import (
    RunRecorder,
    read_metrics,
    split_sample_counts,
    write_plots,
    write_summary,
)
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError, DataError
from clipforge.models.factory import create_model, load_trained_weights, resolve_model_name
from clipforge.objectives.base import MAIN_PHASE, ObjectiveOutput
from clipforge.objectives.registry import build_objective, objective_model_kwargs

MAX_CONSECUTIVE_SKIPS = 20  # with nan_policy=skip, this many non-finite steps in a row means the run is broken
# config keys a resumed run cannot change: the checkpoint holds a different model or objective otherwise
FIXED_ON_RESUME = ("model.family", "model.name", "objective.name")


class TrainingDiverged(ClipforgeError):
    """The loss became NaN or infinite (nan_policy=stop, or too many skipped steps)."""


@dataclass
class TrainEvent:
    kind: str  # start | step | log | checkpoint | skip | end
    step: int
    total_steps: int
    epoch: int
    data: dict = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    summary: dict
    checkpoint: Path | None


class ObjectiveModule(nn.Module):
    """The model and its objective as one module, so that DDP wraps every forward path an objective uses."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch, phase: str | None = None) -> ObjectiveOutput:
        if phase is None:  # a single-phase objective's forward takes no phase
            return self.objective(self.model, batch)
        return self.objective(self.model, batch, phase=phase)


@dataclass
class Run:
    """What the stages share. Built up by _set_up, _build, _restore and _open, then advanced by _step."""

    config: ExperimentConfig
    device: torch.device
    info: dist_utils.DistInfo
    emit: Callable[[TrainEvent], None]
    loaded: LoadedCheckpoint | None = None
    config_changes: dict = field(default_factory=dict)
    lock: RunLock | None = None
    bundle: object = None
    objective: nn.Module = None
    module: ObjectiveModule = None
    wrapped: nn.Module = None
    phases: list[PhaseOptimizer] = field(default_factory=list)
    scaler: object = None
    sources: object = None
    preprocess: Callable = None
    state: TrainingState = field(default_factory=TrainingState)
    micro_per_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    global_batch: int = 0
    resume_position: object = None  # the data layer's position (opaque here), when resuming mid-epoch
    pending_rng: dict | None = None
    recorder: RunRecorder | None = None
    meta: dict = field(default_factory=dict)
    timers: dict = field(default_factory=lambda: dict.fromkeys(
        ("data", "forward", "backward", "optimizer", "checkpoint"), 0.0))
    sample_counts: dict = field(default_factory=dict)  # skipped and converted samples, by kind
    skipped_steps: int = 0
    consecutive_skips: int = 0
    window_loss: float = 0.0  # mean loss since the last checkpoint decides "best"
    window_steps: int = 0
    last_log: dict = field(default_factory=dict)
    last_record: dict = field(default_factory=dict)
    last_checkpoint: Path | None = None
    current_position: object = None
    train_start: float = 0.0
    samples_at_start: int = 0

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def multi_phase(self) -> bool:
        return len(self.phases) > 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    config: ExperimentConfig,
    resume: str | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train `config`; `resume` is None, "latest" or a checkpoint path; `overwrite` starts a run folder over."""
    env = dist_utils.read_env()
    device = resolve_device(config.train.device, env.local_rank)
    check_precision(config.model.precision, device)
    started_group = env.world_size > 1 and not torch.distributed.is_initialized()
    info = dist_utils.init_distributed(device)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.utils.deterministic.fill_uninitialized_memory)
    if device.type == "cpu":
        # Bitwise-reproducible CPU runs (exact resume): warn if an op without a deterministic kernel is used.
        # Filling every new tensor with NaN (the mode's debugging aid) costs ~7% on the tiny model: off.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    run = Run(config, device, info, on_event or (lambda event: None))
    try:
        _set_up(run, resume, overwrite)
        _build(run)
        _restore(run)
        _open(run, overwrite)
        with _peer_loss_reported(run):  # a dead peer rank: one line, not a gloo/NCCL traceback
            _train_epochs(run)
        return _finish(run)
    finally:
        if run.lock is not None:
            run.lock.release()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
        if started_group:
            dist_utils.shutdown_distributed()


# ---- set up: everything a user can get wrong fails here, before any work, with one line --------------------

def _set_up(run: Run, resume: str | None, overwrite: bool) -> None:
    config, run_dir = run.config, run.run_dir
    if run.info.is_main:
        check_output_dir(run_dir)
        check_not_a_previous_run(run_dir, resume, overwrite)
        check_not_locked(run_dir)
    checkpoint_dir = resolve_resume(run_dir, resume)
    if resume is not None and resume != "latest" and checkpoint_dir is None:
        raise CheckpointError(f"--resume '{resume}' found no checkpoint")
    resolve_model_name(config.model)  # unknown family or architecture -> ConfigError before data work
    if checkpoint_dir is None:
        return
    run.loaded = read_checkpoint(checkpoint_dir)
    run.config_changes = _config_changes(checkpoint_dir, config)
    fixed = [key for key in FIXED_ON_RESUME if key in run.config_changes]
    recorded_objective = run.loaded.meta.get("objective")
    if recorded_objective not in (None, config.objective.name) and "objective.name" not in fixed:
        run.config_changes["objective.name"] = (recorded_objective, config.objective.name)
        fixed.append("objective.name")
    if fixed:
        old, new = run.config_changes[fixed[0]]
        raise ConfigError(f"cannot resume '{checkpoint_dir}' with {fixed[0]}={new}: it was trained with {old} "
                          f"(start a new run, or fine-tune from its weights with model.pretrained)")


def _config_changes(checkpoint_dir: Path, config: ExperimentConfig) -> dict[str, tuple]:
    """Dotted key -> (value in the run's config.yaml, value now), for every leaf that differs."""
    saved_file = checkpoint_dir.parent.parent / "config.yaml"
    if not saved_file.is_file():
        return {}
    try:
        saved = read_yaml(saved_file)
    except ConfigError:
        return {}
    changes: dict[str, tuple] = {}

    def walk(before, now, prefix: str) -> None:
        for key in sorted(set(before) | set(now)):
            old, new = before.get(key), now.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                walk(old, new, f"{prefix}{key}.")
            elif old != new and not (key == "output_dir" and not prefix):
                changes[f"{prefix}{key}"] = (old, new)

    walk(saved, to_dict(config), "")
    return changes


# ---- build: model, objective, DDP, data, optimiser phases ---------------------------------------------------

def _build(run: Run) -> None:
    config, device, info = run.config, run.device, run.info
    # built before the data: a rejected model (missing or mismatched weights) must not leave a run folder
    seed_everything(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    run.bundle = create_model(config.model, device=device, model_kwargs=objective_model_kwargs(config))
    model = run.bundle.model
    if run.loaded is not None:
        load_trained_weights(run.bundle, run.loaded.path / "model.safetensors", device)
    objective = build_objective(config, model).to(device)
    if run.loaded is not None and (run.loaded.path / "objective.safetensors").is_file():  # its own state
        from safetensors.torch import load_file

        objective.load_state_dict(load_file(str(run.loaded.path / "objective.safetensors"), device=str(device)))
    objective.prepare_model(model)
    run.objective = objective
    run.module = ObjectiveModule(model, objective)
    run.wrapped = run.module
    if info.enabled:
        run.wrapped = DistributedDataParallel(
            run.module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=objective.find_unused_parameters,
        )
    # configured data is checked before anything is written; rank 0 generates SynthScenes shards when asked
    run.sources = _data_api().prepare_data(config, world_size=info.world_size, decode=objective.batch_type.decode)
    if info.is_main:  # every check passed: the run folder may be created now, and is ours alone
        make_output_dir(run.run_dir)
        run.lock = RunLock(run.run_dir).acquire()
    no_decay = frozenset({f"model.{name}" for name in run.bundle.no_weight_decay}
                         | {f"objective.{name}" for name in objective.no_weight_decay})
    run.phases = build_phase_optimizers(run.module, objective.phases(model), config.train, no_decay)
    run.scaler = grad_scaler(config.model.precision, device)
    run.preprocess = run.bundle.preprocess_train if config.data.augment else run.bundle.preprocess_val


def _data_api():
    from clipforge.data import pipeline

    return pipeline


def _make_loader(run: Run, epoch: int, position):
    return _data_api().build_loader(
        run.sources.train, run.config, batch_type=run.objective.batch_type, preprocess=run.preprocess,
        tokenizer=run.bundle.tokenizer, epoch=epoch, rank=run.info.rank, world_size=run.info.world_size,
        position=position,
    )


# ---- restore: optimiser, scaler, RNG and data position -------------------------------------------------------

def _restore(run: Run) -> None:
    config, info, loaded = run.config, run.info, run.loaded
    run.state = loaded.training if loaded is not None else TrainingState()
    state = run.state
    run.micro_per_epoch = len(_make_loader(run, 0, None))  # batches per epoch for this rank (equal on all)
    run.steps_per_epoch = math.ceil(run.micro_per_epoch / config.train.accum_steps)
    run.total_steps = config.train.max_steps or config.train.epochs * run.steps_per_epoch
    run.global_batch = config.data.batch_size * info.world_size
    if loaded is not None:
        if len(loaded.rng_states) == info.world_size:
            run.pending_rng = loaded.rng_states[info.rank]  # each rank its own stream (dropout, augmentation)
        names = {phase.name for phase in run.phases}
        if set(loaded.optimizer_states) != names:
            raise CheckpointError(f"checkpoint '{loaded.path}' holds optimiser phases {sorted(loaded.optimizer_states)}"
                                  f", the objective declares {sorted(names)}")
        for phase in run.phases:
            try:
                phase.optimizer.load_state_dict(loaded.optimizer_states[phase.name])
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"optimizer state '{phase.name}' in '{loaded.path}' does not match the "
                                      f"trainable parameters (did model.lock_image/lock_text change?): "
                                      f"{str(err)[:200]}") from None
            reset_base_learning_rates(phase, config.train)
        if run.scaler is not None and loaded.scaler_state:
            run.scaler.load_state_dict(loaded.scaler_state)
        if state.batches_in_epoch:
            positions = state.data_positions or []
            if len(positions) != info.world_size:
                raise CheckpointError(f"checkpoint '{loaded.path}' was saved mid-epoch by {len(positions)} rank(s); "
                                      f"resume it with the same number of ranks (now {info.world_size})")
            run.resume_position = positions[info.rank]
            _make_loader(run, state.epoch, run.resume_position)  # refuses a position that does not fit the data
        run.last_checkpoint = loaded.path
    seed_everything(run.config.seed + info.rank)  # per-rank streams for augmentation and dropout (fresh runs)


# ---- open: the run folder's records, once the run is accepted -------------------------------------------------

def _open(run: Run, overwrite: bool) -> None:
    config, state, info = run.config, run.state, run.info
    if info.is_main:
        if overwrite and run.loaded is None:
            clear_previous_run(run.run_dir)
        save_config(config, run.run_dir / "config.yaml")
        remove_partial_checkpoints(run.run_dir / "checkpoints")
    run.recorder = RunRecorder(run.run_dir, info.is_main, config.train.tensorboard,
                               resume_step=state.step if run.loaded else None)
    run.meta = {"model_name": config.model.name, "model_family": config.model.family,
                "objective": config.objective.name, "config_hash": config_hash(to_dict(config)),
                "world_size": info.world_size}
    run.sample_counts = dict(state.extra.get("skipped_samples", {}))
    run.skipped_steps = state.extra.get("skipped_steps", 0)
    scan = run.sources.train.scan
    run.emit(TrainEvent("start", state.step, run.total_steps, state.epoch, {
        "run_dir": str(run.run_dir), "steps_per_epoch": run.steps_per_epoch, "global_batch": run.global_batch,
        "data_scan": None if scan is None else {"listed": scan.listed, "usable": scan.usable, "skipped": scan.skipped},
        "device": str(run.device), "world_size": info.world_size,
        "resumed_from": str(run.loaded.path) if run.loaded else None,
        "config_changes": {k: list(v) for k, v in run.config_changes.items()},
        "phases": [phase.name for phase in run.phases],
    }))
    # samples/s between log points leaves out time spent writing checkpoints
    run.train_start = time.perf_counter()
    run.last_log = {"time": run.train_start, "samples": state.samples_seen, "checkpoint": 0.0}
    run.samples_at_start = state.samples_seen


# ---- the loop ------------------------------------------------------------------------------------------------

def _train_epochs(run: Run) -> None:
    state = run.state
    run.wrapped.train()
    while state.step < run.total_steps:
        epoch = state.epoch
        # Restore the RNG where the interrupted run captured it: before the loader is built when the checkpoint
        # is at an epoch boundary, after its iterator exists (which may draw from the RNG) when mid-epoch.
        if run.pending_rng is not None and run.resume_position is None:
            restore_rng(run.pending_rng)
            run.pending_rng = None
        loader = _make_loader(run, epoch, run.resume_position)
        batches = iter(loader)
        if run.pending_rng is not None:
            restore_rng(run.pending_rng)
            run.pending_rng = None
        run.resume_position = None
        while state.batches_in_epoch < run.micro_per_epoch and state.step < run.total_steps:
            finite, output = _step(run, loader, batches, epoch)
            epoch_done = state.batches_in_epoch >= run.micro_per_epoch
            if epoch_done:
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            if finite and (state.step % run.config.train.log_every == 0 or state.step == run.total_steps):
                _record(run, epoch, output)
            run.emit(TrainEvent("step", state.step, run.total_steps, epoch, {"samples_seen": state.samples_seen}))
            save_every = run.config.train.save_every_steps
            if (save_every and state.step % save_every == 0) or epoch_done or state.step == run.total_steps:
                _save(run, is_epoch_end=epoch_done)
            if epoch_done:
                break


@dataclass
class StepOutput:
    loss: torch.Tensor  # the main phase's total loss, averaged over micro-batches (this rank)
    losses: dict[str, torch.Tensor]  # named losses ("<phase>/<name>" for phases other than main)
    metrics: dict[str, torch.Tensor | float]


def _next_micro_batches(run: Run, loader, batches, epoch: int) -> list:
    """This step's micro-batches (the last step of an epoch may have fewer), on the device."""
    state, group = run.state, min(run.config.train.accum_steps, run.micro_per_epoch - run.state.batches_in_epoch)
    micro_batches = []
    tick = time.perf_counter()
    for _ in range(group):
        try:
            batch = next(batches)
        except StopIteration:
            raise DataError(f"the data loader ended after {state.batches_in_epoch} of {run.micro_per_epoch} "
                            f"batches in epoch {epoch}") from None
        for kind, count in (batch.skipped or {}).items():
            run.sample_counts[kind] = run.sample_counts.get(kind, 0) + count
        run.current_position = loader.position_after(batch)
        micro_batches.append(batch.to(run.device, non_blocking=True))
        state.batches_in_epoch += 1
    run.timers["data"] += time.perf_counter() - tick
    return micro_batches


def _step(run: Run, loader, batches, epoch: int) -> tuple[bool, StepOutput]:
    """One optimiser step: every active phase runs forward and backward over the micro-batches, then steps.
    Returns (whether every phase's loss and gradients were finite, the step's losses and metrics)."""
    config, state, timers = run.config, run.state, run.timers
    micro_batches = _next_micro_batches(run, loader, batches, epoch)
    group = len(micro_batches)
    state.samples_seen += run.global_batch * group
    output = StepOutput(loss=torch.zeros((), device=run.device), losses={}, metrics={})
    problems = []
    for phase in run.phases:
        if not phase.active(state.step):
            continue
        set_phase_learning_rate(phase, state.step, config.train, run.total_steps)
        prefix = "" if phase.name == MAIN_PHASE else f"{phase.name}/"
        phase_loss = torch.zeros((), device=run.device)
        for micro, batch in enumerate(micro_batches):
            # DDP all-reduces gradients on the last micro-batch only
            last = micro == group - 1
            sync = contextlib.nullcontext() if last or not run.info.enabled else run.wrapped.no_sync()
            with sync:
                tick = time.perf_counter()
                with autocast(config.model.precision, run.device):
                    result = run.wrapped(batch, phase.name if run.multi_phase else None)
                    loss = result.total / group
                timers["forward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
                timers["backward"] += time.perf_counter() - tick
            phase_loss += loss.detach().float()
            for name, value in result.losses.items():
                key = prefix + name
                output.losses[key] = output.losses.get(key, 0.0) + value.detach().float() / group
            for name, value in result.metrics.items():
                key = prefix + name
                output.metrics[key] = output.metrics.get(key, 0.0) + value / group
        if phase.name == MAIN_PHASE:
            output.loss = phase_loss
        tick = time.perf_counter()
        problem = _apply_phase(run, phase, phase_loss)
        timers["optimizer"] += time.perf_counter() - tick
        if problem is not None:
            problems.append(problem)
    state.step += 1
    if problems:
        _skipped(run, epoch, problems[0])
        return False, output
    run.consecutive_skips = 0
    if run.scaler is not None:
        run.scaler.update()
    run.objective.after_step(run.module.model)  # e.g. clamp the temperature
    return True, output


def _apply_phase(run: Run, phase: PhaseOptimizer, phase_loss: torch.Tensor) -> str | None:
    """Step the phase's optimiser when its loss and gradients are finite on every rank; else say why not."""
    scaler, optimizer = run.scaler, phase.optimizer
    # every rank must agree whether to step, or DDP ranks would drift apart
    finite = bool(dist_utils.all_reduce_min(torch.isfinite(phase_loss).float()).item())
    problem = None if finite else f"loss became {phase_loss.item()}"
    if finite:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        # a finite loss can still give a NaN/inf gradient; applying it would poison the weights and the next
        # checkpoint. Under DDP every rank holds the same all-reduced gradients, so all agree. (fp16's GradScaler
        # skips such steps itself and lowers its scale: that is not divergence.)
        grad_norm = _gradient_norm(phase.parameters, run.config.train.grad_clip_norm)
        if scaler is None and grad_norm is not None and not bool(torch.isfinite(grad_norm)):
            finite, problem = False, f"gradient norm became {float(grad_norm)}"
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    # every gradient goes, not only this phase's: a later phase must start from none (a GAN's adversarial term
    # leaves gradients on the discriminator during the generator's phase)
    run.module.zero_grad(set_to_none=True)
    if problem is not None and run.multi_phase:
        problem = f"{problem} in optimiser phase '{phase.name}'"
    return problem


def _gradient_norm(parameters: list[nn.Parameter], clip_norm: float | None) -> torch.Tensor | None:
    """The total gradient 2-norm (clipping to `clip_norm` on the way when set); None when no gradient exists."""
    if clip_norm:
        return torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _skipped(run: Run, epoch: int, problem: str) -> None:
    """A non-finite step was not applied: stop, or count it, by train.nan_policy."""
    state = run.state
    run.skipped_steps += 1
    run.consecutive_skips += 1
    where = f"step {state.step} (epoch {epoch}, batch {state.batches_in_epoch} of {run.micro_per_epoch})"
    good = f"last good checkpoint: {run.last_checkpoint}" if run.last_checkpoint else "no checkpoint was written"
    if run.config.train.nan_policy == "stop":
        raise TrainingDiverged(f"{problem} at {where}; stopped, {good}")
    if run.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise TrainingDiverged(f"{run.consecutive_skips} non-finite losses or gradients in a row up to {where}; {good}")
    run.emit(TrainEvent("skip", state.step, run.total_steps, epoch, {"where": where, "problem": problem}))


# ---- record --------------------------------------------------------------------------------------------------

def _rank_mean(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Each name's mean over the ranks that reported it (ranks may differ: a batch with no regions)."""
    local = {name: float(value) for name, value in values.items()}
    gathered = dist_utils.all_gather_objects(local)
    names = dict.fromkeys(name for rank in gathered for name in rank)
    return {name: sum(rank[name] for rank in gathered if name in rank) / sum(name in rank for rank in gathered)
            for name in names}


def _record(run: Run, epoch: int, output: StepOutput) -> None:
    state, timers = run.state, run.timers
    loss = _rank_mean({"loss": output.loss})["loss"]
    now = time.perf_counter()
    elapsed = now - run.last_log["time"] - (timers["checkpoint"] - run.last_log["checkpoint"])
    record = {"step": state.step, "epoch": epoch}
    for phase in run.phases:
        record["lr" if phase.name == MAIN_PHASE else f"lr/{phase.name}"] = phase.optimizer.param_groups[0]["lr"]
    record["loss"] = loss
    record.update({f"loss/{k}": v for k, v in _rank_mean(output.losses).items()})
    record.update(_rank_mean(output.metrics))
    record["samples_per_s"] = (state.samples_seen - run.last_log["samples"]) / max(elapsed, 1e-9)
    record["time"] = now - run.train_start
    skipped, converted = split_sample_counts(run.sample_counts)
    record.update({f"skipped/{k}": v for k, v in skipped.items()})
    record.update({f"converted/{k}": v for k, v in converted.items()})
    run.recorder.log(record)
    run.last_record = record
    run.window_loss, run.window_steps = run.window_loss + loss, run.window_steps + 1
    run.last_log = {"time": now, "samples": state.samples_seen, "checkpoint": timers["checkpoint"]}
    run.emit(TrainEvent("log", state.step, run.total_steps, epoch, record))


def _save(run: Run, is_epoch_end: bool) -> None:
    state = run.state
    started = time.perf_counter()
    state.extra = {"skipped_samples": run.sample_counts, "skipped_steps": run.skipped_steps}
    rng_states = dist_utils.all_gather_objects(capture_rng())
    positions = dist_utils.all_gather_objects(run.current_position)  # JSON-able by the data layer's contract
    state.data_positions = None if is_epoch_end else positions
    mean_loss = run.window_loss / run.window_steps if run.window_steps else None
    is_best = mean_loss is not None and (state.best_loss is None or mean_loss < state.best_loss)
    if is_best:
        state.best_loss = mean_loss
    if run.info.is_main:
        run.last_checkpoint = save_checkpoint(
            run.run_dir / "checkpoints", run.bundle, {phase.name: phase.optimizer for phase in run.phases},
            run.scaler, state, rng_states, run.meta, run.config.train.keep_last, is_best, objective=run.objective,
        )
    dist_utils.barrier()
    run.window_loss, run.window_steps = 0.0, 0
    run.timers["checkpoint"] += time.perf_counter() - started
    run.emit(TrainEvent("checkpoint", state.step, run.total_steps, state.epoch, {"path": str(run.last_checkpoint)}))


# ---- finish --------------------------------------------------------------------------------------------------

def _finish(run: Run) -> RunResult:
    config, state, info = run.config, run.state, run.info
    train_time = time.perf_counter() - run.train_start
    run.recorder.close()
    model = run.module.model
    skipped, converted = split_sample_counts(run.sample_counts)
    summary = {
        "name": config.name, "run_dir": str(run.run_dir), "model": config.model.name,
        "model_family": config.model.family, "objective": config.objective.name, "device": str(run.device),
        "world_size": info.world_size, "precision": config.model.precision, "steps": state.step,
        "total_steps": run.total_steps, "epochs": state.epoch, "global_batch": run.global_batch,
        "accum_steps": config.train.accum_steps, "samples_seen": state.samples_seen, "train_time_s": train_time,
        "samples_per_s": (state.samples_seen - run.samples_at_start) / max(train_time - run.timers["checkpoint"], 1e-9),
        "final_loss": run.last_record.get("loss"), "best_loss": state.best_loss,
        "final_metrics": {k: v for k, v in run.last_record.items() if k not in ("step", "epoch", "time", "loss")
                          and not k.startswith(("skipped/", "converted/"))},
        "final_lr": run.phases[0].optimizer.param_groups[0]["lr"],
        "skipped_steps": run.skipped_steps, "skipped_samples": skipped, "converted_samples": converted,
        "time_breakdown_s": run.timers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "config_changes_on_resume": {k: list(v) for k, v in run.config_changes.items()},
    }
    if info.is_main:
        summary["plots"] = [str(p) for p in write_plots(run.run_dir, read_metrics(run.run_dir))]
        write_summary(run.run_dir, summary)
    run.emit(TrainEvent("end", state.step, run.total_steps, state.epoch, summary))
    return RunResult(run_dir=run.run_dir, steps=state.step, summary=summary, checkpoint=run.last_checkpoint)


# ---- a peer rank lost ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _peer_loss_reported(run: Run):
    """Turn a failed collective (a peer rank died or hung up) into a one-line ClipforgeError naming the step."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError (DistBackendError, ...) is a RuntimeError
        if run.info.world_size <= 1 or not _is_collective_failure(err):
            raise
        raise ClipforgeError(f"lost contact with another rank at step {run.state.step + 1}: "
                             f"{_backend_reason(err)}") from None


def _backend_reason(err: Exception) -> str:
    """The backend's first message line without its source location ('[/pytorch/.../pair.cc:534] ...')."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    first = re.sub(r"\[[^\]]*(?:/|\\)[^\]]*\]\s*", "", first)  # bracketed build paths
    first = re.sub(r"(?:/[\w.+-]+){2,}(?::\d+)?", "", first).strip(" :")  # bare absolute paths
    return (first or type(err).__name__)[:300]


def _is_collective_failure(err: RuntimeError) -> bool:
    if isinstance(err, torch.distributed.DistError):
        return True
    message = str(err).lower()
    return any(word in message for word in ("gloo", "nccl", "connection", "peer", "timed out", "socket"))
