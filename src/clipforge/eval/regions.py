"""Region (box) classification: each box's region feature against class prompt embeddings (FineCLIP C7).

For every captioned box of a dataset, the region feature is RoIAlign-pooled from the model's dense map
(`clipforge.models.dense`) and classified zero-shot against the template-averaged class embeddings (the same
classifier as image zero-shot). Metrics are taken over all boxes, with CLIP_benchmark-style names:
`region_acc1`, `region_acc5`, `region_mean_per_class_recall` (the "mAcc" of the FineCLIP/CLIPSelf papers).

Protocol (FineCLIP's box classification, spec C6.7-8): the image is squashed to `image_size` (default the
model's input size; larger values give a finer dense map, CLIPSelf-style), normalised with the model's
mean/std, and boxes are scaled with it. The class embeddings come from the model's current text tower.

A box's class is, in order: its `label` (index into the class list), its `classname`, or the class name
that appears as a phrase in its caption ("a large striped red circle" -> "red circle"; the longest match).
Boxes without a class in the list, or with a degenerate box, are skipped and counted (`region_skipped`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import functional as TF

from clipforge.errors import DataError
from clipforge.eval.features import model_device
from clipforge.eval.zeroshot import build_zeroshot_classifier, classification_metrics, zeroshot_logits
from clipforge.models.dense import encode_dense, pool_regions, vision_transformer

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def _phrase_pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, name.lower().split())) + r"(?!\w)")


def region_label(region: dict, classnames: Sequence[str], patterns: list[re.Pattern] | None = None) -> int | None:
    """The class index of one region dict, or None when it names no class of `classnames`."""
    if "label" in region and region["label"] is not None:
        label = int(region["label"])
        return label if 0 <= label < len(classnames) else None
    if region.get("classname") is not None:
        lowered = [name.lower() for name in classnames]
        name = str(region["classname"]).strip().lower()
        return lowered.index(name) if name in lowered else None
    caption = str(region.get("caption") or "").lower()
    patterns = patterns or [_phrase_pattern(name) for name in classnames]
    matches = [(len(classnames[i]), i) for i, pattern in enumerate(patterns) if pattern.search(caption)]
    return max(matches)[1] if matches else None


def _usable_box(box, width: int, height: int) -> list[float] | None:
    """Clip to the image; None for a malformed, non-finite or empty box."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(map(lambda v: v == v and abs(v) != float("inf"), (x0, y0, x1, y1))):
        return None
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def _normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))


def _input_size(model, image_size: int | tuple[int, int] | None, dataset) -> tuple[int, int]:
    """(H, W): the requested size, else the ViT's input size, else (a model with its own region features)
    the size of the dataset's first image."""
    if image_size is not None:
        return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if hasattr(model, "encode_regions") or hasattr(model, "encode_dense"):
        first = dataset.images[0]
        return (first.height, first.width)
    return tuple(vision_transformer(model).image_size)


