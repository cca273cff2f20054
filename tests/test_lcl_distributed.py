"""2 CPU processes (gloo) with uneven documents give the LCL loss and gradients of 1 process with all of them.

Rank 0 holds a 3-image document and an image-first one (its <soi> at position 0: no contrastive pair), rank 1
a 1-image document and a caption-first pair: 4 images against 2, and different token counts. The contrastive
term pads rank 1 to 4 rows marked invalid and gathers with gradients; the generation term divides by the token
count of all ranks. Each spawned process computes the single-process reference on all four documents before
joining the group, then its own half inside DDP, and writes the largest relative differences to a JSON file.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
TOLERANCE = 1e-5  # relative, fp32: measured up to ~7e-6 (sums taken in another order)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def documents():
    import numpy as np
    from PIL import Image

    from clipforge.data.documents import pair_document
    from clipforge.data.samples import Document, Sample

    def picture(seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def document(key, *items):
        numbers = sorted({i for i in items if isinstance(i, int)})
        return Document(key=key, items=[{"text": i} if isinstance(i, str) else {"image": i} for i in items],
                        images=[picture(10 * len(key) + n) for n in numbers])

    return [
        document("a", "red.", 0, "blue.", 1, "star.", 2),
        document("bb", 0, "a green cross."),
        document("ccc", "two dots.", 0),
        pair_document(Sample(key="dddd", image=picture(7), caption="a large yellow hexagon")),
    ]


def make_module():
    from clipforge.config import ModelConfig
    from clipforge.engine.loop import ObjectiveModule
    from clipforge.models import create_model
    from clipforge.objectives.lcl import LclObjective

    torch.manual_seed(0)
    bundle = create_model(ModelConfig(family="lcl", name="lcl-tiny"))
    objective = LclObjective(tokenizer=bundle.tokenizer)
    return ObjectiveModule(bundle.model, objective), bundle


def collate(bundle, objective, docs):
    from clipforge.data.transforms import BatchBuilder

    return BatchBuilder(objective.batch_type, bundle.preprocess_val, bundle.tokenizer, randomize=False)(docs)


def gradients(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def max_difference(a: dict, b: dict) -> float:
    """Largest difference relative to each reference gradient tensor's size. The pooler's key biases have an
    analytically zero gradient (a softmax does not change when every key logit shifts alike): ~1e-9 of rounding,
    so sizes under 1e-4 count as 1e-4 (the smallest real one here is ~5e-3)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-4)) for k in a)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    module, bundle = make_module()
    everything = collate(bundle, module.objective, documents())
    reference = module(everything)
    reference.total.backward()
    reference_losses = {k: float(v.detach()) for k, v in reference.losses.items()}
    reference_grads = gradients(module)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    module, bundle = make_module()
    wrapped = DistributedDataParallel(module)
    batch = collate(bundle, module.objective, documents()[2 * rank : 2 * rank + 2])
    output = wrapped(batch)
    output.total.backward()
    results = {"images": int(batch.images.shape[0]), "tokens": int((batch.targets != -100).sum()),
               "pairs": float(output.metrics["contrastive_pairs"])}
    for name, value in output.losses.items():
        total = value.detach().clone()
        dist.all_reduce(total)
        results[name] = relative(float(total) / WORLD, reference_losses[name])
    results["grad"] = max_difference(gradients(module), reference_grads)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("lcl_dist")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_the_ranks_really_are_uneven(results):
    assert [r["images"] for r in results] == [4, 2]
    assert [r["pairs"] for r in results] == [3, 2]  # rank 0's image-first document gives no pair
    assert results[0]["tokens"] != results[1]["tokens"]


@pytest.mark.parametrize("key", ["generation", "contrastive", "grad"])
def test_two_uneven_ranks_equal_one_rank_with_every_document(results, key):
    for rank, result in enumerate(results):
        assert result[key] < TOLERANCE, f"rank {rank}: {key} differs by {result[key]}"
