"""GeNIe's protocols (augment/protocols.py): disjoint seeded episodes, the augmentation budgets, soft-label logistic
regression against sklearn, MixUp / CutMix against their definitions, and the summaries on hand-made answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from clipforge.augment.protocols import (
    Episode,
    cutmix,
    cutmix_box,
    draw_mix,
    fit_logistic,
    flip_curve,
    flip_point,
    genie_pairs,
    group_accuracy,
    img2img_pairs,
    mean_ci,
    mixup,
    plot_flip_curve,
    predict_logistic,
    sample_episodes,
    tail_groups,
    zipf_counts,
)

# ---------------------------------------------------------------------------------------------- episodes

POOLS = {c: list(range(100 * c, 100 * c + 30)) for c in range(10)}  # class c owns ids 100c .. 100c + 29


def test_episodes_are_disjoint_seeded_and_drawn_from_their_class():
    episodes = sample_episodes(POOLS, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=0)
    assert len(episodes) == 20
    for episode in episodes:
        assert list(episode.classes) == sorted(set(episode.classes)) and len(episode.classes) == 5
        for c, shots, queries in zip(episode.classes, episode.support, episode.query):
            assert len(shots) == 3 and len(queries) == 4
            assert set(shots) | set(queries) <= set(POOLS[c])
            assert len(set(shots) | set(queries)) == 7  # no id twice, support and query disjoint
    assert sample_episodes(POOLS, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=0) == episodes
    assert sample_episodes(POOLS, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=1) != episodes
    classes_seen = {c for e in episodes for c in e.classes}
    assert len(classes_seen) == 10  # 20 draws of 5 among 10: every class turns up


def test_a_pool_of_exactly_k_plus_q_is_split_between_support_and_query():
    # two independent permutations (the official sampler) would repeat ids here; a disjoint split cannot
    pools = [list(range(10 * c, 10 * c + 5)) for c in range(3)]  # a Sequence: class c = position c
    for episode in sample_episodes(pools, n_way=3, k_shot=2, n_query=3, num_episodes=10, seed=4):
        for c, shots, queries in zip(episode.classes, episode.support, episode.query):
            assert sorted(shots + queries) == pools[c]


def test_queries_come_from_the_query_pool_and_never_repeat_a_support_image():
    support_pool = {c: list(range(10 * c, 10 * c + 6)) for c in range(4)}
    query_pool = {c: support_pool[c][:3] + list(range(1000 + 10 * c, 1000 + 10 * c + 4)) for c in range(4)}
    episodes = sample_episodes(support_pool, query_pool=query_pool, n_way=4, k_shot=3, n_query=4,
                               num_episodes=30, seed=2)
    shared_in_query = 0
    for episode in episodes:
        for c, shots, queries in zip(episode.classes, episode.support, episode.query):
            assert set(shots) <= set(support_pool[c]) and set(queries) <= set(query_pool[c])
            assert not set(shots) & set(queries)
            shared_in_query += len(set(queries) & set(support_pool[c]))
    assert shared_in_query > 0  # a support-pool id not chosen as support may still be a query


def test_labelled_is_way_major():
    episode = Episode(classes=(3, 7), support=((1, 2), (5, 6)), query=((9,), (8,)))
    assert episode.labelled("support") == ([1, 2, 5, 6], [0, 0, 1, 1])
    assert episode.labelled("query") == ([9, 8], [0, 1])


@pytest.mark.parametrize("pools, query_pool, match", [
    ({0: [1, 2], 1: [3, 4, 5, 6, 7]}, None, "class 0: the support pool has 2 items, 3-shot"),
    ({0: [1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}, None, "class 0: the query pool has 4 items"),
    ({0: [1, 2, 3]}, {0: [1, 2, 3, 4]}, "2-way episodes need 2 classes"),
    ({0: [1, 2, 3], 1: [4, 5, 6]}, {0: [10, 11]}, "class 1 has a support pool but no query pool"),
    ({0: [1, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}, None, "more than once"),
])
def test_pools_too_small_are_refused_in_one_line(pools, query_pool, match):
    with pytest.raises(ValueError, match=match) as error:
        sample_episodes(pools, query_pool=query_pool, n_way=2, k_shot=3, n_query=2, num_episodes=1, seed=0)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- budgets


def test_genie_edits_every_other_class_and_img2img_keeps_the_budget():
    episode = Episode(classes=(3, 7, 9), support=((1, 2), (3, 4), (5, 6)), query=((), (), ()))
    genie = genie_pairs(episode)
    assert genie[:4] == [(3, 1, 0), (4, 1, 0), (5, 2, 0), (6, 2, 0)]
    assert len(genie) == 3 * 2 * 2  # N targets x (N - 1) * K
    for target in range(3):
        sources = sorted(item for item, source, t in genie if t == target)
        assert sources == sorted(i for w in range(3) if w != target for i in episode.support[w])
    img2img = img2img_pairs(episode)
    assert len(img2img) == len(genie)
    assert img2img[:4] == [(1, 0, 0), (2, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert all(source == target and item in episode.support[target] for item, source, target in img2img)
    assert {item: [p[0] for p in img2img].count(item) for item in range(1, 7)} == dict.fromkeys(range(1, 7), 2)


# ---------------------------------------------------------------------------------------------- logistic


def blobs(n: int = 60, dim: int = 6, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    return rng.normal(size=(classes, dim))[labels] + rng.normal(size=(n, dim)), labels


def assert_close(ours: torch.Tensor, reference: np.ndarray, rel: float = 1e-4) -> None:
    assert np.abs(ours.numpy() - reference).max() <= rel * np.abs(reference).max()


def test_fit_logistic_matches_sklearn_on_hard_labels():
    x, y = blobs()
    weight, bias = fit_logistic(x, y, C=1.0)
    # sklearn stops at a gradient of 1e-4 by default (its coefficients then differ from the optimum by ~5e-4);
    # a tight tol gives the true minimiser of the same objective
    reference = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, tol=1e-10).fit(x, y)
    assert weight.shape == (4, 6) and bias.shape == (4,)
    assert_close(weight, reference.coef_)
    assert_close(bias, reference.intercept_ - reference.intercept_.mean())
    default = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(x, y)
    probe = np.random.default_rng(9).normal(size=(200, 6)) * 2
    assert (predict_logistic(weight, bias, probe).numpy() == default.predict(probe)).mean() >= 0.99
    assert (predict_logistic(weight, bias, x).numpy() == reference.predict(x)).all()
    strong, _ = fit_logistic(x, y, C=100.0)
    assert strong.norm() > 2 * weight.norm()  # C is the inverse penalty


def test_one_hot_soft_labels_equal_hard_labels_even_under_inference_mode():
    x, y = blobs(seed=1)
    hard = fit_logistic(x, y)
    with torch.inference_mode():
        soft = fit_logistic(torch.from_numpy(x), torch.nn.functional.one_hot(torch.from_numpy(y)).float())
    for a, b in zip(hard, soft):
        assert torch.allclose(a, b, atol=1e-7)


def test_soft_labels_match_sklearn_with_each_class_as_a_weighted_copy():
    # CE with a soft row y is sum_c y_c CE(., c): a copy of x per class c, sample weight y_c, is the same objective
    x, _ = blobs(n=40, dim=5, classes=3, seed=2)
    soft = np.random.default_rng(3).dirichlet(np.ones(3) * 0.7, size=40)  # [40, 3]
    weight, bias = fit_logistic(x, soft, C=2.0)
    reference = LogisticRegression(C=2.0, solver="lbfgs", max_iter=1000, tol=1e-10).fit(
        np.concatenate([x] * 3), np.repeat(np.arange(3), 40), sample_weight=soft.T.ravel())
    assert_close(weight, reference.coef_)
    assert_close(bias, reference.intercept_ - reference.intercept_.mean())
    # and the optimum is stationary: C * X^T (P - Y) + W = 0, sum_i (P - Y) = 0
    residual = torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1) - torch.from_numpy(soft)
    assert (2.0 * residual.T @ torch.from_numpy(x) + weight).abs().max() < 1e-5
    assert residual.sum(dim=0).abs().max() < 1e-5


def test_fit_logistic_refuses_soft_rows_that_are_not_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        fit_logistic(np.zeros((2, 3)), np.array([[0.5, 0.6], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="integer class labels"):
        fit_logistic(np.zeros((2, 3)), np.array([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------- MixUp, CutMix

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_mixup_is_lam_a_plus_one_minus_lam_b_for_the_drawn_pairs():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    draw = draw_mix(LABELS.numpy(), count=20, generator=np.random.default_rng(5))
    mixed, soft = mixup(images, LABELS, 4, count=20, generator=np.random.default_rng(5))
    lam = torch.from_numpy(draw.lam).float().view(-1, 1, 1, 1)
    assert torch.allclose(mixed, lam * images[draw.first] + (1 - lam) * images[draw.second], atol=1e-6)
    assert (LABELS[draw.first] != LABELS[draw.second]).all()  # partners from another class
    assert sorted(np.bincount(draw.first).tolist()) == [3, 3, 3, 3, 4, 4]  # every image first in turn
    assert torch.allclose(soft.sum(dim=1), torch.ones(20))
    assert torch.allclose(soft[torch.arange(20), LABELS[draw.first]], torch.from_numpy(draw.lam).float())
    assert soft[:, 3].eq(0).all()
    again, _ = mixup(images, LABELS, 4, count=20, generator=np.random.default_rng(5))
    other, _ = mixup(images, LABELS, 4, count=20, generator=np.random.default_rng(6))
    assert torch.equal(again, mixed) and not torch.equal(other, mixed)
    assert 0.2 < draw.lam.mean() < 0.8 and ((draw.lam < 0.1) | (draw.lam > 0.9)).any()  # Beta(0.8, 0.8): U-shaped


def test_one_class_mixes_with_its_other_images():
    draw = draw_mix(np.zeros(3, int), count=9, generator=np.random.default_rng(0))
    assert (draw.first != draw.second).all()


def test_cutmix_box_follows_the_cutmix_paper():
    assert cutmix_box(0.75, (0.5, 0.5), 16, 16) == (4, 12, 4, 12)  # side sqrt(0.25) * 16 = 8 around (8, 8)
    assert cutmix_box(0.75, (0.0, 0.99), 16, 20) == (0, 4, 14, 20)  # clipped at the top and right borders
    assert cutmix_box(1.0, (0.3, 0.3), 16, 16)[:2] == (4, 4)  # lam = 1: an empty box


def test_cutmix_label_weight_is_the_pixel_fraction_taken_from_each_image():
    images = torch.stack([torch.full((3, 12, 16), float(c)) for c in (0, 1, 0, 1)])  # class 0 zeros, 1 ones
    labels = torch.tensor([0, 1, 0, 1])
    mixed, soft = cutmix(images, labels, 2, count=200, generator=np.random.default_rng(1))
    draw = draw_mix(labels.numpy(), count=200, generator=np.random.default_rng(1))
    assert torch.allclose(soft.sum(dim=1), torch.ones(200))
    assert torch.allclose(soft[:, 1], mixed.mean(dim=(1, 2, 3)), atol=1e-6)  # weight of class 1 = its pixels
    kept = soft[torch.arange(200), labels[draw.first]].double().numpy()
    assert (kept >= draw.lam - 1e-6).all()  # the clipped box is never larger than 1 - lam
    assert (kept > draw.lam + 0.05).any()  # and clipping does shrink some
    for j in range(200):
        pasted = mixed[j] != images[draw.first[j]]  # [3, 12, 16]
        assert torch.equal(pasted[0], pasted[1]) and torch.equal(pasted[0], pasted[2])
        rows, columns = pasted[0].any(dim=1), pasted[0].any(dim=0)
        assert torch.equal(pasted[0], rows[:, None] & columns[None, :])  # one rectangle
    again, _ = cutmix(images, labels, 2, count=200, generator=np.random.default_rng(1))
    assert torch.equal(again, mixed)


# ---------------------------------------------------------------------------------------------- summaries


def test_mean_ci_uses_the_population_std():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(1.96 * math.sqrt(1.25) / 2)
    assert mean_ci([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_zipf_counts():
    assert zipf_counts(5, largest=100, smallest=4) == [100, 25, 11, 6, 4]  # a = log 25 / log 5 = 2
    assert zipf_counts(4, largest=10, exponent=1.0) == [10, 5, 3, 3]  # 3.33, 2.5 round half up
    assert zipf_counts(3, largest=10, smallest=4, exponent=2.0) == [10, 4, 4]  # smallest is a floor
    assert zipf_counts(1, largest=7) == [7]
    counts = zipf_counts(50, largest=300, smallest=2)
    assert counts[0] == 300 and counts[-1] == 2 and counts == sorted(counts, reverse=True)


def test_tail_groups_and_group_accuracy():
    assert tail_groups([100, 20, 19, 6, 5, 1]) == ["many", "many", "medium", "medium", "few", "few"]
    assert tail_groups([101, 100, 20, 19], many=101, few=19) == ["many", "medium", "medium", "few"]
    with pytest.raises(ValueError):
        tail_groups([3], many=5, few=5)
    groups = ["many", "many", "medium", "few"]
    labels = [0, 0, 1, 2, 2, 3, 3, 3]
    predictions = [0, 1, 1, 2, 0, 3, 0, 0]  # many: 2 of 3 right; medium: 1 of 2; few: 1 of 3
    assert group_accuracy(predictions, labels, groups) == pytest.approx(
        {"many": 2 / 3, "medium": 0.5, "few": 1 / 3, "all": 4 / 8})
    assert group_accuracy([0, 1], [0, 0], ["many", "few"]) == {"many": 0.5, "all": 0.5}  # no few-shot samples


# ---------------------------------------------------------------------------------------------- label check

SOURCE, TARGET = [0, 0, 1, 1], [1, 2, 2, 0]
PREDICTIONS = {
    0.2: np.array(SOURCE),  # nothing flipped
    0.5: np.eye(3)[[1, 0, 2, 2]] * 0.8 + 0.05,  # probabilities: target, source, target, other
    0.8: np.array(TARGET),
}


def test_flip_curve_fractions_and_flip_point():
    curve = flip_curve([0.8, 0.2, 0.5], PREDICTIONS, SOURCE, TARGET)
    assert list(curve) == [0.2, 0.5, 0.8]
    assert curve[0.2] == {"target": 0.0, "source": 1.0, "other": 0.0}
    assert curve[0.5] == {"target": 0.5, "source": 0.25, "other": 0.25}
    assert curve[0.8] == {"target": 1.0, "source": 0.0, "other": 0.0}
    assert flip_point(curve) == 0.5
    aligned = flip_curve([0.2, 0.5, 0.8], [PREDICTIONS[r] for r in (0.2, 0.5, 0.8)], SOURCE, TARGET)
    assert aligned == curve
    assert flip_point({0.2: curve[0.2], 0.4: {"target": 0.5, "source": 0.5}}) == 0.4  # a tie is a flip
    assert flip_point({0.2: curve[0.2]}) is None
    with pytest.raises(ValueError, match="differ"):
        flip_curve([0.2], PREDICTIONS, SOURCE, SOURCE)


def test_plot_flip_curve_writes_a_png(tmp_path):
    curve = flip_curve([0.2, 0.5, 0.8], PREDICTIONS, SOURCE, TARGET)
    for name, data in (("flip.png", curve), ("never.png", {0.2: curve[0.2]})):
        path = plot_flip_curve(data, tmp_path / name, title="cat -> dog")
        with Image.open(path) as image:
            assert image.format == "PNG" and 300 < image.width < 1200 and 200 < image.height < 800
