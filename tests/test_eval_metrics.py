"""Evaluation metrics against answers known analytically: a stub model with hand-made embeddings (the
big_vision retrieval_test idea), closed-form protocol pieces, and bad input that must fail loudly."""

from __future__ import annotations

import json
import math
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from clipforge.config import EvalConfig
from clipforge.errors import ClipforgeError, DataError
from clipforge.eval import EvalDataset, run_suite
from clipforge.eval.fewshot import evaluate_fewshot, mean_and_ci95, sample_episodes
from clipforge.eval.linear_probe import C_GRID, linear_probe, stratified_split, sweep_C
from clipforge.eval.results import read_results
from clipforge.eval.retrieval import flatten_captions, retrieval_metrics
from clipforge.eval.robustness import clipped_logit, effective_robustness, fit_logit_trend, sigmoid
from clipforge.eval.templates import load_classnames, load_templates, render
from clipforge.eval.zeroshot import classification_metrics, classifier_from_prompt_features

# ----------------------------------------------------------------------------------------------------------
# A stub "model": images and texts are ids; embeddings are looked up in hand-made tables.


class StubModel(torch.nn.Module):
    def __init__(self, image_embeddings: torch.Tensor, text_embeddings: dict[str, torch.Tensor]):
        super().__init__()
        self.image_table = image_embeddings  # [N, D]
        self.text_table = text_embeddings
        self.texts: list[str] = []
        self.image_calls = 0
        self.images_seen = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so the model has a device

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, 1]
        self.image_calls += 1
        self.images_seen += ids.shape[0]
        return self.image_table[ids[:, 0]] * 3.0  # unnormalised on purpose: the harness must normalise

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, 1]
        return torch.stack([self.text_table[self.texts[i]] for i in ids[:, 0].tolist()]) * 2.0


def stub_preprocess(image_id: int) -> torch.Tensor:
    return torch.tensor([image_id])


def stub_tokenizer(model: StubModel):
    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = []
        for text in texts:
            model.texts.append(text)
            ids.append(len(model.texts) - 1)
        return torch.tensor(ids)[:, None]
    return tokenize


def one_hot(index: int, dim: int) -> torch.Tensor:
    vector = torch.zeros(dim)
    vector[index] = 1.0
    return vector


def ranked_embedding(order: list[int], dim: int) -> torch.Tensor:
    """A vector whose dot products with the basis vectors rank `order` first..last, with no ties."""
    vector = torch.zeros(dim)
    for position, index in enumerate(order):
        vector[index] = dim - position
    return F.normalize(vector, dim=0)


def placed(first: int, rank: int, others: list[int]) -> list[int]:
    """`others` in order, with `first` inserted at 1-based `rank`."""
    rest = [o for o in others if o != first]
    return rest[: rank - 1] + [first] + rest[rank - 1:]


# ----------------------------------------------------------------------------------------------------------
# Retrieval


def test_text_to_image_recall_matches_designed_ranks():
    # 20 images (one-hot), 2 captions each; caption t's own image is put at a chosen rank among all images
    num_images, dim = 20, 20
    rng = np.random.default_rng(0)
    ranks = [1] * 24 + [2] * 4 + [5] * 4 + [8] * 4 + [15] * 4  # 40 captions
    rng.shuffle(ranks)
    image_features = torch.eye(num_images)
    captions, text_features = [[] for _ in range(num_images)], []
    for t, rank in enumerate(ranks):
        owner = t // 2
        captions[owner].append(f"caption {t}")
        others = rng.permutation(num_images).tolist()
        text_features.append(ranked_embedding(placed(owner, rank, others), dim))
    texts, index = flatten_captions(captions)
    metrics = retrieval_metrics(image_features, torch.stack(text_features), index, recall_k=(1, 5, 10))
    assert texts[0] == "caption 0"
    assert metrics["image_retrieval_recall@1"] == pytest.approx(24 / 40)  # exactly 0.6
    assert metrics["image_retrieval_recall@5"] == pytest.approx(32 / 40)  # ranks 1, 2, 5
    assert metrics["image_retrieval_recall@10"] == pytest.approx(36 / 40)  # rank 15 misses top-10


