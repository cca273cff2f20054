"""Code tasks for image tokenizers (capability `codes`): how well the codes reconstruct held-out images and how
much of the codebook they use.

    reconstruction   decode_codes(encode_codes(x)) against x: PSNR (dB, images in [0, 1]), MSE, L1, and over
                     the whole dataset the codebook usage (%) and perplexity of the codes

Registered with `register_task` on import. To be listed in `eval.tasks` it needs its line in
clipforge.registry.EVAL_TASKS and this module in clipforge.eval.tasks.OPTIONAL_TASK_MODULES.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from clipforge.eval.datasets import EvalDataset
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task


@torch.no_grad()
def reconstruction_metrics(model, images: Sequence, preprocess: Callable, batch_size: int = 64,
                           device: torch.device | str = "cpu") -> dict[str, float]:
    """Metrics of `model` (encode_codes / decode_codes, a `codebook_size`) on PIL `images`, through
    `preprocess` (whose output is taken to be in [-1, 1], as the vq family's is)."""
    from clipforge.objectives.vq import codebook_usage

    squared = absolute = pixels = 0.0
    psnr_sum, count = 0.0, 0
    histogram = torch.zeros(model.codebook_size, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(image) for image in images[start:start + batch_size]]).to(device)
        codes = model.encode_codes(batch)  # [B, h, w]
        difference = (model.decode_codes(codes).clamp(-1, 1) - batch).double().cpu() / 2  # in [0, 1] units
        per_image = difference.pow(2).flatten(1).mean(1)  # [B]
        psnr_sum += float((10 * torch.log10(1.0 / per_image.clamp_min(1e-10))).sum())
        squared += float(difference.pow(2).sum())
        absolute += float(difference.abs().sum())
        pixels += difference.numel()
        count += batch.shape[0]
        histogram += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    usage, perplexity = codebook_usage(histogram)
    return {"psnr": psnr_sum / count, "mse": squared / pixels, "l1": absolute / pixels,
            "codebook_usage": float(usage), "perplexity": float(perplexity), "num_images": count}


def run_reconstruction(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    store = context.features
    metrics = reconstruction_metrics(store.model, dataset.images, store.preprocess, store.batch_size, store.device)
    count = metrics.pop("num_images")
    settings = {"psnr": "mean over images of 10 log10(1 / MSE), pixels in [0, 1]",
                "usage": "% of the codebook used by the dataset's codes", "perplexity": "exp(entropy of the codes)"}
    return TaskOutput(metrics, settings, {"num_images": count, "codebook_size": store.model.codebook_size})


register_task(Task("reconstruction", "image_reconstruction", (), run_reconstruction,
                   "decode(encode(x)) vs x: PSNR, codebook usage and perplexity", requires=("codes",)))
