"""Frozen transfer (clipforge.eval.frozen_transfer): the attentive probe and captioning on any image encoder.

Hand-made encoders whose tokens carry the answer (the label in one token at a random position; a caption's words
one per token) must be read near-perfectly, and constant tokens must not be; BLEU-4 / CIDEr agree with a direct
pycocoevalcap call; both tasks run end to end through run_suite on a CLIP and an LCL encoder without touching it.
"""

from __future__ import annotations

import math

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from sklearn.linear_model import LogisticRegression

from clipforge.config import EvalConfig, ModelConfig
from clipforge.eval import EvalDataset, frozen_transfer, run_suite, synth_eval_datasets
from clipforge.eval.captioner import WordVocabulary, caption_scores, caption_words
from clipforge.eval.frozen_transfer import usable_heads
from clipforge.models.factory import create_model

NUM_CLASSES, NUM_TOKENS, WIDTH = 4, 8, 16


class TokenTable(torch.nn.Module):
    """Image id -> hand-made tokens [T, W]; serves image tokens only."""

    capabilities = {"image_tokens"}

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def encode_image_tokens(self, ids):  # [B] -> [B, T, W]
        return self.table[ids]


def by_index(index):
    return torch.tensor(index)


def label_in_one_token(labels: list[int], generator: torch.Generator) -> torch.Tensor:
    """Noise tokens, one of which (at a random position) holds a marker and the one-hot label."""
    tokens = 3.0 * torch.randn(len(labels), NUM_TOKENS, WIDTH, generator=generator)
    positions = torch.randint(NUM_TOKENS, (len(labels),), generator=generator)
    for i, (label, position) in enumerate(zip(labels, positions.tolist())):
        tokens[i, position] = 0.0
        tokens[i, position, WIDTH - 1] = 10.0  # the marker attention can find
        tokens[i, position, label] = 10.0
    return tokens


def probe_setup(constant: bool):
    generator = torch.Generator().manual_seed(0)
    train_labels = [i % NUM_CLASSES for i in range(240)]
    test_labels = [i % NUM_CLASSES for i in range(120)]  # balanced: a constant prediction scores exactly 1/4
    tokens = label_in_one_token(train_labels + test_labels, generator)
    if constant:
        tokens = torch.ones_like(tokens)
    train = EvalDataset(name="tokens-train", images=list(range(240)), labels=train_labels,
                        classnames=[f"class {c}" for c in range(NUM_CLASSES)])
    # one table for both splits: the test images' ids continue after the training images'
    test = EvalDataset(name="tokens", images=list(range(240, 360)), labels=test_labels,
                       classnames=train.classnames, train=train)
    return TokenTable(tokens), test, tokens


def test_attentive_probe_reads_the_label_token_that_a_mean_pool_misses(one_thread):
    model, dataset, tokens = probe_setup(constant=False)
    config = EvalConfig(tasks=["attentive_probe"], transfer_epochs=20, transfer_lr=3e-3)
    summary = run_suite(model, by_index, None, config, [dataset])
    (record,) = summary["results"]
    assert record["clipforge_task"] == "attentive_probe"
    assert record["metrics"]["ap_acc1"] >= 0.97
    assert record["metrics"]["ap_mean_per_class_recall"] >= 0.97
    assert record["settings"]["epochs"] == 20 and record["settings"]["heads"] == 4
    assert record["settings"]["queries"] == 1
    # the same tokens mean-pooled are much harder for a linear classifier: the test needs the attention
    pooled = tokens.mean(dim=1).numpy()
    labels = dataset.train.labels + dataset.labels
    linear = LogisticRegression(max_iter=1000).fit(pooled[:240], labels[:240])
    assert linear.score(pooled[240:], labels[240:]) < 0.75


def test_attentive_probe_on_constant_tokens_is_chance(one_thread):
    model, dataset, _ = probe_setup(constant=True)
    config = EvalConfig(tasks=["attentive_probe"], transfer_epochs=5)
    (record,) = run_suite(model, by_index, None, config, [dataset])["results"]
    assert record["metrics"]["ap_acc1"] == pytest.approx(1 / NUM_CLASSES)  # one prediction for every image
    assert record["metrics"]["ap_mean_per_class_recall"] == pytest.approx(1 / NUM_CLASSES)