def test_image_to_text_recall_counts_any_caption_of_the_image():
    # 10 images x 3 captions (one-hot); each image ranks its best caption at a chosen rank among all 30
    num_images, per_image = 10, 3
    num_texts = num_images * per_image
    best_rank = [1, 1, 1, 1, 3, 3, 6, 6, 11, 20]  # hit@1: 4/10, @5: 6/10, @10: 8/10
    captions = [[f"image {i} caption {j}" for j in range(per_image)] for i in range(num_images)]
    _, index = flatten_captions(captions)
    text_features = torch.eye(num_texts)
    image_features = []
    rng = np.random.default_rng(1)
    for image, rank in enumerate(best_rank):
        own = [t for t in range(num_texts) if index[t] == image]
        # other images' captions first, then the image's own captions from position `rank` on
        others = [t for t in rng.permutation(num_texts).tolist() if t not in own]
        image_features.append(ranked_embedding(others[: rank - 1] + own + others[rank - 1:], num_texts))
    metrics = retrieval_metrics(torch.stack(image_features), text_features, index, recall_k=(1, 5, 10))
    ranks_found = []
    for image, vector in enumerate(image_features):
        scores = text_features @ vector
        ordered = scores.argsort(descending=True).tolist()
        ranks_found.append(min(ordered.index(t) for t in range(num_texts) if index[t] == image) + 1)
    hits = {k: np.mean([r <= k for r in ranks_found]) for k in (1, 5, 10)}
    assert hits[1] == pytest.approx(0.4) and hits[5] == pytest.approx(0.6) and hits[10] == pytest.approx(0.8)
    for k in (1, 5, 10):
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(hits[k])


def test_retrieval_without_captions_is_an_error():
    with pytest.raises(DataError, match="no image has one"):
        flatten_captions([[], []], "pets")


def test_images_without_captions_are_not_i2t_queries_and_warn():
    image_features = torch.eye(3)
    text_features = torch.eye(3)[:2]  # images 0 and 1 have a caption each, image 2 none
    with pytest.warns(UserWarning, match="1 of 3 images have no caption"):
        metrics = retrieval_metrics(image_features, text_features, torch.tensor([0, 1]), recall_k=(1,))
    assert metrics["text_retrieval_recall@1"] == 1.0  # 2 queries, both hits (not 2/3)


# ----------------------------------------------------------------------------------------------------------
# Zero-shot


def test_template_ensemble_normalises_each_prompt_then_the_mean():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    prompts = torch.stack([a, b, b, a])  # class 0: (a, b); class 1: (b, a) -- unnormalised input
    weights = classifier_from_prompt_features(F.normalize(prompts, dim=-1), num_classes=2)  # [D, C]
    expected = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)  # not (3, 1, 0): each prompt counts once
    assert torch.allclose(weights[:, 0], expected) and torch.allclose(weights[:, 1], expected)


def test_classification_metrics_analytic_and_balanced_accuracy():
    # 6 classes, unbalanced: class 0 has 6 images, others 2; logits designed per image so that plain accuracy
    # (9/16) and mean per-class recall (19/36) differ
    labels = torch.tensor([0] * 6 + [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    logits = torch.zeros(len(labels), 6)
    ranks = [1, 1, 1, 1, 6, 6, 1, 3, 1, 1, 5, 6, 2, 1, 1, 4]  # rank of the true class per image
    for i, (label, rank) in enumerate(zip(labels.tolist(), ranks)):
        order = placed(label, rank, [c for c in range(6)])
        for position, c in enumerate(order):
            logits[i, c] = 10.0 - position
    metrics, details = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(9 / 16)
    assert metrics["acc5"] == pytest.approx(13 / 16)
    recall = [4 / 6, 1 / 2, 2 / 2, 0 / 2, 1 / 2, 1 / 2]
    assert metrics["mean_per_class_recall"] == pytest.approx(19 / 36) == pytest.approx(np.mean(recall))
    assert abs(metrics["mean_per_class_recall"] - metrics["acc1"]) > 0.03  # the data can tell the two apart
    assert metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy()))
    assert np.array(details["confusion_matrix"]).sum() == 16
    assert np.trace(np.array(details["confusion_matrix"])) == 9


