"""Robustness to distribution shift: zero-shot accuracy on shifted renderings, and effective robustness.

Each shifted variant (SynthScenes: background, outline, noise, blur, scale) holds the same scenes as the
original test set, rendered differently. For every variant v we report the zero-shot top-1 accuracy next to
the original's, and the *effective robustness* (Taori et al., 2020; CLIP paper section 3.3):

- Baseline family: linear classifiers trained on the original's training features — the linear probe's fits at
  every C its sweep visited plus its final classifier. Each gives a point (ID accuracy on the original test set,
  OOD accuracy on variant v). Regularisation strength moves the points from chance to the best probe.
- Trend: a least-squares line through these points in logit space, logit(acc_v) = a * logit(acc_orig) + b
  (accuracies are clipped to [0.5/n, 1 - 0.5/n] before the logit, n = test images). If the baseline points do
  not spread in ID accuracy (< 2 distinct values) the trend is slope 1 through their mean.
- Effective robustness of the zero-shot model on v: ER_v = acc_zs(v) - sigmoid(a * logit(acc_zs(orig)) + b),
  its OOD accuracy above what a baseline classifier with the same ID accuracy is expected to reach. ER > 0 means
  more robust than the baseline trend. `effective_robustness` is the mean over variants.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipforge.eval.linear_probe import FittedLinear
from clipforge.eval.zeroshot import zeroshot_logits

DEFINITION = ("ER_v = acc_zs(v) - sigmoid(a * logit(acc_zs(original)) + b), where logit(acc_v) = a * logit(acc_original)"
              " + b is fit by least squares to linear classifiers trained on the original's training features "
              "(the linear probe's C sweep and final fit)")


def clipped_logit(accuracy: float, num_samples: int) -> float:
    eps = 0.5 / max(num_samples, 1)
    p = min(max(accuracy, eps), 1 - eps)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def fit_logit_trend(id_acc: list[float], ood_acc: list[float], num_samples: int) -> tuple[float, float]:
    """(slope, intercept) of logit(ood) = slope * logit(id) + intercept over distinct points."""
    points = sorted({(round(i, 12), round(o, 12)) for i, o in zip(id_acc, ood_acc)})
    x = np.array([clipped_logit(i, num_samples) for i, _ in points])
    y = np.array([clipped_logit(o, num_samples) for _, o in points])
    if len(np.unique(x)) < 2:
        return 1.0, float(np.mean(y - x))
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def effective_robustness(model_id: float, model_ood: float, slope: float, intercept: float,
                         num_samples: int) -> float:
    expected = sigmoid(slope * clipped_logit(model_id, num_samples) + intercept)
    return model_ood - expected


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).double().mean().item()


def evaluate_robustness(
    original_features: torch.Tensor, labels, variant_features: dict[str, torch.Tensor], classifier: torch.Tensor,
    baseline: FittedLinear, baseline_family: list[FittedLinear],
) -> tuple[dict, dict]:
    """Metrics per variant: zero-shot `acc1@<v>`, baseline `baseline_acc1@<v>`, `effective_robustness@<v>`.

    original_features [N, D] and each variant's [N, D] are unit-norm features of the same N items; `classifier`
    [D, C] the zero-shot weights; `baseline` the linear probe, `baseline_family` its sweep fits.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    num = len(labels)
    family = [*baseline_family, baseline]

    def zeroshot_acc(features):
        return _accuracy(zeroshot_logits(features, classifier).argmax(dim=1), labels)

    zs_orig = zeroshot_acc(original_features)
    family_orig = [_accuracy(fit.predict(original_features), labels) for fit in family]
    metrics = {"acc1@original": zs_orig, "baseline_acc1@original": family_orig[-1]}
    details = {"variants": {}, "definition": DEFINITION}
    robustness = []
    for variant, features in variant_features.items():
        zs = zeroshot_acc(features)
        family_ood = [_accuracy(fit.predict(features), labels) for fit in family]
        slope, intercept = fit_logit_trend(family_orig, family_ood, num)
        er = effective_robustness(zs_orig, zs, slope, intercept, num)
        robustness.append(er)
        metrics[f"acc1@{variant}"] = zs
        metrics[f"baseline_acc1@{variant}"] = family_ood[-1]
        metrics[f"effective_robustness@{variant}"] = er
        details["variants"][variant] = {
            "zeroshot_acc1": zs, "baseline_acc1": family_ood[-1], "effective_robustness": er,
            "trend_slope": slope, "trend_intercept": intercept,
            "baseline_points": [{"C": fit.C, "acc1_original": i, "acc1_shifted": o}
                                for fit, i, o in zip(family, family_orig, family_ood)],
        }
    metrics["effective_robustness"] = float(np.mean(robustness)) if robustness else math.nan
    return metrics, details
