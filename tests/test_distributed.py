"""2 CPU processes (gloo) x batch B give the same loss and the same gradients as 1 process x batch 2B.

Each spawned process first computes the single-process reference on the full batch (before joining the
process group, so nothing is gathered), then the distributed version on its half inside DDP, and writes
the largest differences to a JSON file the test reads.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
LOCAL_BATCH = 4
TOLERANCE = 1e-6  # relative, fp32: measured differences are 0 to 7e-7 (sums taken in another order)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_module(objective_name: str, local_loss: bool = True, gather_with_grad: bool = True):
    from clipforge.config import load_config
    from clipforge.engine.loop import ObjectiveModule
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    config = load_config(overrides=["model.name=clipforge-vit-micro", f"objective.name={objective_name}",
                                    f"objective.clip.local_loss={str(local_loss).lower()}",
                                    f"objective.clip.gather_with_grad={str(gather_with_grad).lower()}"])
    torch.manual_seed(0)
    _bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    model, tokenizer = _bundle.model, _bundle.tokenizer
    return ObjectiveModule(model, build_objective(config, model)), tokenizer


def full_batch(tokenizer):
    from clipforge.data.batches import ImageTextBatch

    rows = WORLD * LOCAL_BATCH
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    colours = ["red", "blue", "green", "pink", "cyan", "gray", "black", "white"]
    texts = tokenizer([f"a {c} square above a {colours[-1 - i]} circle" for i, c in enumerate(colours)])
    return ImageTextBatch(images=images, texts=texts, labels=torch.full((rows,), -1), keys=colours)


def rank_slice(batch, rank: int):
    from clipforge.data.batches import ImageTextBatch

    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return ImageTextBatch(images=batch.images[part], texts=batch.texts[part], labels=batch.labels[part],
                          keys=batch.keys[part])


def gradients(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def max_difference(a: dict, b: dict) -> float:
    """Largest difference relative to the size of each reference gradient tensor (fp32 sums in another order)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


CASES = {  # name -> (objective, local_loss, gather_with_grad)
    "clip_local_gather": ("clip", True, True),
    "clip_global_gather": ("clip", False, True),
    "clip_local_nogather": ("clip", True, False),
    "siglip": ("siglip", True, True),
}


def masked_features(rank: int | None):
    """Feature rows with uneven validity per rank: rank 0 has 2 valid rows of 4, rank 1 has 3."""
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 16, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 16, generator=generator), dim=-1)
    valid = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    if rank is not None:
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        images, texts, valid = images[part], texts[part], valid[part]
    return images.clone().requires_grad_(), texts.clone().requires_grad_(), valid


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from clipforge.objectives.contrastive import contrastive_loss

    scale = torch.tensor(12.0)
    # single-process references, computed before joining the group (nothing is gathered)
    references = {}
    for name, (objective, local_loss, gather) in CASES.items():
        module, tokenizer = make_module(objective, local_loss, gather)
        output = module(full_batch(tokenizer))
        output.total.backward()
        references[name] = (float(output.total.detach()), gradients(module))
    images, texts, valid = masked_features(None)
    masked_reference, _ = contrastive_loss(images[valid], texts[valid], scale)
    masked_reference.backward()
    reference_image_grad = torch.zeros_like(images)
    reference_image_grad[valid] = images.grad[valid]

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name, (objective, local_loss, gather) in CASES.items():
        module, tokenizer = make_module(objective, local_loss, gather)
        wrapped = DistributedDataParallel(module)
        output = wrapped(rank_slice(full_batch(tokenizer), rank))
        output.total.backward()
        loss = output.total.detach().clone()
        dist.all_reduce(loss)
        reference_loss, reference_grads = references[name]
        results[name] = {"loss": relative(float(loss) / WORLD, reference_loss),
                         "grad": max_difference(gradients(module), reference_grads)}

    images, texts, valid = masked_features(rank)
    loss, _ = contrastive_loss(images, texts, scale, valid=valid)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    # no DDP here: the gather's backward sums every rank's loss into our features, each scaled by W
    results["masked"] = {"loss": relative(float(total) / WORLD, float(masked_reference.detach())),
                         "grad": max_difference({"x": images.grad / WORLD}, {"x": reference_image_grad[part]})}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["clip_local_gather", "clip_global_gather", "siglip", "masked"])
def test_two_ranks_equal_one_rank_with_the_whole_batch(results, case):
    for rank, result in enumerate(results):
        assert result[case]["loss"] < TOLERANCE, f"rank {rank} loss differs by {result[case]['loss']}"
        assert result[case]["grad"] < TOLERANCE, f"rank {rank} gradients differ by {result[case]['grad']}"


def test_local_loss_without_gradient_gathering_does_not_match(results):
    # the gradients other ranks' losses put on our features (as negatives) are dropped
    for result in results:
        assert result["clip_local_nogather"]["loss"] < TOLERANCE  # the loss value itself is the same...
        assert result["clip_local_nogather"]["grad"] > 1000 * TOLERANCE  # ...but the gradients are not