def test_acc5_is_nan_below_five_classes_and_empty_classes_warn():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])  # class 3 has no images
    with pytest.warns(UserWarning, match="1 of 4 classes have no images"):
        metrics, details = classification_metrics(logits, labels, ["a", "b", "c", "d"])
    assert math.isnan(metrics["acc5"])
    assert metrics["mean_per_class_recall"] == pytest.approx(2 / 3)  # over the 3 classes with images
    assert details["per_class_recall"][3] is None


def test_zeroshot_suite_on_stub_model_is_exact_and_encodes_each_image_once(tmp_path):
    # 3 classes; class weight = e_c (all templates map to e_c + tilt); image i = e_{predicted class}
    dim, classnames, templates = 3, ["cat", "dog", "fox"], ["a {}.", "a photo of a {}."]
    text_table = {}
    for c, name in enumerate(classnames):
        tilt = one_hot((c + 1) % dim, dim) * 0.1
        text_table[render(templates[0], name)] = one_hot(c, dim) + tilt
        text_table[render(templates[1], name)] = one_hot(c, dim) - tilt
    predicted = [0, 0, 1, 2, 2, 2, 1, 0]
    labels = [0, 0, 1, 1, 2, 2, 2, 2]  # correct: 0,1,2,4,5 -> 5/8
    captions = [[f"img {i}"] for i in range(8)]
    for i, p in enumerate(predicted):
        text_table[f"img {i}"] = one_hot(p, dim) + 0.01 * i  # distinct, so no exact ties
    model = StubModel(torch.stack([one_hot(p, dim) + 0.001 * i for i, p in enumerate(predicted)]), text_table)
    dataset = EvalDataset(name="stub", images=list(range(8)), labels=labels, classnames=classnames,
                          captions=captions)
    config = EvalConfig(tasks=["zeroshot", "retrieval", "fewshot"], batch_size=3, fewshot_ways=2,
                        fewshot_shots=[1], fewshot_episodes=4)
    summary = run_suite(model, stub_preprocess, stub_tokenizer(model), config, dataset, tmp_path,
                        model_name="stub", templates=templates, fewshot_queries=1)
    metrics = {r["clipforge_task"]: r["metrics"] for r in summary["results"]}
    assert metrics["zeroshot"]["acc1"] == pytest.approx(5 / 8)
    assert math.isnan(metrics["zeroshot"]["acc5"])
    assert metrics["zeroshot"]["mean_per_class_recall"] == pytest.approx((2 / 2 + 1 / 2 + 2 / 4) / 3)
    assert model.images_seen == 8 and model.image_calls == 3  # one pass (3 batches) for three tasks
    written = {r["clipforge_task"]: r for r in read_results(tmp_path / "eval")}
    assert set(written) == {"zeroshot", "retrieval", "fewshot"}
    assert math.isnan(written["zeroshot"]["metrics"]["acc5"])  # null on disk, NaN when read back
    raw = json.loads((tmp_path / "eval" / "stub__stub__zeroshot.json").read_text())
    assert raw["metrics"]["acc5"] is None and raw["task"] == "zeroshot_classification"
    assert raw["templates"] == templates and raw["classnames"] == classnames


def test_suite_skips_with_reasons_and_is_strict_on_request():
    model = StubModel(torch.eye(2), {})
    dataset = EvalDataset(name="nocaps", images=[0, 1], labels=[0, 1], classnames=["a", "b"])
    config = EvalConfig(tasks=["retrieval"])
    with pytest.raises(DataError, match="task 'retrieval' cannot run on any dataset .*needs captions"):
        run_suite(model, stub_preprocess, stub_tokenizer(model), config, dataset, strict=True)
    with pytest.warns(UserWarning, match="cannot run"):
        summary = run_suite(model, stub_preprocess, stub_tokenizer(model), config, dataset)
    assert summary["results"] == [] and summary["skipped"][0]["dataset"] == "nocaps"


