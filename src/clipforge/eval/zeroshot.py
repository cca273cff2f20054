"""Zero-shot classification: a classifier built from class names x prompt templates (CLIP paper; spec A5).

For class c and template k the prompt `template_k(name_c)` is encoded and L2-normalised (e_ck); the class
weight is the mean over templates, re-normalised: w_c = mean_k e_ck / |mean_k e_ck|. With unit-norm image
features x, logits = 100 * x @ W. Metrics use CLIP_benchmark's names and definitions:
`acc1`, `acc5` (NaN when there are fewer than 5 classes) and `mean_per_class_recall` (balanced accuracy:
the mean over classes that have images of the fraction of their images predicted correctly).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from clipforge.eval.features import compute_text_features
from clipforge.eval.templates import check_classnames, check_templates, render

LOGIT_SCALE = 100.0


def zeroshot_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Every prompt, class-major: [name_0 x template_0..T-1, name_1 x ..., ...]."""
    check_classnames(classnames)
    check_templates(templates)
    return [render(template, name) for name in classnames for template in templates]


def classifier_from_prompt_features(prompt_features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C * T, D] unit-norm prompt features (class-major) -> [D, C] unit-norm class weights."""
    per_class = prompt_features.reshape(num_classes, -1, prompt_features.shape[-1])  # [C, T, D]
    per_class = F.normalize(per_class, dim=-1)  # a no-op for unit-norm input; keeps the contract explicit
    return F.normalize(per_class.mean(dim=1), dim=-1).T.contiguous()  # [D, C]


def build_zeroshot_classifier(
    model, tokenizer, classnames: list[str], templates: list[str], batch_size: int = 256,
    device: torch.device | None = None, amp: bool = False,
) -> torch.Tensor:
    """[D, C] zero-shot class weights for `classnames` with the template ensemble `templates`."""
    prompts = zeroshot_prompts(classnames, templates)
    features = compute_text_features(model, tokenizer, prompts, batch_size=batch_size, device=device, amp=amp)
    return classifier_from_prompt_features(features, len(classnames))


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[N, D] unit-norm image features, [D, C] class weights -> [N, C] logits (x100, as CLIP)."""
    return LOGIT_SCALE * image_features @ classifier


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the k largest logits (torch.topk order, as CLIP_benchmark)."""
    top = logits.topk(k, dim=1).indices  # [N, k]
    return (top == labels[:, None]).any(dim=1).sum().item() / len(labels)  # count / n in float64


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classnames: list[str] | None = None, dataset_name: str = "dataset",
    prefix: str = "",
) -> tuple[dict, dict]:
    """(metrics, details) for [N, C] logits and [N] labels.

    metrics: acc1, acc5, mean_per_class_recall (CLIP_benchmark names, with `prefix`, e.g. 'lp_').
    details: confusion matrix, per-class recall (None for classes without images), predictions.
    A class without images leaves the numbers valid (recall averages over the classes that have images) and
    raises a warning naming it.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    support = confusion.sum(dim=1)  # [C] images per true class
    present = support > 0
    recall = confusion.diagonal().double() / support.clamp(min=1).double()
    if not bool(present.all()):
        missing = [classnames[i] if classnames else str(i) for i in torch.nonzero(~present).flatten().tolist()]
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"{dataset_name}: {len(missing)} of {num_classes} classes have no images ({shown}); "
                      f"{prefix}mean_per_class_recall averages over the {int(present.sum())} classes that have "
                      f"images",
                      stacklevel=2)
    metrics = {
        f"{prefix}acc1": topk_accuracy(logits, labels, 1),
        f"{prefix}acc5": topk_accuracy(logits, labels, 5) if num_classes >= 5 else math.nan,
        f"{prefix}mean_per_class_recall": recall[present].mean().item(),
    }
    details = {
        "confusion_matrix": confusion.tolist(),
        "per_class_recall": [r if p else None for r, p in zip(recall.tolist(), present.tolist())],
        "support": support.tolist(),
    }
    return metrics, details


def evaluate_zeroshot(
    image_features: torch.Tensor, labels, classifier: torch.Tensor, classnames: list[str] | None = None,
    dataset_name: str = "dataset",
) -> tuple[dict, dict]:
    """Zero-shot metrics of unit-norm image features [N, D] against class weights [D, C]."""
    return classification_metrics(zeroshot_logits(image_features, classifier), labels, classnames, dataset_name)
