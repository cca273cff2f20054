"""Model weight files: safe reading, compatibility checks and plain open_clip saving.

Weights are saved as a plain open_clip state_dict in safetensors, so
`open_clip.create_model(name, pretrained="model.safetensors")` loads what we train. Reading a pickled file
(.pt/.pth/.bin/.ckpt) can execute code hidden in it — even `torch.load(weights_only=True)` runs the
unpickler — so such files are refused unless the user sets `model.trust_pickle`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from clipforge.errors import CheckpointError

SAFE_SUFFIXES = (".safetensors",)
NUMPY_SUFFIXES = (".npz", ".npy")  # big_vision weights: numpy archives, read without pickle by open_clip
# open_clip resizes these on load when the image size or context length differs, so their shapes may differ
RESIZABLE_KEYS = ("visual.positional_embedding", "positional_embedding")
# open_clip adds a zero logit_bias when a CLIP checkpoint is loaded into a SigLIP-style model
OPTIONAL_KEYS = ("logit_bias",)


def is_pickled(path: str | Path) -> bool:
    return not str(path).endswith(SAFE_SUFFIXES + NUMPY_SUFFIXES)


def refuse_untrusted(path: str | Path, trust_pickle: bool) -> None:
    """Raise unless `path` can be read without running pickled code (or the user trusts it)."""
    if is_pickled(path) and not trust_pickle:
        raise CheckpointError(
            f"'{path}' is a pickled checkpoint, which can run code when loaded; convert it to .safetensors "
            f"or set model.trust_pickle=true if you trust its source"
        )


def _strip_module_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def read_weight_shapes(path: str | Path, trust_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weight file, reading only the safetensors header where possible."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    refuse_untrusted(path, trust_pickle)
    if str(path).endswith(SAFE_SUFFIXES):
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {_strip_module_prefix(k): tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"'{path}' is not a readable safetensors file ({err})") from None
    if str(path).endswith(NUMPY_SUFFIXES):
        return {}  # converted by open_clip on load; no key check possible before conversion
    try:  # trusted pickle: still use the restricted unpickler
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"'{path}' could not be read as a checkpoint ({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a state_dict")
    return {_strip_module_prefix(k): tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}


def check_compatible(model: nn.Module, file_shapes: dict[str, tuple[int, ...]], source: str, model_name: str) -> None:
    """Raise CheckpointError (one line) when a weight file does not fit `model`."""
    if not file_shapes:
        return
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in model_shapes if k not in file_shapes and k not in OPTIONAL_KEYS)
    unexpected = sorted(k for k in file_shapes if k not in model_shapes)
    mismatched = sorted(
        k for k in model_shapes
        if k in file_shapes and file_shapes[k] != model_shapes[k] and k not in RESIZABLE_KEYS
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {list(file_shapes[k])} vs "
                        f"model {list(model_shapes[k])})")
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    raise CheckpointError(f"checkpoint '{source}' does not match model '{model_name}': {'; '.join(problems)}")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The open_clip state_dict of `model` (unwrapping DDP / compile), as contiguous CPU tensors."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model_weights(model: nn.Module, path: str | Path, exclude: tuple[str, ...] = ()) -> None:
    """Write the model's plain state_dict as safetensors (temp file, then rename); for a `clip` model that is
    open_clip's own. State-dict prefixes in `exclude` (frozen pretrained parts) are left out."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    state = {k: v for k, v in plain_state_dict(model).items()
             if not any(k == p or k.startswith(p + ".") for p in exclude)}
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, path)


def write_json_atomic(path: str | Path, payload, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """JSON into a temporary file beside `path`, flushed to disk, then renamed into place: a reader sees the old
    file or the new one, never a torn write (pointers, state.json, model.json)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent, sort_keys=sort_keys)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_checkpoint_pointer(checkpoint_root: str | Path, name: str = "latest.json") -> Path | None:
    """The step folder a pointer file (`latest.json`, `best.json`) names, or None when there is no pointer.

    The one pointer reader (resume, evaluation, pruning): the pointer must name a folder *beside it* — never
    an absolute path, `..`, or anything outside the run — and be a JSON object with a string "path".
    CheckpointError (one line) otherwise; a torn pointer is `PointerUnreadable` so that resume can fall back
    to the newest complete step folder.
    """
    pointer = Path(checkpoint_root) / name
    if not pointer.is_file():
        return None
    try:
        payload = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise PointerUnreadable(f"'{pointer}' is not readable JSON") from None
    target = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(target, str):
        raise PointerUnreadable(f"'{pointer}' has no string \"path\"")
    if target in ("", ".", "..") or Path(target).name != target or "/" in target or "\\" in target:
        raise CheckpointError(f"'{pointer}' names {target[:80]!r}, not a checkpoint folder beside it")
    return Path(checkpoint_root) / target


class PointerUnreadable(CheckpointError):
    """A pointer file that does not parse (e.g. a write torn by a crash)."""


def check_finite_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: they give chance-level numbers with no other sign."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"'{source}' holds non-finite values (NaN or inf) in '{key}'; refusing to "
                                  f"load it")
