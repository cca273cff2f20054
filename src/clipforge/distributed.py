"""Process-group set-up from torchrun / Slurm environment variables, and gathers that keep gradients."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def read_env() -> DistInfo:
    """Rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, ...)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when launched with several processes. NCCL on GPU, gloo on CPU."""
    info = read_env()
    if info.world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # Slurm without torchrun: rendezvous on the first node
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(
            backend=backend, rank=info.rank, world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info


def world_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), local_rank=read_env().local_rank, world_size=dist.get_world_size())
    return DistInfo()


# torch 2.14 renamed the single-tensor collectives; older releases only have the *_tensor names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for our slice and returns it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        tensor = tensor.contiguous()
        output = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))  # [W*B, ...]
        _all_gather_single(output, tensor)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        grad_output = grad_output.contiguous()
        grad = grad_output.new_empty((grad_output.shape[0] // world, *grad_output.shape[1:]))  # [B, ...]
        _reduce_scatter_single(grad, grad_output, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0; backward sums each rank's gradient back to the owner. [B, ...] -> [W*B, ...]

    Every rank must pass the same shape (pad and carry a validity mask for ragged data).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor, keep_local_grad: bool = True) -> torch.Tensor:
    """All-gather without autograd; the local slice is the input tensor itself so it keeps its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    if keep_local_grad:
        parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks (e.g. 'every rank saw a finite loss' as 1/0); identity on one process."""
    if is_enabled():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a detached tensor (for logging); identity on one process."""
    if is_enabled():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (in-memory only: nothing here is read from disk)."""
    if not is_enabled():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