def test_attentive_probe_is_seeded_and_heads_fit_the_width(one_thread):
    _, dataset, tokens = probe_setup(constant=False)
    args = (tokens[:240], dataset.train.labels, tokens[240:], dataset.labels, NUM_CLASSES)
    first = frozen_transfer.attentive_probe(*args, epochs=2, seed=3)
    again = frozen_transfer.attentive_probe(*args, epochs=2, seed=3)
    other = frozen_transfer.attentive_probe(*args, epochs=2, seed=4)
    assert first[0] == again[0] and first[1]["epoch_loss"] == again[1]["epoch_loss"]
    assert first[1]["epoch_loss"] != other[1]["epoch_loss"]
    assert [usable_heads(32, 4), usable_heads(30, 4), usable_heads(7, 4), usable_heads(2, 8)] == [4, 3, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# Captioning


def test_caption_scores_match_pycocoevalcap():
    generated = ["A red circle, left of a blue square.", "a small green star", "the big cat sat on the mat"]
    references = [["a red circle left of a blue square", "there is a red circle"],
                  ["a large green star", "an image of a small green star"],
                  ["a dog sat on a mat", "the cat is on the mat"]]
    gts = {i: [" ".join(r.lower().replace(",", "").replace(".", "").split()) for r in refs]
           for i, refs in enumerate(references)}
    res = {i: [" ".join(g.lower().replace(",", "").replace(".", "").split())] for i, g in enumerate(generated)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = caption_scores(generated, references)
    assert scores["bleu4"] == pytest.approx(bleu[3], abs=1e-12)
    assert scores["cider"] == pytest.approx(cider, abs=1e-12)
    assert 0 < scores["bleu4"] < 1
    identical = caption_scores([refs[0] for refs in references], [[refs[0]] for refs in references])
    assert identical["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert caption_scores(["nothing alike here at all"] * 3, references)["bleu4"] < 1e-6
    assert caption_words("A red circle, left of it.") == ["a", "red", "circle", "left", "of", "it"]


SIZES, PATTERNS = ["small", "large"], ["solid", "dotted", "striped"]
COLORS, SHAPES = ["red", "green", "blue", "pink"], ["circle", "square", "star", "heart"]


def word_scenes(count: int, generator: torch.Generator) -> list[tuple[str, ...]]:
    picks = [torch.randint(len(choices), (count,), generator=generator).tolist()
             for choices in (SIZES, PATTERNS, COLORS, SHAPES)]
    return [(SIZES[a], PATTERNS[b], COLORS[c], SHAPES[d]) for a, b, c, d in zip(*picks)]


def words_as_tokens(scenes, vocabulary: WordVocabulary) -> torch.Tensor:
    """Token j is the one-hot id of the scene's j-th word: [N, 4, V]."""
    tokens = torch.zeros(len(scenes), 4, len(vocabulary))
    for i, scene in enumerate(scenes):
        for j, word in enumerate(scene):
            tokens[i, j, vocabulary.stoi[word]] = 1.0
    return tokens


def caption_setup(constant: bool):
    generator = torch.Generator().manual_seed(0)
    scenes = word_scenes(300, generator)
    captions = [[f"a {' '.join(s)}", f"an image of a {' '.join(s)}"] for s in scenes]
    vocabulary = WordVocabulary.from_captions(captions)
    tokens = words_as_tokens(scenes, vocabulary)
    if constant:
        tokens = torch.ones_like(tokens)
    train = EvalDataset(name="words-train", images=list(range(240)), captions=captions[:240])
    test = EvalDataset(name="words", images=list(range(240, 300)), captions=captions[240:], train=train)
    return TokenTable(tokens), test


def test_captioning_reads_words_from_tokens_and_not_from_constant_tokens(one_thread):
    config = EvalConfig(tasks=["captioning"], caption_steps=150, caption_lr=3e-3)
    scores = {}
    for constant in (False, True):
        model, dataset = caption_setup(constant)
        (record,) = run_suite(model, by_index, None, config, [dataset])["results"]
        assert record["settings"]["steps"] == 150
        scores[constant] = record["metrics"]
        if not constant:
            assert record["details"]["num_scored"] == 60
            assert record["details"]["distinct_captions"] > 30
    assert scores[False]["bleu4"] >= 0.8 and scores[False]["cider"] >= 3.0
    assert scores[True]["bleu4"] < scores[False]["bleu4"] - 0.3  # one caption for every image
    assert scores[True]["cider"] < scores[False]["cider"] / 3


# ----------------------------------------------------------------------------------------------------------
# End to end on real encoders


@pytest.fixture(scope="module")
def tiny_synth():
    return synth_eval_datasets(num_eval=24, num_train=48, image_size=32, variants=[], groups=("base",))


@pytest.mark.filterwarnings("ignore:synthscenes-base. 32 of 48 classes have no images")
@pytest.mark.parametrize("model_config", [ModelConfig(name="clipforge-vit-micro"),
                                          ModelConfig(family="lcl", name="lcl-tiny")], ids=["clip", "lcl"])
def test_both_tasks_run_through_the_suite_on_a_frozen_encoder(model_config, tiny_synth, tmp_path, monkeypatch,
                                                               one_thread):
    bundle = create_model(model_config, "cpu")
    model = bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoded = []
    real = frozen_transfer.encode_image_tokens

    def counting(m, images):
        encoded.append(len(images))
        return real(m, images)

    monkeypatch.setattr(frozen_transfer, "encode_image_tokens", counting)
    config = EvalConfig(tasks=["attentive_probe", "captioning"], transfer_epochs=3, caption_steps=20,
                        batch_size=16)
    rng_state = torch.get_rng_state()
    summary = run_suite(model, bundle.preprocess_val, bundle.tokenizer, config, tiny_synth, out_dir=tmp_path,
                        model_name="tiny")
    assert torch.equal(torch.get_rng_state(), rng_state)  # seeded by their own generators
    by_task = {r["clipforge_task"]: r for r in summary["results"]}
    assert set(by_task) == {"attentive_probe", "captioning"} and summary["skipped"] == []
    assert sum(encoded) == 24 + 48  # test and train tokens extracted once, shared by both tasks
    assert summary["timing"]["images_encoded"] == 24 + 48
    probe, caption = by_task["attentive_probe"]["metrics"], by_task["captioning"]["metrics"]
    assert 0 <= probe["ap_acc1"] <= 1 and 0 <= probe["ap_mean_per_class_recall"] <= 1
    assert 0 <= caption["bleu4"] <= 1 and caption["cider"] >= 0 and math.isfinite(caption["cider"])
    assert by_task["captioning"]["details"]["num_tokens"] == 16
    assert (tmp_path / "eval" / "examples" / "tiny__synthscenes-base__captioning.json").is_file()
    assert model.training  # the suite restores the mode; the encoder itself was never trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = run_suite(model, bundle.preprocess_val, bundle.tokenizer, config, tiny_synth)
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in summary["results"]]


class ImageOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images):
        return torch.ones(len(images), 3)


def test_a_model_without_image_tokens_is_skipped_with_the_reason():
    _, dataset, _ = probe_setup(constant=False)
    dataset.captions = [["a caption"]] * len(dataset)
    config = EvalConfig(tasks=["attentive_probe", "captioning"])
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(ImageOnly(), by_index, None, config, [dataset])
    assert summary["results"] == []
    assert {s["task"]: s["reason"] for s in summary["skipped"]} == {
        "attentive_probe": "needs image_tokens; model has encode_image only",
        "captioning": "needs image_tokens; model has encode_image only"}
    # a model with tokens, but a training set without captions: captioning says so, the probe runs
    model, dataset, _ = probe_setup(constant=False)
    dataset.captions = [["a caption"]] * len(dataset)
    config = EvalConfig(tasks=["attentive_probe", "captioning"], transfer_epochs=1)
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(model, by_index, None, config, [dataset])
    assert [r["clipforge_task"] for r in summary["results"]] == ["attentive_probe"]
    assert summary["skipped"] == [{"task": "captioning", "dataset": "tokens",
                                   "reason": "needs a training set with captions and 'tokens-train' has none"}]
