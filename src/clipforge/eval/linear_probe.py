"""Linear probe, the CLIP paper's protocol (spec A6): logistic regression on frozen features.

- Classifier: scikit-learn `LogisticRegression` (multinomial, L-BFGS, `max_iter=1000`) on unit-norm
  `encode_image` features (the features every other task shares; the paper used pre-projection features).
- Regularisation: C (sklearn's inverse L2 strength) is chosen on a validation split carved from the training
  set (stratified, seeded; `val_fraction`) over 97 log-spaced values from 1e-6 to 1e6 (8 per decade), with the
  paper's parametric binary search: 7 coarse values (one per two decades), then the interval around the best
  value is halved down to a single step (8, 4, 2, 1 steps either side), so about 15 fits instead of 97. Ties
  on validation accuracy go to the smaller C (stronger regularisation).
- Final classifier: refit on train + validation with the chosen C; report `lp_acc1`, `lp_acc5`,
  `lp_mean_per_class_recall` on the test set (CLIP_benchmark names) plus `C` and the validation accuracy.
CLIP_benchmark's own probe differs (a torch linear layer trained with AdamW, weight decay swept); see
docs/evaluation.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from clipforge.errors import DataError
from clipforge.eval.threads import solver_threads
from clipforge.eval.zeroshot import classification_metrics

C_GRID = np.logspace(-6, 6, 97)  # 8 values per decade
COARSE_STEP = 16  # the 7 coarse values: 1e-6, 1e-4, ..., 1e6
MAX_ITER = 1000
VAL_FRACTION = 0.2  # share of each class's training images held out to choose C


@dataclass
class FittedLinear:
    """A fitted multinomial classifier: logits = features @ weight.T + bias."""

    C: float
    weight: torch.Tensor  # [K, D]
    bias: torch.Tensor  # [K]
    classes: torch.Tensor  # [K] label of each output
    n_iter: int = 0

    def logits(self, features: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[N, num_classes] logits; classes absent from the training labels get -inf."""
        out = torch.full((features.shape[0], num_classes), float("-inf"), dtype=torch.float64)
        out[:, self.classes] = features.double() @ self.weight.T + self.bias
        return out

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes[(features.double() @ self.weight.T + self.bias).argmax(dim=1)]


@dataclass
class LinearProbeResult:
    metrics: dict
    details: dict
    classifier: FittedLinear  # refit on train + val at the chosen C
    sweep: list[FittedLinear] = field(default_factory=list)  # fits on the train part, one per C visited


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, C: float) -> FittedLinear:
    """sklearn L-BFGS multinomial logistic regression; a classifier even if L-BFGS stopped at max_iter."""
    model = LogisticRegression(C=C, max_iter=MAX_ITER, solver="lbfgs")
    if len(torch.unique(labels)) < 2:
        raise DataError("the linear probe needs training images of at least two classes")
    work = features.shape[0] * features.shape[1] * len(torch.unique(labels))
    with warnings.catch_warnings(), solver_threads(work):
        warnings.simplefilter("ignore", ConvergenceWarning)  # very large C may stop at max_iter; still usable
        model.fit(features.double().numpy(), labels.numpy())
    weight, bias = torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)
    if weight.shape[0] == 1:  # sklearn stores a binary problem as one row: logits (-z/2, z/2) keep the argmax
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    return FittedLinear(C=float(C), weight=weight, bias=bias, classes=torch.from_numpy(model.classes_),
                        n_iter=int(np.max(model.n_iter_)))


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): each class with >= 2 images puts round(fraction * n) (>= 1) into val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten().numpy()
        members = members[rng.permutation(len(members))]
        n_val = int(round(val_fraction * len(members)))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return torch.tensor(sorted(train), dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)


def accuracy(classifier: FittedLinear, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (classifier.predict(features) == labels).double().mean().item()


def sweep_C(
    train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
) -> tuple[int, dict[int, tuple[float, FittedLinear]]]:
    """Parametric binary search over C_GRID; returns (best grid index, {index: (val accuracy, fit)})."""
    visited: dict[int, tuple[float, FittedLinear]] = {}

    def score(index: int) -> float:
        if index not in visited:
            fit = fit_logistic(train_features, train_labels, float(C_GRID[index]))
            visited[index] = (accuracy(fit, val_features, val_labels), fit)
        return visited[index][0]

    def best(indices) -> int:  # highest accuracy; ties -> smaller C (lower index)
        return max(sorted(set(indices)), key=lambda i: (score(i), -i))

    peak = best(range(0, len(C_GRID), COARSE_STEP))
    step = COARSE_STEP // 2
    while step >= 1:
        peak = best([max(peak - step, 0), peak, min(peak + step, len(C_GRID) - 1)])
        step //= 2
    return peak, visited


def linear_probe(
    train_features: torch.Tensor, train_labels, test_features: torch.Tensor, test_labels, num_classes: int,
    val_fraction: float = VAL_FRACTION, seed: int = 0, classnames: list[str] | None = None, dataset_name: str = "dataset",
) -> LinearProbeResult:
    """The full protocol: C sweep on a validation split of the training set, refit on train + val, test."""
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise DataError(f"{dataset_name}: the linear probe needs at least two training images of some class to "
                        f"hold out a validation split")
    peak, visited = sweep_C(train_features[train_idx], train_labels[train_idx], train_features[val_idx],
                            train_labels[val_idx])
    final = fit_logistic(train_features, train_labels, float(C_GRID[peak]))
    logits = final.logits(test_features, num_classes).float()
    metrics, details = classification_metrics(logits, test_labels, classnames, dataset_name, prefix="lp_")
    metrics.update({"C": final.C, "lp_val_acc1": visited[peak][0]})
    details.update({
        "protocol": "sklearn LogisticRegression(lbfgs, max_iter=1000) on unit-norm features; C by parametric "
                    "binary search on a validation split; refit on train+val",
        "sweep": [{"C": float(C_GRID[i]), "val_acc1": visited[i][0]} for i in sorted(visited)],
        "num_train": int(len(train_idx)), "num_val": int(len(val_idx)), "num_test": int(len(test_labels)),
        "final_n_iter": final.n_iter, "final_converged": final.n_iter < MAX_ITER,
    })
    sweep = [visited[i][1] for i in sorted(visited)]
    return LinearProbeResult(metrics=metrics, details=details, classifier=final, sweep=sweep)
