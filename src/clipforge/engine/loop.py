"""The one training loop. Every objective (CLIP, SigLIP, FineCLIP, ...) trains through `train()`.

Read top to bottom: set up (device, processes, seed), check everything a user can get wrong before the
first step (preflight), build the model, objective, optimiser and data, restore a checkpoint when resuming,
then loop over epochs and optimiser steps. An objective turns a batch into named losses; this loop owns the
optimiser, schedule, precision, gradient accumulation, distribution, logging and checkpoints.

Gradient accumulation (train.accum_steps = k) is plain accumulation: each of the k micro-batches is a
separate contrastive problem (its negatives are its own batch), and their gradients are averaged. For CLIP
that is an approximation of one k-times larger batch (fewer negatives per row), not open_clip's two-pass
cached-feature scheme; the gradient is exact for the mean of the micro-batch losses.

The library does not print: progress is reported through `on_event(TrainEvent)`, which the CLI renders.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.deterministic
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.config import ExperimentConfig, save_config, to_dict
from clipforge.engine import distributed as dist_utils
from clipforge.engine.checkpointing import (
    TrainingState,
    capture_rng,
    config_hash,
    read_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from clipforge.engine.optim import build_optimizer, learning_rate, set_learning_rate
from clipforge.engine.precision import autocast, check_precision, grad_scaler, resolve_device
from clipforge.engine.preflight import (
    check_output_dir,
    data_position_from_json,
    data_position_to_json,
    make_output_dir,
)
from clipforge.engine.records import RunRecorder, read_metrics, write_plots, write_summary
from clipforge.errors import CheckpointError, ClipforgeError, DataError
from clipforge.models.checkpoint import check_compatible, read_weight_shapes
from clipforge.models.factory import create_model, resolve_model_name
from clipforge.objectives.base import ObjectiveOutput
from clipforge.objectives.registry import build_objective, objective_model_kwargs

MAX_CONSECUTIVE_SKIPS = 20  # with nan_policy=skip, this many non-finite steps in a row means the run is broken


class TrainingDiverged(ClipforgeError):
    """The loss became NaN or infinite (nan_policy=stop, or too many skipped steps)."""


@dataclass
class TrainEvent:
    kind: str  # start | step | log | checkpoint | skip | eval | end
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

    def forward(self, batch) -> ObjectiveOutput:
        return self.objective(self.model, batch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gradient_norm(parameters: list[nn.Parameter], clip_norm: float | None) -> torch.Tensor | None:
    """The total gradient 2-norm (clipping to `clip_norm` on the way when set); None when no gradient exists."""
    if clip_norm:
        return torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


@contextlib.contextmanager
def _peer_loss_reported(info, state: TrainingState):
    """Turn a failed collective (a peer rank died or hung up) into a one-line ClipforgeError naming the step."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError (DistBackendError, ...) is a RuntimeError
        if info.world_size <= 1 or not _is_collective_failure(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ClipforgeError(f"lost contact with another rank at step {state.step + 1}: {first[:300]}") from None


def _is_collective_failure(err: RuntimeError) -> bool:
    if isinstance(err, torch.distributed.DistError):
        return True
    message = str(err).lower()
    return any(word in message for word in ("gloo", "nccl", "connection", "peer", "timed out", "socket"))


def _data_api():
    from clipforge.data import pipeline

    return pipeline


def train(
    config: ExperimentConfig,
    resume: str | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
) -> RunResult:
    """Train `config`; `resume` is None, "latest" or a checkpoint path. Returns the run's summary."""
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
    try:
        return _train(config, resume, on_event or (lambda event: None), device, info)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
        if started_group:
            dist_utils.shutdown_distributed()


def _train(config, resume, emit, device, info) -> RunResult:
    run_dir = config.run_dir
    train_cfg = config.train
    is_main = info.is_main

    # ---- preflight: everything a user can get wrong fails here, before the first step, with one line -----
    if is_main:
        check_output_dir(run_dir)
    checkpoint_dir = resolve_resume(run_dir, resume)
    if resume is not None and resume != "latest" and checkpoint_dir is None:
        raise CheckpointError(f"--resume '{resume}' found no checkpoint")
    resolve_model_name(config.model.name)  # unknown architecture -> ConfigError before data work
    loaded = read_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None

    # ---- model, objective, optimiser ---------------------------------------------------------------------
    # built before the data: generating SynthScenes shards creates the run folder, and a rejected model
    # (missing or mismatched weights) must not leave one behind
    seed_everything(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model, preprocess_train, preprocess_val, tokenizer = create_model(
        config.model, device=device, model_kwargs=objective_model_kwargs(config)
    )
    if loaded is not None:
        weights = loaded.path / "model.safetensors"
        check_compatible(model, read_weight_shapes(weights), str(loaded.path), config.model.name)
        model.load_state_dict(load_file(str(weights), device=str(device)))
    objective = build_objective(config, model).to(device)
    if loaded is not None and (loaded.path / "objective.safetensors").is_file():  # an objective's own state
        objective.load_state_dict(load_file(str(loaded.path / "objective.safetensors"), device=str(device)))
    module = ObjectiveModule(model, objective)
    wrapped = module
    if info.enabled:
        wrapped = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(objective, "find_unused_parameters", False),
        )
    data = _data_api()
    sources = data.prepare_data(config)  # rank 0 generates SynthScenes shards when asked; the others wait
    optimizer = build_optimizer(module, train_cfg)
    scaler = grad_scaler(config.model.precision, device)
    trainable = [p for p in module.parameters() if p.requires_grad]

    # ---- data ----------------------------------------------------------------------------------------------
    preprocess = preprocess_train if config.data.augment else preprocess_val
    state = loaded.training if loaded is not None else TrainingState()

    def make_loader(epoch: int, position):
        return data.build_loader(
            sources.train, config, batch_type=objective.batch_type, preprocess=preprocess, tokenizer=tokenizer,
            epoch=epoch, rank=info.rank, world_size=info.world_size, position=position,
        )

    probe = make_loader(0, None)
    micro_per_epoch = len(probe)  # batches per epoch for this rank (equal on every rank)
    del probe
    if micro_per_epoch == 0:
        raise DataError(f"data.batch_size {config.data.batch_size} x {info.world_size} rank(s) is larger than "
                        f"the training set: no full batch per epoch")
    accum = train_cfg.accum_steps
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch
    global_batch = config.data.batch_size * info.world_size

    # ---- resume: optimiser, scaler and RNG state ----------------------------------------------------------
    resume_position, pending_rng = None, None
    if loaded is not None:
        if len(loaded.rng_states) == info.world_size:
            pending_rng = loaded.rng_states[info.rank]
        try:
            optimizer.load_state_dict(loaded.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"optimizer state in '{loaded.path}' does not match the trainable parameters "
                                  f"(did model.lock_image/lock_text change?): {err}") from None
        if scaler is not None and loaded.scaler_state:
            scaler.load_state_dict(loaded.scaler_state)
        if state.batches_in_epoch:
            positions = state.data_positions or []
            if len(positions) != info.world_size:
                raise CheckpointError(f"checkpoint '{loaded.path}' was saved mid-epoch by {len(positions)} rank(s); "
                                      f"resume it with the same number of ranks (now {info.world_size})")
            resume_position = data_position_from_json(positions[info.rank])
    seed_everything(config.seed + info.rank)  # per-rank streams for augmentation and dropout (fresh runs)

    # ---- records -------------------------------------------------------------------------------------------
    if is_main:
        make_output_dir(run_dir)  # every preflight check passed
        save_config(config, run_dir / "config.yaml")
        remove_partial_checkpoints(run_dir / "checkpoints")
    recorder = RunRecorder(run_dir, is_main, train_cfg.tensorboard, resume_step=state.step if loaded else None)
    meta = {"model_name": config.model.name, "objective": config.objective.name,
            "config_hash": config_hash(to_dict(config)), "world_size": info.world_size}
    emit(TrainEvent("start", state.step, total_steps, state.epoch, {
        "run_dir": str(run_dir), "steps_per_epoch": steps_per_epoch, "global_batch": global_batch,
        "data_scan": None if sources.train.scan is None else {
            "listed": sources.train.scan.listed, "usable": sources.train.scan.usable,
            "skipped": sources.train.scan.skipped},
        "device": str(device), "world_size": info.world_size, "resumed_from": str(loaded.path) if loaded else None,
    }))

    timers = dict.fromkeys(("data", "forward", "backward", "optimizer", "checkpoint"), 0.0)
    skipped_samples: dict[str, int] = dict(state.extra.get("skipped_samples", {}))
    skipped_steps = state.extra.get("skipped_steps", 0)
    consecutive_skips = 0
    window_loss, window_steps = 0.0, 0  # mean loss since the last checkpoint decides "best"
    # samples/s between log points leaves out time spent writing checkpoints
    last_log = {"time": time.perf_counter(), "samples": state.samples_seen, "checkpoint": 0.0}
    last_record: dict = {}
    last_checkpoint = loaded.path if loaded else None
    train_start = time.perf_counter()
    samples_at_start = state.samples_seen

    def save(is_epoch_end: bool) -> None:
        nonlocal last_checkpoint, window_loss, window_steps
        started = time.perf_counter()
        state.extra = {"skipped_samples": skipped_samples, "skipped_steps": skipped_steps}
        rng_states = dist_utils.all_gather_objects(capture_rng())
        positions = dist_utils.all_gather_objects(data_position_to_json(current_position))
        state.data_positions = None if is_epoch_end else positions
        mean_loss = window_loss / window_steps if window_steps else None
        is_best = mean_loss is not None and (state.best_loss is None or mean_loss < state.best_loss)
        if is_best:
            state.best_loss = mean_loss
        if is_main:
            last_checkpoint = save_checkpoint(
                run_dir / "checkpoints", module.model, optimizer, scaler, state, rng_states, meta,
                train_cfg.keep_last, is_best, objective=objective,
            )
        dist_utils.barrier()
        window_loss, window_steps = 0.0, 0
        timers["checkpoint"] += time.perf_counter() - started
        emit(TrainEvent("checkpoint", state.step, total_steps, state.epoch, {"path": str(last_checkpoint)}))

    # ---- the loop ------------------------------------------------------------------------------------------
    with _peer_loss_reported(info, state):  # a dead peer rank: one line, not a gloo/NCCL traceback
        current_position = None
        wrapped.train()
        while state.step < total_steps:
            epoch = state.epoch
            # Restore the RNG where the interrupted run captured it: before the loader is built when the checkpoint
            # is at an epoch boundary, after its iterator exists (which may draw from the RNG) when mid-epoch.
            if pending_rng is not None and resume_position is None:
                restore_rng(pending_rng)
                pending_rng = None
            loader = make_loader(epoch, resume_position)
            batches = iter(loader)
            if pending_rng is not None:
                restore_rng(pending_rng)
                pending_rng = None
            resume_position = None

            while state.batches_in_epoch < micro_per_epoch and state.step < total_steps:
                group = min(accum, micro_per_epoch - state.batches_in_epoch)  # the last step may be short
                set_learning_rate(optimizer, learning_rate(state.step, train_cfg.lr, train_cfg.warmup_steps,
                                                           total_steps, train_cfg.schedule))
                step_loss = torch.zeros((), device=device)
                named_losses: dict[str, torch.Tensor] = {}
                metrics: dict[str, torch.Tensor | float] = {}
                for micro in range(group):
                    tick = time.perf_counter()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise DataError(f"the data loader ended after {state.batches_in_epoch} of "
                                        f"{micro_per_epoch} batches in epoch {epoch}") from None
                    for kind, count in (getattr(batch, "skipped", None) or {}).items():
                        skipped_samples[kind] = skipped_samples.get(kind, 0) + count
                    current_position = loader.position_after(batch)
                    batch = batch.to(device, non_blocking=True)
                    timers["data"] += time.perf_counter() - tick

                    # DDP all-reduces gradients on the last micro-batch only
                    sync = contextlib.nullcontext() if micro == group - 1 or not info.enabled else wrapped.no_sync()
                    with sync:
                        tick = time.perf_counter()
                        with autocast(config.model.precision, device):
                            output = wrapped(batch)
                            loss = output.total / group
                        timers["forward"] += time.perf_counter() - tick
                        tick = time.perf_counter()
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                        timers["backward"] += time.perf_counter() - tick
                    step_loss += loss.detach().float()
                    for name, value in output.losses.items():
                        named_losses[name] = named_losses.get(name, 0.0) + value.detach().float() / group
                    for name, value in output.metrics.items():
                        metrics[name] = metrics.get(name, 0.0) + value / group
                    state.batches_in_epoch += 1
                state.samples_seen += global_batch * group

                tick = time.perf_counter()
                # every rank must agree whether to step, or DDP ranks would drift apart
                finite = bool(dist_utils.all_reduce_min(torch.isfinite(step_loss).float()).item())
                problem = None if finite else f"loss became {step_loss.item()}"
                if finite:
                    if scaler is not None:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    # a finite loss can still give a NaN/inf gradient; applying it would poison the weights and the
                    # next checkpoint. Under DDP every rank holds the same all-reduced gradients, so all agree.
                    # (fp16's GradScaler skips such steps itself and lowers its scale: that is not divergence.)
                    grad_norm = _gradient_norm(trainable, train_cfg.grad_clip_norm)
                    if scaler is None and grad_norm is not None and not bool(torch.isfinite(grad_norm)):
                        finite, problem = False, f"gradient norm became {float(grad_norm)}"
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                    consecutive_skips += 1
                    where = (f"step {state.step + 1} (epoch {epoch}, batch {state.batches_in_epoch} of {micro_per_epoch})")
                    good = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                    if train_cfg.nan_policy == "stop":
                        raise TrainingDiverged(f"{problem} at {where}; stopped, {good}")
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise TrainingDiverged(f"{consecutive_skips} non-finite losses or gradients in a row up to "
                                               f"{where}; {good}")
                    emit(TrainEvent("skip", state.step + 1, total_steps, epoch, {"where": where, "problem": problem}))
                else:
                    consecutive_skips = 0
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    objective.after_step(module.model)  # e.g. clamp the temperature
                timers["optimizer"] += time.perf_counter() - tick
                state.step += 1
                epoch_done = state.batches_in_epoch >= micro_per_epoch
                if epoch_done:
                    state.epoch, state.batches_in_epoch = epoch + 1, 0

                # ---- records and checkpoints ----
                if finite:
                    mean_loss = float(dist_utils.all_reduce_mean(step_loss)) if state.step % train_cfg.log_every == 0 \
                        or state.step == total_steps else None
                    if mean_loss is not None:
                        now = time.perf_counter()
                        elapsed = now - last_log["time"] - (timers["checkpoint"] - last_log["checkpoint"])
                        record = {
                            "step": state.step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                            "logit_scale": float(module.model.logit_scale.detach().exp()),
                            "loss": mean_loss,
                            **{f"loss/{k}": float(dist_utils.all_reduce_mean(v)) for k, v in named_losses.items()},
                            **{k: float(v) for k, v in metrics.items()},
                            "samples_per_s": (state.samples_seen - last_log["samples"]) / max(elapsed, 1e-9),
                            "time": now - train_start,
                            **{f"skipped/{k}": v for k, v in skipped_samples.items()},
                        }
                        if getattr(module.model, "logit_bias", None) is not None:
                            record["logit_bias"] = float(module.model.logit_bias.detach())
                        recorder.log(record)
                        last_record = record
                        window_loss, window_steps = window_loss + mean_loss, window_steps + 1
                        last_log = {"time": now, "samples": state.samples_seen, "checkpoint": timers["checkpoint"]}
                        emit(TrainEvent("log", state.step, total_steps, epoch, record))
                emit(TrainEvent("step", state.step, total_steps, epoch, {"samples_seen": state.samples_seen}))
                periodic = train_cfg.save_every_steps and state.step % train_cfg.save_every_steps == 0
                if periodic or epoch_done or state.step == total_steps:
                    save(is_epoch_end=epoch_done)
                if epoch_done:
                    break

    train_time = time.perf_counter() - train_start

    # ---- end of run: a quick zero-shot check, plots, summary ----------------------------------------------
    zeroshot = None
    if is_main and config.data.train == "synth":
        from clipforge.engine.zeroshot_check import synth_zeroshot

        zeroshot = synth_zeroshot(module.model, preprocess_val, tokenizer, config, device)
        recorder.log({"step": state.step, "event": "eval", **{k: v for k, v in zeroshot.items()
                                                             if isinstance(v, int | float)}})
        emit(TrainEvent("eval", state.step, total_steps, state.epoch, zeroshot))
    recorder.close()
    summary = {
        "name": config.name, "run_dir": str(run_dir), "model": config.model.name,
        "objective": config.objective.name, "device": str(device), "world_size": info.world_size,
        "precision": config.model.precision, "steps": state.step, "total_steps": total_steps,
        "epochs": state.epoch, "global_batch": global_batch, "accum_steps": accum,
        "samples_seen": state.samples_seen, "train_time_s": train_time,
        "samples_per_s": (state.samples_seen - samples_at_start) / max(train_time - timers["checkpoint"], 1e-9),
        "final_loss": last_record.get("loss"), "best_loss": state.best_loss,
        "final_logit_scale": float(module.model.logit_scale.detach().exp()),
        "final_lr": optimizer.param_groups[0]["lr"],
        "skipped_steps": skipped_steps, "skipped_samples": skipped_samples,
        "time_breakdown_s": timers,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "zeroshot": zeroshot,
    }
    if is_main:
        summary["plots"] = [str(p) for p in write_plots(run_dir, read_metrics(run_dir))]
        write_summary(run_dir, summary)
    emit(TrainEvent("end", state.step, total_steps, state.epoch, summary))
    return RunResult(run_dir=run_dir, steps=state.step, summary=summary, checkpoint=last_checkpoint)
