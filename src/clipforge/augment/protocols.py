"""The evaluation protocols of GeNIe (Koohpayegani et al., arXiv 2312.02548) as pure functions.

Few-shot. An episode draws N classes, K support and Q query images of each (`sample_episodes`); support and query
never share an image (the paper's sampler drew them with two independent permutations, so a query could also be
a support image). Each support image of every other class is edited towards each target class, (N - 1) * K edits
per class (`genie_pairs`); the img2img baseline edits a class's own images N - 1 times each, the same budget
(`img2img_pairs`); MixUp and CutMix (`mixup`, `cutmix`) mix pairs of support images into soft-labelled images.
A multinomial logistic regression on frozen features of the support plus its augmentations (`fit_logistic`,
sklearn's objective, with soft labels) is scored on the queries, and episodes are summarised as mean ± 95% CI
(`mean_ci`, 1.96 x population std / sqrt(n), as the paper's code; `eval.fewshot.mean_and_ci95` uses ddof=1).

Long tail. Per-class training counts decrease Zipf-like (`zipf_counts`); classes are grouped many / medium /
few by their count (`tail_groups`) and accuracy is reported per group (`group_accuracy`).

Label check. A strong classifier labels GeNIe edits made at noise ratio r; the fraction it assigns to the target
and to the source class against r is the semantic-flip curve (`flip_curve`); the flip point is the smallest r
where the target fraction reaches the source fraction (`flip_point`); `plot_flip_curve` draws it.

Randomness: episodes draw from `numpy.random.default_rng(seed)`; MixUp / CutMix take a `numpy.random.Generator`
(numpy's Beta is seedable; torch's Beta sampler takes no generator), so the same seed gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from clipforge.eval.report_plots import DPI, PALETTE, _style

MIX_ALPHA = 0.8  # Beta(0.8, 0.8): the mixing weight of the paper's MixUp / CutMix baselines


# ---------------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode; way i (the episode label) is dataset class `classes[i]`."""

    classes: tuple[int, ...]  # [N] dataset class ids, sorted
    support: tuple[tuple[int, ...], ...]  # [N][K] item ids
    query: tuple[tuple[int, ...], ...]  # [N][Q] item ids, none of them in support

    def labelled(self, part: str = "support") -> tuple[list[int], list[int]]:
        """(item ids, episode labels) of "support" or "query", way-major: [N * K] or [N * Q] each."""
        groups = {"support": self.support, "query": self.query}[part]
        return [i for group in groups for i in group], [w for w, group in enumerate(groups) for _ in group]


def _as_pools(pools: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], name: str) -> dict[int, list[int]]:
    pools = dict(pools) if isinstance(pools, Mapping) else dict(enumerate(pools))
    result = {int(c): [int(i) for i in items] for c, items in pools.items()}
    for c, items in result.items():
        if len(set(items)) != len(items):
            raise ValueError(f"class {c}: the {name} pool lists an item id more than once")
    return result


def sample_episodes(
    support_pool: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], *,
    query_pool: Mapping[int, Sequence[int]] | Sequence[Sequence[int]] | None = None,
    n_way: int = 5, k_shot: int, n_query: int = 16, num_episodes: int, seed: int,
) -> list[Episode]:
    """Seeded episodes: classes among those of `support_pool`, K support ids from `support_pool[c]`, then Q query
    ids from `query_pool[c]` (default: the support pool) minus the chosen support, all without replacement."""
    support_pool = _as_pools(support_pool, "support")
    query_pool = support_pool if query_pool is None else _as_pools(query_pool, "query")
    if n_way < 1 or k_shot < 1 or n_query < 1 or num_episodes < 0:
        raise ValueError(f"need n_way, k_shot, n_query >= 1 and num_episodes >= 0, got {n_way}, {k_shot}, "
                         f"{n_query}, {num_episodes}")
    classes = sorted(support_pool)
    if len(classes) < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes; the support pool has {len(classes)}")
    for c in classes:
        if c not in query_pool:
            raise ValueError(f"class {c} has a support pool but no query pool")
        if len(support_pool[c]) < k_shot:
            raise ValueError(f"class {c}: the support pool has {len(support_pool[c])} items, {k_shot}-shot needs "
                             f"{k_shot}")
        # the support may take up to K of the query pool's items: Q must remain whatever it takes
        shared = len(set(support_pool[c]) & set(query_pool[c]))
        if len(query_pool[c]) - min(k_shot, shared) < n_query:
            raise ValueError(f"class {c}: the query pool has {len(query_pool[c])} items ({shared} also in the "
                             f"support pool); {n_query} queries besides {k_shot} support need more")
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(num_episodes):
        chosen = sorted(rng.choice(classes, size=n_way, replace=False).tolist())
        support, query = [], []
        for c in chosen:
            shots = rng.choice(support_pool[c], size=k_shot, replace=False).tolist()
            taken = set(shots)
            candidates = [i for i in query_pool[c] if i not in taken]
            support.append(tuple(shots))
            query.append(tuple(rng.choice(candidates, size=n_query, replace=False).tolist()))
        episodes.append(Episode(classes=tuple(chosen), support=tuple(support), query=tuple(query)))
    return episodes


