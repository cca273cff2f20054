"""Zero-shot classification: a classifier built from class names x prompt templates (CLIP paper; spec A5).

For class c and template k the prompt `template_k(name_c)` is encoded and L2-normalised (e_ck); the class
weight is the mean over templates, re-normalised: w_c = mean_k e_ck / |mean_k e_ck|. With unit-norm image
features x, logits = 100 * x @ W. Metrics use CLIP_benchmark's names and definitions:
`acc1`, `acc5` (NaN when there are fewer than 5 classes) and `mean_per_class_recall` (balanced accuracy:
the mean over classes that have images of the fraction of their images predicted correctly).

Prompts are checked after tokenization (`tokenize_prompts`): a template or class name that the tokenizer
truncates or merges so that two classes get the same tokens is refused (those classes would be inseparable and
the accuracy silently near chance); prompts cut at the tokenizer's context length give a warning.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from clipforge.errors import DataError
from clipforge.eval.features import compute_text_features
from clipforge.eval.templates import check_classnames, check_templates, render

LOGIT_SCALE = 100.0


def zeroshot_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Every prompt, class-major: [name_0 x template_0..T-1, name_1 x ..., ...]."""
    check_classnames(classnames)
    check_templates(templates)
    return [render(template, name) for name in classnames for template in templates]


def _truncated_rows(tokenizer, tokens: torch.Tensor, prompts: list[str]) -> list[int]:
    """Rows of `tokens` [P, L] whose prompt did not fit a tokenizer with a fixed `context_length` L. A row that
    fills the last position is a candidate (padding is 0 in open_clip's and most tokenizers); open_clip's BPE
    tokenizer confirms it with its own token count. Otherwise, when every row is full, the padding is not 0 and
    nothing can be told."""
    context = tokens.shape[1]
    if getattr(tokenizer, "context_length", None) != context:  # not a fixed-context tokenizer we can read
        return []
    full = torch.nonzero(tokens[:, -1] != 0).flatten().tolist()
    if callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "sot_token_id"):
        return [row for row in full if len(tokenizer.encode(prompts[row])) + 2 > context]  # + start and end
    return full if len(full) < len(prompts) else []


def tokenize_prompts(tokenizer, classnames: list[str], templates: list[str]) -> tuple[list[str], object]:
    """(prompts, tokens) of every class x template (class-major), tokenized in one call and checked: DataError
    when one template gives two classes the same tokens (truncation or merging), a warning when prompts are
    truncated. Tokens that are not an [P, L] tensor are passed through unchecked."""
    prompts = zeroshot_prompts(classnames, templates)
    tokens = tokenizer(prompts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(prompts):
        return prompts, tokens
    per_template = tokens.reshape(len(classnames), len(templates), -1).transpose(0, 1)  # [T, C, L]
    for index, rows in enumerate(per_template):
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if len(unique) < len(classnames):
            first_of: dict[int, int] = {}
            for c, group in enumerate(inverse.tolist()):
                if group in first_of:
                    a, b = classnames[first_of[group]], classnames[c]
                    raise DataError(f"template {index + 1} {templates[index][:60]!r} gives classes {a!r} and {b!r} "
                                    f"identical tokens (the tokenizer truncates or merges their prompts at "
                                    f"{tokens.shape[1]} tokens); shorten the template or rename the classes")
                first_of[group] = c
    truncated = _truncated_rows(tokenizer, tokens, prompts)
    if truncated:
        warnings.warn(f"{len(truncated)} of {len(prompts)} zero-shot prompts are longer than the tokenizer's "
                      f"{tokens.shape[1]} tokens and were truncated (e.g. {prompts[truncated[0]][:80]!r})",
                      stacklevel=2)
    return prompts, tokens


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
    prompts, tokens = tokenize_prompts(tokenizer, classnames, templates)
    features = compute_text_features(model, tokenizer, prompts, batch_size=batch_size, device=device, amp=amp,
                                     tokens=tokens)
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