# ----------------------------------------------------------------------------------------------------------
# Templates and class names


def test_bundled_templates_and_bad_template_files(tmp_path):
    assert len(load_templates("openai_imagenet")) == 80
    assert all("{}" in t for t in load_templates("synthscenes"))
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(DataError, match="template 2 'a photo' has no"):
        load_templates(bad)
    with pytest.raises(DataError, match="unknown template set"):
        load_templates("openai")


def test_classname_file_errors_name_the_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\nCat\n")
    with pytest.raises(DataError, match=r"classes.txt:3: class name 'Cat' duplicates line 1"):
        load_classnames(path)
    path.write_text("cat\n\ndog\n")
    with pytest.raises(DataError, match=r"classes.txt:2: empty class name"):
        load_classnames(path)
    path.write_text("cat\ndog\n\n")
    assert load_classnames(path) == ["cat", "dog"]
    with pytest.raises(DataError, match="appears twice"):
        EvalDataset(name="d", images=[0, 1], labels=[0, 1], classnames=["a", "a"])


# ----------------------------------------------------------------------------------------------------------
# Linear probe


def test_probe_binary_search_finds_the_peak_of_a_unimodal_curve(monkeypatch):
    from clipforge.eval import linear_probe as lp

    peak = 37  # C = 10 ** (-6 + 37 / 8)
    monkeypatch.setattr(lp, "fit_logistic", lambda x, y, C: C)
    monkeypatch.setattr(lp, "accuracy", lambda C, x, y: 1.0 - abs(np.log10(C) - np.log10(C_GRID[peak])) / 20)
    best, visited = sweep_C(None, None, None, None)
    assert best == peak
    assert len(visited) <= 7 + 8  # the coarse grid plus two new points per halving
    assert {0, 16, 32, 48, 64, 80, 96} <= set(visited)


def test_probe_on_separable_features_is_perfect_and_reports_C():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 16), dim=-1)
    train_labels = torch.arange(4).repeat(10)
    test_labels = torch.arange(4).repeat(5)
    train = F.normalize(centers[train_labels] + 0.05 * torch.randn(40, 16), dim=-1)
    test = F.normalize(centers[test_labels] + 0.05 * torch.randn(20, 16), dim=-1)
    result = linear_probe(train, train_labels, test, test_labels, num_classes=4)
    assert result.metrics["lp_acc1"] == 1.0 and math.isnan(result.metrics["lp_acc5"])
    assert result.metrics["C"] in C_GRID and result.metrics["lp_val_acc1"] == 1.0
    chosen = [s for s in result.details["sweep"] if s["C"] == result.metrics["C"]][0]
    assert chosen["val_acc1"] == max(s["val_acc1"] for s in result.details["sweep"])
    # ties go to the smaller C: no visited C below the chosen one reaches the same accuracy
    assert all(s["val_acc1"] < chosen["val_acc1"] for s in result.details["sweep"] if s["C"] < chosen["C"])


def test_stratified_split_is_disjoint_covering_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(16))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert torch.equal(val, stratified_split(labels, 0.2, seed=3)[1])


# ----------------------------------------------------------------------------------------------------------
# Few-shot


def test_episodes_never_share_images_and_are_seeded():
    labels = torch.arange(8).repeat_interleave(12)
    episodes = sample_episodes(labels, ways=5, shots=5, queries=6, episodes=30, seed=7)
    for episode in episodes:
        assert set(episode.support.tolist()).isdisjoint(episode.query.tolist())
        assert len(set(episode.support.tolist())) == 25 and len(set(episode.query.tolist())) == 30
        assert labels[episode.support].tolist() == [c for c in episode.classes for _ in range(5)]
        assert labels[episode.query].tolist() == [c for c in episode.classes for _ in range(6)]
    again = sample_episodes(labels, ways=5, shots=5, queries=6, episodes=30, seed=7)
    assert all(torch.equal(a.support, b.support) and torch.equal(a.query, b.query) for a, b in zip(episodes, again))
    other = sample_episodes(labels, ways=5, shots=5, queries=6, episodes=30, seed=8)
    assert any(not torch.equal(a.support, b.support) for a, b in zip(episodes, other))