def genie_pairs(episode: Episode) -> list[tuple[int, int, int]]:
    """GeNIe's edits, (source item, source way, target way): for each target way, every support image of every
    other way, (N - 1) * K per target; target-major, then source way, then the source's support order."""
    ways = range(len(episode.classes))
    return [(item, source, target) for target in ways for source in ways if source != target
            for item in episode.support[source]]


def img2img_pairs(episode: Episode) -> list[tuple[int, int, int]]:
    """The img2img baseline at GeNIe's budget, (source item, way, way): each support image of a target way
    edited towards its own class N - 1 times, in the order of `genie_pairs` (one copy per other way)."""
    ways = range(len(episode.classes))
    return [(item, target, target) for target in ways for other in ways if other != target
            for item in episode.support[target]]


# ---------------------------------------------------------------------------------------------- logistic regression


def _soft_targets(targets, num_classes: int | None) -> torch.Tensor:
    targets = torch.as_tensor(targets)
    if targets.ndim == 1:
        if targets.is_floating_point():
            raise ValueError("1-D targets must be integer class labels; soft labels are [n, C]")
        classes = int(targets.max()) + 1 if num_classes is None else num_classes
        return torch.nn.functional.one_hot(targets.long(), classes).double()
    soft = targets.double()
    if soft.ndim != 2 or (num_classes is not None and soft.shape[1] != num_classes):
        raise ValueError(f"soft targets must be [n, C], got shape {list(soft.shape)}")
    if bool((soft < 0).any()) or not torch.allclose(soft.sum(dim=1), torch.ones(len(soft), dtype=torch.float64),
                                                     atol=1e-6):
        raise ValueError("soft targets must be non-negative and each row must sum to 1")
    return soft


def fit_logistic(
    features, targets, *, C: float = 1.0, max_iter: int = 1000, num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with sklearn's objective C * sum_i CE(W x_i + b, y_i) + |W|^2 / 2 (bias not
    penalised), where y_i is a class label or a probability row. features [n, d]; targets [n] int or [n, C] soft.

    Float64, torch's L-BFGS with a strong-Wolfe line search from zero, on the objective divided by n (the same
    minimiser). Always the C-way softmax: with two classes sklearn fits one binary weight vector instead.
    Returns (weight [C, d], bias [C]); the bias, defined up to a constant, is centred to sum to zero.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.as_tensor(features, dtype=torch.float64).clone()  # [n, d]; clone: not an inference tensor
        y = _soft_targets(targets, num_classes).clone()  # [n, C]
        if len(y) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(y)} targets")
        weight = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-11, tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            log_probabilities = torch.log_softmax(x @ weight.T + bias, dim=1)  # [n, C]
            loss = (C * -(y * log_probabilities).sum() + 0.5 * weight.square().sum()) / len(x)
            loss.backward()
            return loss

        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return weight, bias - bias.mean()


def predict_logistic(weight: torch.Tensor, bias: torch.Tensor, features) -> torch.Tensor:
    """Class labels [n] of features [n, d] under (weight [C, d], bias [C])."""
    x = torch.as_tensor(features, dtype=torch.float64)
    return (x @ weight.double().T + bias.double()).argmax(dim=1)


# ---------------------------------------------------------------------------------------------- MixUp and CutMix


@dataclass(frozen=True)
class MixDraw:
    """What `mixup` and `cutmix` draw, in this order from the generator: `first` (every image once per round, each
    round a fresh permutation), `lam` ~ Beta(alpha, alpha), `second` (uniform among images of another class, or
    among the other images when all share one class), `centre` (the CutMix box centre as a fraction of H, W)."""

    first: np.ndarray  # [count] index of the image weighted by lam
    second: np.ndarray  # [count] index of its partner, weighted 1 - lam
    lam: np.ndarray  # [count] float64
    centre: np.ndarray  # [count, 2] (row, column) in [0, 1)


