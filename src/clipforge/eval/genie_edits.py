"""GeNIe's label check as an evaluation task of text-guided editors (capability `edit`, the diffusion family).

    genie_edits   `eval.genie_sources` images of the dataset, each edited toward another class's prompt (the
                  class `offset` places after its own, offset drawn from eval.seed) at every noise ratio of
                  `eval.genie_ratios`, with GeNIe's sampler; a judge (`eval.feature_run`, a clipforge CLIP run)
                  labels every edit with its zero-shot classifier over the dataset's classes:
                    flip_target_r<r>, flip_source_r<r>   the share of edits at ratio r the judge assigns to the
                        target class / to the source class (the semantic-flip curve)
                    flip_point   the smallest r whose target share reaches its source share (NaN: none)
                    real_acc1    the judge's zero-shot accuracy on the source images: what it can tell
                  `examples`: a grid per source (the source, then its edits over r) and the curve as a PNG.

An edit keeps the source's low-level look at a small r and takes on the target's semantics as r grows; GeNIe
uses the r just past the flip (0.8 in the paper, where the flip is at r ≈ 0.5-0.7).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipforge.config import EvalConfig
from clipforge.errors import ConfigError
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.features import compute_image_features
from clipforge.eval.generation import image_grid, load_judge, tensor_images
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task
from clipforge.eval.templates import render


def _check(dataset: EvalDataset, config: EvalConfig) -> str | None:
    if not config.feature_run:
        return "needs a judge: set eval.feature_run to a clipforge CLIP run that labels the edits"
    if dataset.labels is None or not dataset.classnames or len(dataset.classnames) < 2:
        return "needs labelled images of at least two classes"
    return None


def _curve_png(curve: dict[float, dict[str, float]]) -> str:
    import base64
    import tempfile
    from pathlib import Path

    from clipforge.augment.protocols import plot_flip_curve

    with tempfile.TemporaryDirectory() as folder:
        path = plot_flip_curve(curve, Path(folder) / "flip.png", title="the judge's class of the edits over r")
        return base64.b64encode(path.read_bytes()).decode()


def run_genie_edits(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    from clipforge.augment.protocols import flip_curve, flip_point
    from clipforge.augment.sampler import to_model_input
    from clipforge.data.transforms import sample_seed
    from clipforge.eval.results import thumbnail_png_base64
    from clipforge.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits

    config, store = context.config, context.features
    model, classnames = store.model, dataset.classnames
    ratios = [float(r) for r in config.genie_ratios]
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad or not ratios or len(set(ratios)) != len(ratios):
        raise ConfigError(f"eval.genie_ratios must be distinct noise ratios in (0, 1], got {list(config.genie_ratios)}")
    count = min(config.genie_sources, len(dataset))
    rng = np.random.default_rng(config.seed)
    sources = sorted(rng.choice(len(dataset), size=count, replace=False).tolist())
    offsets = rng.integers(1, len(classnames), size=count)
    source_labels = [int(dataset.labels[i]) for i in sources]
    target_labels = [(label + int(o)) % len(classnames) for label, o in zip(source_labels, offsets)]
    images = [dataset.images[i].convert("RGB") for i in sources]
    pixels = torch.stack([to_model_input(image, model.image_size) for image in images])  # [n, 3, S, S] in [-1, 1]
    prompts = [render(context.templates[0], classnames[t]) for t in target_labels]
    edits: dict[float, list] = {}
    for ratio in ratios:  # one call per ratio; every sample has its own seed, shared across the ratios
        seeds = [sample_seed("genie_edits", config.seed, dataset.keys[i], classnames[t])
                 for i, t in zip(sources, target_labels)]
        edits[ratio] = tensor_images(model.edit(pixels, prompts, [ratio] * count, seeds))
    judge, preprocess, tokenizer = context.shared(("judge", config.feature_run),
                                                  lambda: load_judge(config.feature_run, store.device))
    classifier = context.shared(("judge_classifier", config.feature_run, tuple(classnames)),
                                lambda: build_zeroshot_classifier(judge, tokenizer, classnames, context.templates,
                                                                  store.batch_size, store.device))

    def labels_of(batch) -> np.ndarray:
        features = compute_image_features(judge, preprocess, batch, store.batch_size, store.device)
        return zeroshot_logits(features, classifier).argmax(dim=1).cpu().numpy()

    predictions = [labels_of(edits[r]) for r in ratios]
    curve = flip_curve(ratios, predictions, source_labels, target_labels)
    flip = flip_point(curve)
    metrics = {f"flip_target_r{r:g}": curve[r]["target"] for r in ratios}
    metrics.update({f"flip_source_r{r:g}": curve[r]["source"] for r in ratios})
    metrics["flip_point"] = math.nan if flip is None else float(flip)
    metrics["real_acc1"] = float((labels_of(images) == np.asarray(source_labels)).mean())
    size = model.image_size
    rows = [image_grid([images[j].resize((size, size))] + [edits[r][j] for r in ratios]) for j in range(count)]
    shown = rows[:6]
    grids = [{"title": f"{classnames[source_labels[j]]} -> {classnames[target_labels[j]]}",
              "png_base64": thumbnail_png_base64(row.resize((row.width * 3, row.height * 3)), max_size=1024)}
             for j, row in enumerate(shown)]
    settings = {"ratios": ratios, "sources": count, "prompt_template": context.templates[0], "seed": config.seed,
                "sampling": dict(getattr(model, "sampling", {})), "judge": config.feature_run,
                "classifier": "the judge's zero-shot classifier over the dataset's class names"}
    details = {"curve": {f"{r:g}": v for r, v in curve.items()}, "sources": [dataset.keys[i] for i in sources],
               "source_classes": [classnames[s] for s in source_labels],
               "target_classes": [classnames[t] for t in target_labels]}
    return TaskOutput(metrics, settings, details,
                      examples={"ratios": ratios, "rows": grids, "curve_png_base64": _curve_png(curve)},
                      uses_classnames=True, uses_templates=True)


register_task(Task("genie_edits", "genie_label_check", ("classnames",), run_genie_edits,
                   "images edited toward another class over the noise ratio r, labelled by a CLIP judge: the "
                   "semantic-flip curve", check=_check, requires=("edit",)))
