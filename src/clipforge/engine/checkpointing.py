"""Training checkpoints that load without pickle, are written atomically and resume exactly.

A checkpoint is a folder `checkpoints/step_00000100/` holding
  model.safetensors   the model's plain state_dict, frozen pretrained parts left out (for the clip family
                      this file loads as it is in the upstream library: models/clip_family.py)
  model.json          the model family's resolved config: the folder loads back from it alone
  objective.safetensors  the objective's own parameters and buffers, only when it has any
  state.safetensors   optimizer tensors (Adam moments and step counts) of every phase, as named tensors
  state.json          everything else: step, epoch, data position, optimizer hyperparameters, grad-scaler
                      state, the RNG states of every rank, the model name and a hash of the config
The folder is written under a temporary name and renamed into place, then `latest.json` (and `best.json`)
are replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.errors import CheckpointError
from clipforge.models.checkpoint import (
    PointerUnreadable,
    read_checkpoint_pointer,
    save_model_weights,
    write_json_atomic,
)
from clipforge.models.factory import write_model_json

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"


@dataclass
class TrainingState:
    """Where training stands at a step boundary (all JSON-able)."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # epoch in progress (or the next one when `batches_in_epoch` is 0)
    batches_in_epoch: int = 0  # micro-batches of `epoch` consumed so far
    data_positions: list | None = None  # per rank: the loader's position after the last consumed batch
    samples_seen: int = 0
    best_loss: float | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# RNG and optimizer state <-> JSON + tensors