def draw_mix(labels, *, count: int, generator: np.random.Generator, alpha: float = MIX_ALPHA) -> MixDraw:
    """Pairs, weights and box centres for `count` mixed images of the images with labels [n]."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0 or count < 0:
        raise ValueError(f"mixing needs at least one image and count >= 0 (got {n} images, count {count})")
    rounds = math.ceil(count / n)
    first = np.concatenate([generator.permutation(n) for _ in range(rounds)] or [np.zeros(0, int)])[:count]
    lam = generator.beta(alpha, alpha, size=count)
    indices = np.arange(n)
    second = np.empty(count, dtype=np.int64)
    for j, a in enumerate(first):
        partners = indices[labels != labels[a]]
        if len(partners) == 0:
            partners = indices[indices != a] if n > 1 else indices
        second[j] = partners[generator.integers(len(partners))]
    centre = generator.random((count, 2))
    return MixDraw(first=first.astype(np.int64), second=second, lam=lam, centre=centre)


def _mixed_labels(labels: torch.Tensor, num_classes: int, draw: MixDraw, weight: np.ndarray) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).float()  # [n, C]
    weight = torch.as_tensor(weight, dtype=torch.float32, device=labels.device)[:, None]  # [count, 1]
    return weight * one_hot[draw.first] + (1 - weight) * one_hot[draw.second]  # [count, C]


def mixup(
    images: torch.Tensor, labels, num_classes: int, *, count: int, generator: np.random.Generator,
    alpha: float = MIX_ALPHA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: lam * a + (1 - lam) * b of pairs of float images [n, 3, H, W] with labels [n] (pairs: `draw_mix`).
    Returns (images [count, 3, H, W], soft labels [count, num_classes] float32)."""
    if not images.is_floating_point():
        raise ValueError(f"mixup needs float images, got {images.dtype}")
    labels = torch.as_tensor(labels)
    draw = draw_mix(labels.cpu().numpy(), count=count, generator=generator, alpha=alpha)
    lam = torch.as_tensor(draw.lam, dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)  # [count, 1, 1, 1]
    mixed = lam * images[draw.first] + (1 - lam) * images[draw.second]
    return mixed, _mixed_labels(labels, num_classes, draw, draw.lam)


