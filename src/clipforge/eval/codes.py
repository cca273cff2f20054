"""The `reconstruction` task for image tokenizers (capability `codes`): how well the codes reconstruct held-out
images and how much of the codebook they use.

    reconstruction   decode_codes(encode_codes(x)) against x, images in [0, 1]: PSNR (dB) and SSIM (torchmetrics'
                     functional API, data_range 1, means over images), MSE and L1 over pixels; over the whole
                     dataset the codebook usage (%), perplexity and per-code histogram; and, when
                     `eval.feature_run` names a clipforge CLIP run, the Fréchet distance between the real and
                     the reconstructed images in that run's image-feature space (unit-norm `encode_image`,
                     each image through the run's own preprocess). Inception weights are not downloaded, so
                     the number is not an "FID" comparable with papers: it compares tokenizers with one extractor.

The held-out codes are computed once per dataset (`dataset_codes`) and shared with the code_semantics task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from clipforge.eval.datasets import EvalDataset
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task

NUM_EXAMPLES = 6  # original -> reconstruction pairs kept for the report


def preprocess_batch(images: Sequence, preprocess: Callable, start: int, size: int) -> torch.Tensor:
    """[B, 3, H, W] images start .. start + size - 1 (a lazy sequence is indexed one image at a time)."""
    return torch.stack([preprocess(images[i]) for i in range(start, min(start + size, len(images)))])


@torch.no_grad()
def encode_codes(model, images: Sequence, preprocess: Callable, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, h, w] int64 codes of PIL `images` (on the CPU)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_batch(images, preprocess, start, batch_size).to(device)
        chunks.append(model.encode_codes(batch).cpu())
    return torch.cat(chunks)


def dataset_codes(context: TaskContext, dataset: EvalDataset) -> torch.Tensor:
    """[N, h, w] the codes of `dataset`'s images, computed once per suite run and shared by the code tasks."""
    store = context.features
    return context.shared(("codes", id(dataset)), lambda: encode_codes(
        store.model, dataset.images, store.preprocess, store.batch_size, store.device))


@dataclass
class ReconstructionResult:
    metrics: dict[str, float]
    histogram: torch.Tensor  # [K] how often each code occurs in the dataset's codes
    examples: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (i, x, x_hat) [0, 1]
    reconstructions: list = field(default_factory=list)  # PIL images of x_hat, kept for the Fréchet features


@torch.no_grad()
def measure_reconstruction(model, images: Sequence, preprocess: Callable, batch_size: int = 64,
                           device: torch.device | str = "cpu", codes: torch.Tensor | None = None,
                           keep_images: bool = False, num_examples: int = 0) -> ReconstructionResult:
    """Metrics of `model` (encode_codes / decode_codes, a `codebook_size`) on PIL `images` through
    `preprocess`, whose output is taken to be in [-1, 1] as the vq family's is. `codes` [N, h, w]: the images'
    codes when already computed. `keep_images`: the reconstructions as PIL images too (for features)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchvision.transforms.functional import to_pil_image

    from clipforge.objectives.vq import codebook_usage

    squared = absolute = pixels = psnr_sum = ssim_sum = 0.0
    count = 0
    histogram = torch.zeros(model.codebook_size, dtype=torch.float64)
    example_at = {round(i * (len(images) - 1) / max(num_examples - 1, 1)) for i in range(min(num_examples,
                                                                                          len(images)))}
    result = ReconstructionResult({}, histogram)
    for start in range(0, len(images), batch_size):
        batch = preprocess_batch(images, preprocess, start, batch_size).to(device)
        batch_codes = model.encode_codes(batch) if codes is None else codes[start:start + batch.shape[0]].to(device)
        target = ((batch.float().cpu() + 1) / 2).clamp(0, 1)  # [B, 3, H, W] in [0, 1]
        output = (model.decode_codes(batch_codes).clamp(-1, 1).float().cpu() + 1) / 2  # float32: SSIM 15x faster
        psnr = peak_signal_noise_ratio(output, target, data_range=1.0, reduction="none", dim=(1, 2, 3))  # [B]
        psnr_sum += float(psnr.clamp(max=100.0).sum())  # identical images: 100 dB, not inf
        ssim_sum += float(structural_similarity_index_measure(output, target, data_range=1.0, reduction="sum"))
        difference = output - target
        squared += float(difference.double().pow(2).sum())
        absolute += float(difference.double().abs().sum())
        pixels += difference.numel()
        histogram += torch.bincount(batch_codes.flatten().cpu(), minlength=model.codebook_size).double()
        for offset in range(batch.shape[0]):
            if start + offset in example_at:
                result.examples.append((start + offset, target[offset], output[offset]))
            if keep_images:
                result.reconstructions.append(to_pil_image(output[offset]))
        count += batch.shape[0]
    usage, perplexity = codebook_usage(histogram)
    result.metrics = {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "mse": squared / pixels,
                      "l1": absolute / pixels, "codebook_usage": float(usage), "perplexity": float(perplexity)}
    return result


def reconstruction_metrics(model, images: Sequence, preprocess: Callable, batch_size: int = 64,
                           device: torch.device | str = "cpu") -> dict[str, float]:
    """measure_reconstruction's metrics, with `num_images`."""
    result = measure_reconstruction(model, images, preprocess, batch_size, device)
    return {**result.metrics, "num_images": len(images)}