def capture_rng() -> dict:
    """This process's RNG states as JSON-able values."""
    numpy_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *[v.item() if hasattr(v, "item") else v
                                                            for v in numpy_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


MAIN_OPTIMIZER = "main"


def _tensor_prefix(phase: str) -> str:
    # the main phase keeps the single-optimiser names, so older checkpoints read the same way
    return "optimizer." if phase == MAIN_OPTIMIZER else f"optimizer@{phase}."


def flatten_optimizer(optimizer: torch.optim.Optimizer, phase: str = MAIN_OPTIMIZER
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (named tensors, JSON-able rest)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    prefix = _tensor_prefix(phase)
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, phase: str = MAIN_OPTIMIZER) -> dict:
    state: dict[int, dict] = {}
    prefix = _tensor_prefix(phase)
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        index, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def config_hash(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Writing


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(
    checkpoint_root: Path,
    bundle,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    training: TrainingState,
    rng_states: list[dict],
    meta: dict,
    keep_last: int,
    is_best: bool,
    objective: nn.Module | None = None,
) -> Path:
    """Write one checkpoint folder atomically, point latest.json (and best.json) at it, prune old ones.

    `bundle` is the model's ModelBundle (its weights, frozen parts left out, and its model.json); `optimizers`
    maps each optimiser phase to its optimizer."""
    final = checkpoint_root / step_dir_name(training.step)
    temporary = checkpoint_root / f"{TEMP_PREFIX}{final.name}"
    try:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()

        save_model_weights(bundle.model, temporary / "model.safetensors", exclude=bundle.frozen)
        write_model_json(bundle, temporary)
        if objective is not None and objective.state_dict():
            save_model_weights(objective, temporary / "objective.safetensors")
        optimizer_tensors, phase_meta = {}, {}
        for phase, optimizer in optimizers.items():
            tensors, phase_meta[phase] = flatten_optimizer(optimizer, phase)
            optimizer_tensors.update(tensors)
        save_file(optimizer_tensors, str(temporary / "state.safetensors"), metadata={"format": "pt"})
        payload = {
            "format_version": FORMAT_VERSION,
            "training": training.__dict__,
            "optimizer": phase_meta.get(MAIN_OPTIMIZER),
            "phase_optimizers": {k: v for k, v in phase_meta.items() if k != MAIN_OPTIMIZER},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            **meta,
        }
        write_json_atomic(temporary / "state.json", payload)

        if final.exists():  # the same step saved again (e.g. an epoch end that is also a save_every step)
            shutil.rmtree(final)
        os.rename(temporary, final)  # atomic: the folder appears complete or not at all
        write_json_atomic(checkpoint_root / "latest.json", {"path": final.name, "step": training.step})
        if is_best:
            write_json_atomic(checkpoint_root / "best.json", {"path": final.name, "step": training.step,
                                                               "loss": training.best_loss})
    except OSError as err:  # e.g. the disk filled up: the previous checkpoint and latest.json stay as they were
        shutil.rmtree(temporary, ignore_errors=True)
        reason = err.strerror or type(err).__name__
        raise CheckpointError(f"could not write the checkpoint of step {training.step} into '{checkpoint_root}' "
                              f"({reason}); the previous checkpoint is intact") from None
    prune_checkpoints(checkpoint_root, keep_last)
    return final


def _pointer(checkpoint_root: Path, name: str) -> str | None:
    try:
        target = read_checkpoint_pointer(checkpoint_root, name)
    except CheckpointError:
        return None
    return target.name if target is not None else None


def prune_checkpoints(checkpoint_root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders plus the ones latest.json and best.json point at."""
    steps = sorted(p for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    keep = {p.name for p in steps[-keep_last:]}
    keep |= {name for name in (_pointer(checkpoint_root, "latest.json"), _pointer(checkpoint_root, "best.json"))
             if name}
    for path in steps:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(checkpoint_root: Path) -> None:
    """Temporary folders left by a run killed while saving."""
    if checkpoint_root.is_dir():
        for path in checkpoint_root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Reading


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume latest` -> the run's latest checkpoint folder (None when there is none yet); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        return _latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if path.is_file() and path.name in ("model.safetensors", "state.json", "state.safetensors"):
        path = path.parent
    if not (path / "state.json").is_file():
        if (path / "checkpoints" / "latest.json").is_file():  # a run folder
            return resolve_resume(path, "latest")
        raise CheckpointError(f"--resume '{resume}' is not a checkpoint folder (no state.json)")
    return path


CHECKPOINT_FILES = ("model.safetensors", "state.json", "state.safetensors")


def _latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The folder latest.json names; when latest.json is unreadable (a torn write), the newest complete step folder,
    so that a resume never silently starts over from step 0."""
    try:
        return read_checkpoint_pointer(checkpoint_root, "latest.json")  # never a folder outside the run
    except PointerUnreadable:
        complete = [p for p in sorted(checkpoint_root.iterdir(), reverse=True)
                    if p.is_dir() and p.name.startswith(STEP_PREFIX) and all((p / f).is_file() for f in CHECKPOINT_FILES)]
        if not complete:
            raise CheckpointError(f"'{checkpoint_root / 'latest.json'}' is unreadable and no complete checkpoint "
                                  f"folder is beside it") from None
        return complete[0]


@dataclass
class LoadedCheckpoint:
    path: Path
    training: TrainingState
    optimizer_states: dict[str, dict]  # phase -> optimizer state_dict
    scaler_state: dict | None
    rng_states: list[dict]
    meta: dict


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read state.json and state.safetensors (the model weights are read by the caller, after a shape check)."""
    try:
        payload = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint '{path}' is incomplete or corrupt ({type(err).__name__})") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format {payload.get('format_version')}, "
                              f"expected {FORMAT_VERSION}")
    meta = {k: v for k, v in payload.items() if k not in ("training", "optimizer", "phase_optimizers", "scaler", "rng")}
    try:
        phase_meta = {MAIN_OPTIMIZER: payload["optimizer"], **(payload.get("phase_optimizers") or {})}
        optimizer_states = {phase: unflatten_optimizer(tensors, body, phase) for phase, body in phase_meta.items()
                            if body is not None}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint '{path}': the optimizer state in state.json is malformed") from None
    return LoadedCheckpoint(
        path=path,
        training=_training_state(payload.get("training"), path),
        optimizer_states=optimizer_states,
        scaler_state=payload.get("scaler"),
        rng_states=payload.get("rng") or [],
        meta=meta,
    )


_STATE_TYPES = {"step": int, "epoch": int, "batches_in_epoch": int, "samples_seen": int}


def _training_state(body, path: Path) -> TrainingState:
    """state.json's "training" section, checked key by key (one line naming the first problem)."""
    if not isinstance(body, dict):
        raise CheckpointError(f"checkpoint '{path}': state.json has no \"training\" section")
    known = set(TrainingState.__dataclass_fields__)
    unknown = sorted(set(body) - known)
    if unknown:
        raise CheckpointError(f"checkpoint '{path}': state.json has an unknown key 'training.{unknown[0][:60]}'")
    for key, kind in _STATE_TYPES.items():
        value = body.get(key, 0)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"checkpoint '{path}': state.json 'training.{key}' must be a non-negative "
                                  f"integer, got {str(value)[:40]!r}")
    best = body.get("best_loss")
    if best is not None and (not isinstance(best, int | float) or isinstance(best, bool)):
        raise CheckpointError(f"checkpoint '{path}': state.json 'training.best_loss' must be a number or null")
    if not isinstance(body.get("data_positions") or [], list) or not isinstance(body.get("extra") or {}, dict):
        raise CheckpointError(f"checkpoint '{path}': state.json 'training.data_positions' / 'extra' are malformed")
    return TrainingState(**body)
