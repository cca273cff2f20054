"""Devices and precision: fp32 on CPU; bf16 or fp16 autocast on GPU (fp16 with a gradient scaler).

Weights stay fp32 in every mode (as the usual `amp` training modes do); autocast runs matmuls in low precision.
fp16's narrow range lets small gradients underflow, so its loss is scaled up before backward and the
gradients unscaled before clipping and the step (torch.amp.GradScaler); bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import contextlib

import torch

from clipforge.errors import ConfigError

AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when one exists, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is '{name}' but no CUDA GPU is available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device '{name}' is not a device torch knows; use 'auto', 'cpu', 'cuda' or "
                          f"'cuda:N'") from None


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"model.precision '{precision}' needs a GPU; on {device.type} use fp32")


def autocast(precision: str, device: torch.device):
    """The forward-pass context for `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision == "amp_fp16" else None