def cutmix_box(lam: float, centre: tuple[float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the CutMix box, as the CutMix paper's code: side sqrt(1 - lam) of H and W,
    half of it each side of the centre pixel, clipped at the borders."""
    side = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * side) // 2, int(width * side) // 2
    row, column = int(centre[0] * height), int(centre[1] * width)
    return (min(max(row - half_h, 0), height), min(max(row + half_h, 0), height),
            min(max(column - half_w, 0), width), min(max(column + half_w, 0), width))


def cutmix(
    images: torch.Tensor, labels, num_classes: int, *, count: int, generator: np.random.Generator,
    alpha: float = MIX_ALPHA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: image a with the box `cutmix_box` of nominal area (1 - lam) pasted from b (pairs: `draw_mix`).
    The label weight of a is 1 - (clipped box area) / (H * W), the fraction of pixels a keeps.
    images [n, 3, H, W], labels [n]; returns (images [count, 3, H, W], soft labels [count, num_classes] float32)."""
    labels = torch.as_tensor(labels)
    draw = draw_mix(labels.cpu().numpy(), count=count, generator=generator, alpha=alpha)
    height, width = images.shape[-2:]
    mixed = images[draw.first].clone()
    kept = np.empty(count)
    for j in range(count):
        top, bottom, left, right = cutmix_box(float(draw.lam[j]), tuple(draw.centre[j]), height, width)
        mixed[j, :, top:bottom, left:right] = images[draw.second[j], :, top:bottom, left:right]
        kept[j] = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, _mixed_labels(labels, num_classes, draw, kept)


# ---------------------------------------------------------------------------------------------- summaries


def mean_ci(values) -> tuple[float, float]:
    """(mean, 95% CI half-width 1.96 * std / sqrt(n)) with the population std (ddof=0), as the paper's code."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) == 0:
        raise ValueError("mean_ci needs at least one value")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(len(values)))


def zipf_counts(num_classes: int, *, largest: int, smallest: int = 1, exponent: float | None = None) -> list[int]:
    """Training images per class, count_i = round(largest / (i + 1)^a), never below `smallest`; a = `exponent`,
    or when None the one that makes the last class's count `smallest`: a = log(largest / smallest) / log(N)."""
    if num_classes < 1 or not 1 <= smallest <= largest:
        raise ValueError(f"need num_classes >= 1 and 1 <= smallest <= largest, got {num_classes}, {smallest}, "
                         f"{largest}")
    if exponent is None:
        exponent = math.log(largest / smallest) / math.log(num_classes) if num_classes > 1 else 0.0
    return [max(smallest, math.floor(largest / (i + 1) ** exponent + 0.5)) for i in range(num_classes)]


def tail_groups(counts: Sequence[int], *, many: int = 20, few: int = 5) -> list[str]:
    """"many" (count >= many), "few" (count <= few) or "medium" per class. The defaults suit few-image long
    tails; ImageNet-LT's groups (> 100, 20-100, < 20) are many=101, few=19."""
    if few >= many:
        raise ValueError(f"the few-shot threshold ({few}) must be below the many-shot one ({many})")
    return ["many" if c >= many else "few" if c <= few else "medium" for c in counts]


def group_accuracy(predictions, labels, groups: Sequence[str]) -> dict[str, float]:
    """Top-1 accuracy over the samples whose class is in each group, and over all: {"many", "medium", "few",
    "all"}; predictions, labels [n]; groups[c] is class c's group. A group with no samples is left out."""
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many predictions as labels, at least one ({len(predictions)} vs {len(labels)})")
    correct = predictions == labels
    sample_groups = np.asarray(groups)[labels]  # [n]
    result = {g: float(correct[sample_groups == g].mean()) for g in ("many", "medium", "few")
              if (sample_groups == g).any()}
    result["all"] = float(correct.mean())
    return result


# ---------------------------------------------------------------------------------------------- label check


def flip_curve(
    ratios: Sequence[float], predictions: Mapping[float, np.ndarray] | Sequence[np.ndarray], source_labels,
    target_labels,
) -> dict[float, dict[str, float]]:
    """{r: {"target", "source", "other"}}: the fraction of the edits made at ratio r that a classifier assigns to
    their target class, their source class, or neither. predictions[r] (a mapping by ratio, or a sequence in the
    order of `ratios`) is [n, C] probabilities or logits (argmax taken) or [n] labels; source/target labels [n]."""
    source, target = np.asarray(source_labels).ravel(), np.asarray(target_labels).ravel()
    if len(source) != len(target) or (source == target).any():
        raise ValueError("source and target labels must have one entry per edit, and differ in each")
    if not isinstance(predictions, Mapping):
        if len(predictions) != len(ratios):
            raise ValueError(f"{len(ratios)} ratios but {len(predictions)} prediction arrays")
        predictions = dict(zip(ratios, predictions))
    curve = {}
    for ratio in sorted(ratios):
        if ratio not in predictions:
            raise ValueError(f"no predictions for ratio {ratio}")
        predicted = np.asarray(predictions[ratio])
        predicted = predicted.argmax(axis=1) if predicted.ndim == 2 else predicted.ravel()
        if len(predicted) != len(target):
            raise ValueError(f"ratio {ratio}: {len(predicted)} predictions for {len(target)} edits")
        to_target, to_source = float((predicted == target).mean()), float((predicted == source).mean())
        curve[float(ratio)] = {"target": to_target, "source": to_source, "other": 1.0 - to_target - to_source}
    return curve


def flip_point(curve: Mapping[float, Mapping[str, float]]) -> float | None:
    """The smallest ratio whose target fraction is at least its source fraction; None if there is none."""
    return next((r for r in sorted(curve) if curve[r]["target"] >= curve[r]["source"]), None)


def plot_flip_curve(curve: Mapping[float, Mapping[str, float]], path: str | Path, *,
                    title: str = "label check: classifier's class of the edits") -> Path:
    """Target and source fractions against the noise ratio, the flip point dashed, as a PNG at `path`."""
    ratios = sorted(curve)
    figure = Figure(figsize=(5.0, 3.0))
    ax = figure.add_subplot(1, 1, 1)
    for color, key in ((PALETTE[0], "target"), (PALETTE[1], "source")):
        ax.plot(ratios, [curve[r][key] for r in ratios], marker="o", markersize=3, linewidth=1.6, color=color,
                label=f"{key} class")
    flip = flip_point(curve)
    if flip is not None:
        ax.axvline(flip, color="#9ca3af", linestyle="--", linewidth=1, label=f"flip at r = {flip:g}")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("noise ratio r", fontsize=8)
    ax.set_ylabel("fraction of edits", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path