def region_features(model, images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, M, D] unit-norm region features: the model's own `encode_regions(images, boxes, valid)` or
    `encode_dense(images)` when it has one, else the dense map of an open_clip ViT; boxes in input pixels."""
    if hasattr(model, "encode_regions"):
        return torch.nn.functional.normalize(model.encode_regions(images, boxes, valid).float(), dim=-1)
    dense = model.encode_dense(images) if hasattr(model, "encode_dense") else encode_dense(model, images)
    return pool_regions(dense.float(), boxes, valid, tuple(images.shape[-2:]))


@torch.no_grad()
def compute_region_features(
    model, dataset, classnames: Sequence[str], image_size: int | tuple[int, int] | None = None,
    batch_size: int = 64, device: torch.device | None = None, progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features [N, D] of every labelled box, labels [N], number of boxes skipped)."""
    if dataset.regions is None:
        raise DataError(f"dataset '{dataset.name}' has no region annotations for region classification")
    device = device or model_device(model)
    height, width = _input_size(model, image_size, dataset)
    mean, std = _normalisation(model)
    patterns = [_phrase_pattern(name) for name in classnames]
    features, labels, skipped = [], [], 0
    for start in range(0, len(dataset), batch_size):
        tensors, batch_boxes, batch_labels = [], [], []
        for index in range(start, min(start + batch_size, len(dataset))):
            image = dataset.images[index].convert("RGB")
            scale_x, scale_y = width / image.width, height / image.height
            boxes, box_labels = [], []
            for region in dataset.regions[index]:
                box = _usable_box(region.get("box"), image.width, image.height)
                label = region_label(region, classnames, patterns)
                if box is None or label is None:
                    skipped += 1
                    continue
                boxes.append([box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y])
                box_labels.append(label)
            resized = image.resize((width, height), Image.BICUBIC)  # squash, as FineCLIP evaluates
            tensors.append(TF.normalize(TF.to_tensor(resized), mean, std))
            batch_boxes.append(boxes)
            batch_labels.extend(box_labels)
        slots = max((len(b) for b in batch_boxes), default=0)
        if slots == 0:
            continue
        boxes = torch.zeros(len(batch_boxes), slots, 4)  # [B, M, 4], padded
        valid = torch.zeros(len(batch_boxes), slots, dtype=torch.bool)  # [B, M]
        for row, image_boxes in enumerate(batch_boxes):
            if image_boxes:
                boxes[row, :len(image_boxes)] = torch.tensor(image_boxes)
                valid[row, :len(image_boxes)] = True
        pooled = region_features(model, torch.stack(tensors).to(device), boxes.to(device), valid.to(device))
        features.append(pooled[valid.to(device)].float().cpu())  # [K, D], image-major like batch_labels
        labels.extend(batch_labels)
        if progress is not None:
            progress(f"regions {dataset.name}", min(start + batch_size, len(dataset)), len(dataset))
    if not labels:
        raise DataError(f"dataset '{dataset.name}': no box names one of the {len(classnames)} classes")
    return torch.cat(features), torch.tensor(labels), skipped


def evaluate_regions(
    model, tokenizer, dataset, templates: list[str], classnames: Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None, batch_size: int = 64, device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict, dict]:
    """(metrics, details) of region classification on `dataset` (an EvalDataset with `regions`).

    metrics: region_acc1, region_acc5, region_mean_per_class_recall, region_count, region_skipped.
    """
    classnames = list(classnames if classnames is not None else dataset.classnames or [])
    if not classnames:
        raise DataError(f"dataset '{dataset.name}' has no class names for region classification")
    features, labels, skipped = compute_region_features(model, dataset, classnames, image_size, batch_size,
                                                        device, progress)
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, device=device).float().cpu()
    with warnings.catch_warnings():  # classes without boxes are expected here (recall averages over the rest)
        warnings.simplefilter("ignore", UserWarning)
        metrics, details = classification_metrics(zeroshot_logits(features, classifier), labels, classnames,
                                                  dataset_name=dataset.name, prefix="region_")
    metrics["region_count"] = int(labels.numel())
    metrics["region_skipped"] = skipped
    return metrics, details


# ----------------------------------------------------------------------------------------------------------
# The evaluation suite's task "regions"


def run_region_classification(context, dataset):
    """Task runner for the suite: region features of every box against the shared zero-shot classifier."""
    from clipforge.eval.tasks import TaskOutput

    store = context.features
    features, labels, skipped = compute_region_features(
        store.model, dataset, dataset.classnames, batch_size=min(store.batch_size, 64), device=store.device,
        progress=store.progress,
    )
    classifier = context.zeroshot_classifier(dataset.classnames)  # [D, C], shared with image zero-shot
    with warnings.catch_warnings():  # classes without boxes are expected (recall averages over the rest)
        warnings.simplefilter("ignore", UserWarning)
        metrics, details = classification_metrics(zeroshot_logits(features, classifier), labels,
                                                  dataset.classnames, dataset_name=dataset.name, prefix="region_")
    metrics["region_count"] = int(labels.numel())
    metrics["region_skipped"] = skipped
    settings = {
        "templates": context.template_source, "num_templates": len(context.templates),
        "features": "RoIAlign 1x1 (aligned) of the value-only last-block dense map, unit norm",
        "resize": "squash to the model input", "box_class": "label, classname, or the class named in the caption",
    }
    return TaskOutput(metrics, settings, details, uses_classnames=True, uses_templates=True)


def _register() -> None:
    from clipforge.eval.tasks import Task, register_task

    register_task(Task(name="regions", benchmark_task="region_classification", needs=("regions", "classnames"),
                       run=run_region_classification,
                       description="box classification from dense region features (FineCLIP)",
                       requires=("dense", "encode_text")))


_register()
