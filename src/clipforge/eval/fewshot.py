"""Few-shot classification: N-way K-shot episodes on frozen features, logistic regression on the support set.

An episode draws N classes (among those with at least K + Q images), then K support and Q query images of each,
without replacement, so support and query never share an image. A multinomial logistic regression
(L2, C = 1 by default, unit-norm features, the objective of sklearn's `LogisticRegression`) is fit on the
support features and scored on the queries. The result is the mean query accuracy over episodes with a 95%
confidence interval (1.96 x standard error; None, "not available", for a single episode). Episodes are drawn from `numpy.random.default_rng((seed, ways,
shots))`: the same seed gives the same episodes, and each (ways, shots) setting has its own stream.

All episodes of a setting are solved at once: their objectives are independent, so minimising their sum with
one L-BFGS run reaches every episode's own optimum (a test checks it against sklearn). This turns hundreds of
tiny sklearn fits into one batched solve (numpy + scipy's L-BFGS-B, the solver sklearn uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

from clipforge.errors import DataError
from clipforge.eval.threads import solver_threads

DEFAULT_QUERIES = 15


@dataclass
class Episode:
    classes: list[int]  # [N] dataset labels of the episode's classes; episode label i = classes[i]
    support: torch.Tensor  # [N * K] dataset indices, class-major
    support_labels: torch.Tensor  # [N * K] episode labels 0..N-1
    query: torch.Tensor  # [N * Q] dataset indices
    query_labels: torch.Tensor  # [N * Q]


def eligible_classes(labels: torch.Tensor, per_class: int) -> list[int]:
    counts = torch.bincount(labels)
    return [c for c in range(len(counts)) if counts[c] >= per_class]


def sample_episodes(labels, ways: int, shots: int, queries: int = DEFAULT_QUERIES, episodes: int = 100,
                    seed: int = 0) -> list[Episode]:
    """Seeded N-way K-shot episodes with Q queries per class; support and query are disjoint."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes = eligible_classes(labels, shots + queries)
    if len(classes) < ways:
        raise DataError(f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with >= "
                        f"{shots + queries} images; only {len(classes)} have that many")
    members = {c: torch.nonzero(labels == c).flatten().numpy() for c in classes}
    rng = np.random.default_rng((seed, ways, shots))
    result = []
    for _ in range(episodes):
        chosen = sorted(rng.choice(classes, size=ways, replace=False).tolist())
        support, query = [], []
        for c in chosen:
            picked = rng.choice(members[c], size=shots + queries, replace=False)  # no image twice
            support.append(picked[:shots])
            query.append(picked[shots:])
        result.append(Episode(
            classes=chosen,
            support=torch.from_numpy(np.concatenate(support)),
            support_labels=torch.arange(ways).repeat_interleave(shots),
            query=torch.from_numpy(np.concatenate(query)),
            query_labels=torch.arange(ways).repeat_interleave(queries),
        ))
    return result


def fit_batched_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, C: float = 1.0, max_iter: int = 1000,
    tolerance: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent multinomial logistic regressions, one per batch row, solved jointly.

    features [E, S, D], labels [E, S] in 0..num_classes-1. Each problem minimises sklearn's objective
    C * sum_i CE(W x_i + b, y_i) + |W|^2 / 2 (bias not penalised), scaled by 1/S (same minimiser), with the
    closed-form gradient and scipy's L-BFGS-B (the solver sklearn uses) on all problems' parameters at once.
    Returns (weight [E, K, D], bias [E, K]) in float64.
    """
    x = features.double().numpy()  # [E, S, D]
    episodes, support, dim = x.shape
    one_hot = np.eye(num_classes)[labels.numpy()]  # [E, S, K]
    split = episodes * num_classes * dim

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        weight = params[:split].reshape(episodes, num_classes, dim)
        bias = params[split:].reshape(episodes, num_classes)
        logits = x @ weight.transpose(0, 2, 1) + bias[:, None, :]  # [E, S, K]
        logits -= logits.max(axis=2, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=2, keepdims=True))
        probabilities = np.exp(logits - log_norm)
        cross_entropy = -(one_hot * (logits - log_norm)).sum()
        residual = C * (probabilities - one_hot)  # [E, S, K]
        grad_weight = residual.transpose(0, 2, 1) @ x + weight  # [E, K, D]
        grad_bias = residual.sum(axis=1)  # [E, K]
        loss = C * cross_entropy + 0.5 * np.square(weight).sum()
        return loss / support, np.concatenate([grad_weight.ravel(), grad_bias.ravel()]) / support

    start = np.zeros(split + episodes * num_classes)
    with solver_threads(x.size * num_classes):
        result = scipy.optimize.minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                                         options={"maxiter": max_iter, "gtol": tolerance, "ftol": 1e-14,
                                                  "maxcor": 20})
    weight = torch.from_numpy(result.x[:split].reshape(episodes, num_classes, dim))
    bias = torch.from_numpy(result.x[split:].reshape(episodes, num_classes))
    return weight, bias


def mean_and_ci95(values) -> tuple[float, float | None]:
    """(mean, 1.96 x standard error); the interval is None (not available) with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def evaluate_fewshot(
    features: torch.Tensor, labels, ways: int, shots: int, episodes: int = 100, queries: int = DEFAULT_QUERIES,
    seed: int = 0, C: float = 1.0,
) -> dict:
    """Mean query accuracy over seeded episodes: {"acc1", "ci95", "episodes", "queries", "accuracies"}."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    episode_list = sample_episodes(labels, ways, shots, queries, episodes, seed)
    with solver_threads(episodes * ways * (shots + queries) * features.shape[1] * ways):
        # one gather for all episodes (hundreds of tiny index ops cost more than the solve)
        support = features[torch.stack([e.support for e in episode_list])]  # [E, N*K, D]
        query = features[torch.stack([e.query for e in episode_list])]  # [E, N*Q, D]
        support_labels = torch.stack([e.support_labels for e in episode_list])  # [E, N*K]
        query_labels = torch.stack([e.query_labels for e in episode_list])  # [E, N*Q]
        weight, bias = fit_batched_logistic(support, support_labels, ways, C=C)
        logits = torch.baddbmm(bias[:, None, :], query.double(), weight.transpose(1, 2))  # [E, N*Q, N]
        accuracies = (logits.argmax(dim=-1) == query_labels).double().mean(dim=1)  # [E]
    mean, ci95 = mean_and_ci95(accuracies.numpy())
    return {"acc1": mean, "ci95": ci95, "episodes": episodes, "queries": queries, "ways": ways, "shots": shots,
            "accuracies": accuracies.tolist()}


def fewshot_queries(labels, ways: int, shots: int, queries: int = DEFAULT_QUERIES) -> int | None:
    """Queries per class for a (ways, shots) setting: `queries`, or fewer when fewer than `ways` classes have
    shots + queries images (the number used is recorded with the result); None when not even one fits."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = sorted(torch.bincount(labels).tolist(), reverse=True)
    if len(counts) < ways or counts[ways - 1] < shots + 1:
        return None
    return min(queries, counts[ways - 1] - shots)