def test_fewshot_ci_and_perfect_features():
    mean, ci = mean_and_ci95([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and ci == pytest.approx(1.96 * 0.2 / math.sqrt(3))
    labels = torch.arange(6).repeat_interleave(20)
    features = torch.eye(6)[labels]  # each class its own direction: every episode is perfect
    result = evaluate_fewshot(features, labels, ways=5, shots=1, episodes=10, queries=5)
    assert result["acc1"] == 1.0 and result["ci95"] == 0.0
    with pytest.raises(DataError, match="needs 5 classes"):
        sample_episodes(torch.arange(4).repeat(30), ways=5, shots=1, episodes=1)


# ----------------------------------------------------------------------------------------------------------
# Robustness


def test_logit_trend_and_effective_robustness_are_exact():
    n = 10_000
    slope, intercept = 0.8, -0.5
    ids = [0.2, 0.4, 0.6, 0.8]
    oods = [sigmoid(slope * clipped_logit(a, n) + intercept) for a in ids]
    fit = fit_logit_trend(ids, oods, n)
    assert fit == pytest.approx((slope, intercept), abs=1e-9)
    on_trend = sigmoid(slope * clipped_logit(0.7, n) + intercept)
    assert effective_robustness(0.7, on_trend, *fit, n) == pytest.approx(0.0, abs=1e-12)
    assert effective_robustness(0.7, on_trend + 0.05, *fit, n) == pytest.approx(0.05, abs=1e-12)
    assert fit_logit_trend([0.5, 0.5], [0.25, 0.25], n) == pytest.approx((1.0, clipped_logit(0.25, n)))


def test_robustness_identity_shift_has_zero_effective_robustness_and_a_real_shift_is_measured():
    from clipforge.eval.linear_probe import fit_logistic
    from clipforge.eval.robustness import evaluate_robustness

    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.arange(4).repeat(25)
    original = F.normalize(centers[labels] + 0.4 * torch.randn(100, 8), dim=-1)
    family = [fit_logistic(original, labels, C) for C in (1e-2, 1.0, 1e2)]
    zeroshot = centers.T  # [D, C]: the class centres as zero-shot weights
    shifted = F.normalize(original + 0.8 * torch.randn(100, 8), dim=-1)
    metrics, details = evaluate_robustness(original, labels, {"same": original.clone(), "noisy": shifted},
                                           zeroshot, family[-1], family[:-1])
    assert metrics["acc1@same"] == metrics["acc1@original"]
    assert details["variants"]["same"]["trend_slope"] == pytest.approx(1.0)
    assert details["variants"]["same"]["trend_intercept"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["effective_robustness@same"] == pytest.approx(0.0, abs=1e-9)
    noisy = details["variants"]["noisy"]
    expected = metrics["acc1@noisy"] - sigmoid(noisy["trend_slope"] * clipped_logit(metrics["acc1@original"], 100)
                                               + noisy["trend_intercept"])
    assert metrics["effective_robustness@noisy"] == pytest.approx(expected)
    assert metrics["baseline_acc1@noisy"] < metrics["baseline_acc1@original"]
    assert metrics["effective_robustness"] == pytest.approx(metrics["effective_robustness@noisy"] / 2)


# ----------------------------------------------------------------------------------------------------------
# File datasets


def _png(path, color):
    Image.new("RGB", (8, 8), color).save(path)


def test_image_folder_train_test_maps_labels_by_class_name(tmp_path):
    from clipforge.eval.file_datasets import image_folder_dataset

    for split, classes in (("train", ["ant", "bee", "cat"]), ("test", ["bee", "cat"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                _png(tmp_path / split / name / f"{i}.png", (i, 0, 0))
    dataset = image_folder_dataset(tmp_path)
    assert dataset.classnames == ["ant", "bee", "cat"]
    assert dataset.labels == [1, 1, 2, 2]  # 'bee' is label 1 even though test/ has no 'ant' folder
    assert dataset.train.labels == [0, 0, 1, 1, 2, 2]
    (tmp_path / "test" / "dog").mkdir()
    _png(tmp_path / "test" / "dog" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match="'dog' is not among the training classes"):
        image_folder_dataset(tmp_path)


def test_csv_groups_captions_per_image(tmp_path):
    from clipforge.eval.file_datasets import csv_dataset

    for name in ("a.png", "b.png"):
        _png(tmp_path / name, (1, 2, 3))
    (tmp_path / "pairs.csv").write_text("filepath,caption\na.png,one\nb.png,two\na.png,three\n")
    dataset = csv_dataset(tmp_path / "pairs.csv")
    assert dataset.captions == [["one", "three"], ["two"]] and dataset.labels is None


def test_webdataset_shards_with_cls_and_classnames(tmp_path):
    import io

    from clipforge.eval.file_datasets import webdataset_dataset

    (tmp_path / "test").mkdir()
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as archive:
        for i in range(4):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(image, format="PNG")
            for ext, data in (("png", image.getvalue()), ("cls", str(i % 2).encode()),
                              ("txt", f"first {i}\nsecond {i}".encode())):
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (tmp_path / "classnames.txt").write_text("zero\none\n")
    dataset = webdataset_dataset(str(tmp_path))
    assert dataset.labels == [0, 1, 0, 1] and dataset.classnames == ["zero", "one"]
    assert dataset.captions[2] == ["first 2", "second 2"]
    assert dataset.images[3].getpixel((0, 0)) == (3, 0, 0)


def test_errors_are_one_line_clipforge_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ClipforgeError) as info:
            EvalDataset(name="d", images=[0, 1], labels=[0, 5], classnames=["a", "b"])
    assert "\n" not in str(info.value) and "label 5" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# The command line: bad input is one line and exit status 2; a small run writes results and a report


def _image_folder(root, classes, per_class=4):
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", (60 * c, 40 * i, 128))


def test_cli_refuses_a_checkpoint_of_another_architecture(tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    from clipforge.cli import main

    open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")
    other = open_clip.create_model("clipforge-vit-tiny")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "tiny.safetensors")
    status = main(["eval", "--model", "clipforge-vit-micro", "--checkpoint", str(tmp_path / "tiny.safetensors"),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and error[-1].startswith("clipforge: error:") and "tiny.safetensors" in error[-1]
    assert not (tmp_path / "out" / "eval").exists()  # no numbers from a model that did not load


def test_cli_classname_file_with_duplicates_is_refused(tmp_path, capsys):
    from clipforge.cli import main

    _image_folder(tmp_path / "data", ["ant", "bee"])
    (tmp_path / "names.txt").write_text("ant\nant\n")
    status = main(["eval", "--model", "clipforge-vit-micro", "--dataset", str(tmp_path / "data"),
                   "--classnames", str(tmp_path / "names.txt"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 2
    assert "names.txt:2: class name 'ant' duplicates line 1" in capsys.readouterr().err


def test_cli_eval_on_image_folder_writes_results_and_report(tmp_path, capsys):
    from clipforge.cli import main

    _image_folder(tmp_path / "data", ["ant", "bee", "cat"], per_class=5)
    out = tmp_path / "out"
    status = main(["eval", "--model", "clipforge-vit-micro", "--dataset", str(tmp_path / "data"),
                   "--tasks", "zeroshot", "linear_probe", "fewshot", "--ways", "3", "--shots", "1", "2",
                   "--episodes", "5", "--templates", "openai_imagenet", "--out", str(out), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    records = {r["clipforge_task"]: r for r in read_results(out / "eval")}
    assert set(records) == {"zeroshot", "linear_probe", "fewshot"}
    assert records["zeroshot"]["classnames"] == ["ant", "bee", "cat"] and len(records["zeroshot"]["templates"]) == 80
    assert records["linear_probe"]["data"]["num_train"] == 15
    assert (out / "report.html").is_file()
    status = main(["eval", "--model", "clipforge-vit-micro", "--dataset", str(tmp_path / "data"),
                   "--tasks", "retrieval", "--out", str(out), "--no-progress", "--no-report"])
    assert status == 2 and "needs captions" in capsys.readouterr().err
