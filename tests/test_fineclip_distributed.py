"""FineCLIP on 2 gloo processes equals 1 process on the union of their batches (losses and gradients).

The ranks hold different numbers of valid regions (one rank none at all in one case), so this checks the
validity mask carried through the gathers and the global-mean conventions of the distill term.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipforge.config import FineclipObjectiveConfig
from clipforge.data.batches import RegionBatch
from clipforge.objectives.fineclip import FineclipObjective

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs"
WORLD, PER_RANK, SLOTS, CONTEXT = 2, 3, 2, 24

# per image, per slot: images 0..2 go to rank 0, images 3..5 to rank 1
BOXES = [
    [[2, 3, 20, 17], [10, 6, 31, 30]],
    [[0, 0, 32, 32], [5, 5, 9, 9]],
    [[12, 1, 30, 14], [3, 16, 15, 29]],
    [[1, 1, 16, 16], [8, 8, 24, 24]],
    [[6, 2, 26, 12], [0, 20, 32, 32]],
    [[4, 4, 28, 28], [9, 0, 19, 31]],
]
VALID_UNEVEN = [[1, 1], [1, 0], [1, 1], [0, 0], [0, 1], [0, 0]]  # 5 regions on rank 0, 1 on rank 1
VALID_ONE_RANK_EMPTY = [[1, 0], [0, 1], [1, 1], [0, 0], [0, 0], [0, 0]]  # none on rank 1

CASES = {
    "default": (FineclipObjectiveConfig(), True, True, VALID_UNEVEN),
    "trainable_text_no_stop_grad": (
        FineclipObjectiveConfig(freeze_text=False, teacher_stop_grad=False, w_distill=0.5, w_region=2.0),
        True, True, VALID_ONE_RANK_EMPTY),
    "full_matrix": (FineclipObjectiveConfig(crop_scale=1.0, teacher_resolution=16), False, True, VALID_UNEVEN),
}


def make_model():
    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(0)
    model = open_clip.create_model("clipforge-vit-micro")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def make_batch(valid, rows: slice) -> RegionBatch:
    generator = torch.Generator().manual_seed(0)
    total = len(BOXES)
    images = torch.randn(total, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 5000, (total, CONTEXT), generator=generator)
    region_texts = torch.randint(1, 5000, (total, SLOTS, CONTEXT), generator=generator)
    boxes = torch.tensor(BOXES, dtype=torch.float32)
    return RegionBatch(
        images=images[rows], texts=texts[rows], labels=torch.full((total,), -1)[rows],
        keys=[str(i) for i in range(total)][rows], boxes=boxes[rows], region_texts=region_texts[rows],
        region_valid=torch.tensor(valid, dtype=torch.bool)[rows],
    )


def run_case(name: str, rows: slice):
    """Loss terms and parameter gradients of one step, as this process sees them."""
    config, local_loss, gather_grad, valid = CASES[name]
    model = make_model()
    objective = FineclipObjective(config, local_loss=local_loss, gather_with_grad=gather_grad, model=model)
    out = objective(model, make_batch(valid, rows))
    out.total.backward()
    losses = {key: value.detach() for key, value in out.losses.items()}
    grads = {key: param.grad for key, param in model.named_parameters() if param.grad is not None}
    return losses, grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name in CASES:
            losses, grads = run_case(name, rows)
            # what DDP does: average gradients over ranks; and the mean of the per-rank loss values
            for tensor in [*losses.values(), *grads.values()]:
                dist.all_reduce(tensor)
                tensor /= WORLD
            if rank == 0:
                torch.save({"losses": losses, "grads": grads}, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_equal_one_rank_with_uneven_regions(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "distributed workers did not finish"

    for name in CASES:
        losses, grads = run_case(name, slice(0, WORLD * PER_RANK))
        result = torch.load(tmp_path / f"{name}.pt")
        assert result["losses"].keys() == losses.keys() == {"global", "distill", "region"}
        for key, value in losses.items():
            torch.testing.assert_close(result["losses"][key], value, atol=1e-6, rtol=1e-5, msg=f"{name} {key}")
        assert result["grads"].keys() == grads.keys()
        for key, value in grads.items():
            torch.testing.assert_close(result["grads"][key], value, atol=1e-6, rtol=1e-4, msg=f"{name} {key}")
        if name == "trainable_text_no_stop_grad":
            assert "token_embedding.weight" in grads  # the text tower trained and its gradients matched