def feature_extractor(context: TaskContext, run: str):
    """(model, preprocess) of the CLIP run `run`, loaded once per suite run."""
    from clipforge.errors import ConfigError
    from clipforge.models.factory import load_model

    def load():
        model, preprocess, _ = load_model(None, checkpoint=run, device=context.features.device)
        if not callable(getattr(model, "encode_image", None)):
            raise ConfigError(f"eval.feature_run '{run}' is not a model with an image tower (encode_image)")
        return model, preprocess

    return context.shared(("feature_run", run), load)


def real_image_features(context: TaskContext, dataset: EvalDataset, run: str) -> torch.Tensor:
    from clipforge.eval.features import compute_image_features

    model, preprocess = feature_extractor(context, run)
    return context.shared(("feature_run_images", run, id(dataset)), lambda: compute_image_features(
        model, preprocess, dataset.images, context.features.batch_size, context.features.device))


def _pair_examples(result: ReconstructionResult, dataset: EvalDataset) -> dict:
    from torchvision.transforms.functional import to_pil_image

    from clipforge.eval.results import thumbnail_png_base64

    pairs = [{"image": index, "key": dataset.keys[index],
              "original_png_base64": thumbnail_png_base64(to_pil_image(original)),
              "reconstruction_png_base64": thumbnail_png_base64(to_pil_image(reconstruction))}
             for index, original, reconstruction in result.examples]
    return {"pairs": pairs}


def run_reconstruction(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    from clipforge.eval.features import compute_image_features
    from clipforge.eval.frechet import frechet_distance

    store, run = context.features, context.config.feature_run
    result = measure_reconstruction(store.model, dataset.images, store.preprocess, store.batch_size, store.device,
                                    codes=dataset_codes(context, dataset), keep_images=run is not None,
                                    num_examples=NUM_EXAMPLES)
    metrics = dict(result.metrics)
    settings = {"psnr": "torchmetrics peak_signal_noise_ratio per image (data_range 1, pixels in [0, 1], capped "
                        "at 100 dB), mean over images",
                "ssim": "torchmetrics structural_similarity_index_measure per image (data_range 1, gaussian "
                        "kernel 11, sigma 1.5), mean over images",
                "usage": "% of the codebook used by the dataset's codes", "perplexity": "exp(entropy of the codes)"}
    if run is None:
        settings["frechet_distance"] = "not computed: no eval.feature_run (a clipforge CLIP run) is configured"
    else:
        model, preprocess = feature_extractor(context, run)
        fake = compute_image_features(model, preprocess, result.reconstructions, store.batch_size, store.device)
        metrics["frechet_distance"] = frechet_distance(real_image_features(context, dataset, run), fake)
        settings["frechet_distance"] = ("Fréchet distance between Gaussians fitted to real and reconstructed "
                                        "images' features (not Inception's FID)")
        settings["feature_extractor"] = {"run": str(run), "features": "unit-norm encode_image of the run's "
                                         "image tower, each image through the run's own preprocess (the "
                                         "reconstruction as an 8-bit PIL image)"}
    details = {"num_images": len(dataset), "codebook_size": store.model.codebook_size,
               "code_histogram": [int(c) for c in result.histogram.tolist()]}
    return TaskOutput(metrics, settings, details, examples=_pair_examples(result, dataset))


register_task(Task("reconstruction", "image_reconstruction", (), run_reconstruction,
                   "decode(encode(x)) vs x: PSNR, SSIM, codebook usage, perplexity, Fréchet distance",
                   requires=("codes",)))
