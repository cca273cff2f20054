"""Parity with CLIP_benchmark (the `clip-benchmark` package) and with scikit-learn.

The same random-initialised open_clip model (clipforge-vit-micro, built with open_clip.create_model: no
download), the same SynthScenes images and the same preprocessing go through clip_benchmark's own functions
and through ours; zero-shot accuracy and retrieval recalls must agree exactly.

Which oracle functions run: clip_benchmark 1.6.2's `zeroshot_classification.evaluate` (which calls its own
`zero_shot_classifier` and `run_classification`, and sklearn's balanced accuracy) and
`zeroshot_retrieval.evaluate`, unchanged, except for one helper: its `accuracy` converts a 1-element array
with float(), which numpy 2.4 rejects (TypeError: only 0-dimensional arrays can be converted to Python
scalars), so the test swaps in the same top-k formula ending in .item().
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, Dataset

import clipforge.models.clip_family  # noqa: F401  (registers clipforge-vit-micro with open_clip)
from clipforge.config import EvalConfig
from clipforge.eval import EvalDataset, run_suite, synth_eval_datasets
from clipforge.eval.fewshot import fit_batched_logistic, sample_episodes

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

TEMPLATES = ["a photo of a {}.", "a {}.", "a large {}.", "a striped {}."]
BATCH = 16


def numpy2_safe_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` with `.item()` instead of float(ndarray) (numpy 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("clipforge-vit-micro")
    model.eval()
    tokenizer = open_clip.get_tokenizer("clipforge-vit-micro")
    dataset = synth_eval_datasets(num_eval=96, image_size=32, seed=0, variants=[], groups=("base",))[0]
    return model, preprocess, tokenizer, dataset


def subset(dataset: EvalDataset, classes: list[int]) -> EvalDataset:
    """Images of `classes` only, relabelled 0..len(classes)-1."""
    keep = [i for i, label in enumerate(dataset.labels) if label in classes]
    return EvalDataset(name=f"{dataset.name}-{len(classes)}", images=[dataset.images[i] for i in keep],
                       labels=[classes.index(dataset.labels[i]) for i in keep],
                       classnames=[dataset.classnames[c] for c in classes],
                       captions=[dataset.captions[i] for i in keep])


class ClassificationSet(Dataset):
    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess, self.classes = dataset, preprocess, dataset.classnames

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.preprocess(self.dataset.images[i]), self.dataset.labels[i]


class RetrievalSet(ClassificationSet):
    def __getitem__(self, i):
        return self.preprocess(self.dataset.images[i]), self.dataset.captions[i]


def image_captions_collate(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def ours(model, preprocess, tokenizer, dataset, tasks):
    config = EvalConfig(tasks=tasks, batch_size=BATCH)
    summary = run_suite(model, preprocess, tokenizer, config, dataset, templates=TEMPLATES)
    return {r["clipforge_task"]: r["metrics"] for r in summary["results"]}


@pytest.mark.parametrize("num_classes", [48, 4])
def test_zeroshot_matches_clip_benchmark(model_and_data, monkeypatch, num_classes):
    model, preprocess, tokenizer, dataset = model_and_data
    if num_classes < 48:  # the classes with the most images, so accuracy is not all-or-nothing
        counts = np.bincount(dataset.labels, minlength=48)
        dataset = subset(dataset, sorted(np.argsort(-counts, kind="stable")[:num_classes].tolist()))
    monkeypatch.setattr(zsc, "accuracy", numpy2_safe_accuracy)
    loader = DataLoader(ClassificationSet(dataset, preprocess), batch_size=BATCH)
    oracle = zsc.evaluate(model, loader, tokenizer, dataset.classnames, [t.replace("{}", "{c}") for t in TEMPLATES],
                          "cpu", amp=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 96 images leave some of 48 classes without images (tested elsewhere)
        mine = ours(model, preprocess, tokenizer, dataset, ["zeroshot"])["zeroshot"]
    assert mine["acc1"] == oracle["acc1"]
    assert mine["mean_per_class_recall"] == pytest.approx(oracle["mean_per_class_recall"], abs=1e-12)
    if num_classes >= 5:
        assert mine["acc5"] == oracle["acc5"]
    else:
        assert math.isnan(mine["acc5"]) and math.isnan(oracle["acc5"])
    assert 0 < oracle["acc5"] < 1 or num_classes < 5  # a number that can disagree, not a saturated one


def test_zeroshot_classifier_weights_match_clip_benchmark(model_and_data):
    model, _, tokenizer, dataset = model_and_data
    from clipforge.eval.zeroshot import build_zeroshot_classifier

    theirs = zsc.zero_shot_classifier(model, tokenizer, dataset.classnames,
                                      [t.replace("{}", "{c}") for t in TEMPLATES], "cpu", amp=False)
    mine = build_zeroshot_classifier(model, tokenizer, dataset.classnames, TEMPLATES)
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_retrieval_matches_clip_benchmark(model_and_data):
    model, preprocess, tokenizer, dataset = model_and_data
    assert min(len(c) for c in dataset.captions) >= 2  # several captions per image
    loader = DataLoader(RetrievalSet(dataset, preprocess), batch_size=BATCH, collate_fn=image_captions_collate)
    oracle = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    mine = ours(model, preprocess, tokenizer, dataset, ["retrieval"])["retrieval"]
    assert set(mine) == set(oracle)
    for name, value in oracle.items():
        assert mine[name] == value, name
    assert any(0 < v < 1 for v in oracle.values())


def test_batched_fewshot_solver_matches_sklearn():
    torch.manual_seed(0)
    centers = torch.randn(8, 32)
    labels = torch.arange(8).repeat_interleave(20)
    features = torch.nn.functional.normalize(centers[labels] * 0.3 + torch.randn(160, 32), dim=-1)
    for shots in (1, 5):
        episodes = sample_episodes(labels, ways=5, shots=shots, queries=5, episodes=6, seed=0)
        support = torch.stack([features[e.support] for e in episodes])
        support_labels = torch.stack([e.support_labels for e in episodes])
        weight, bias = fit_batched_logistic(support, support_labels, num_classes=5, C=1.0, tolerance=1e-10)
        for i, episode in enumerate(episodes):
            reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(
                support[i].double().numpy(), support_labels[i].numpy())
            np.testing.assert_allclose(weight[i].numpy(), reference.coef_, atol=1e-5)
            # softmax is shift invariant: compare centred biases
            np.testing.assert_allclose((bias[i] - bias[i].mean()).numpy(),
                                       reference.intercept_ - reference.intercept_.mean(), atol=1e-5)
            query = features[episode.query].double()
            mine = (query @ weight[i].T + bias[i]).argmax(1).numpy()
            assert (mine == reference.predict(query.numpy())).all()
