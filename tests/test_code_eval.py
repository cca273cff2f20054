"""The code tasks of image tokenizers (eval/codes.py `reconstruction`, eval/code_probes.py `code_semantics`) and
the Fréchet distance (eval/frechet.py): analytic PSNR / SSIM / usage answers on hand-made tokenizers, parity with
torchmetrics' FID formula, probes that read the answer from an oracle's codes and nothing from constant codes,
a masked-word probe that cannot see the masked word, and one run_suite call on a tiny random vq model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import EvalConfig, ModelConfig

# ---- hand-made tokenizers ------------------------------------------------------------------------------------


class TableQuantizer:
    def __init__(self, table: torch.Tensor):
        self.table = table  # [K, D]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table[codes].permute(0, 3, 1, 2)  # [B, D, h, w]


class IndexedTokenizer(torch.nn.Module):
    """A 'tokenizer' whose images are their own index (the preprocess writes it into every pixel) and whose
    codes are a fixed table per image; decode gives a constant image of value `decoded` ([-1, 1] space)."""

    capabilities = frozenset({"codes"})

    def __init__(self, codes: torch.Tensor, codebook_size: int, embed_dim: int = 16, decoded: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.codes, self.codebook_size, self.embed_dim = codes, codebook_size, embed_dim  # codes [N, h, w]
        self.grid_size, self.decoded = codes.shape[1], decoded
        self.quantizer = TableQuantizer(torch.randn(codebook_size, embed_dim,
                                                    generator=torch.Generator().manual_seed(seed)))

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes[images[:, 0, 0, 0].round().long()]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.full((codes.shape[0], 3, 16, 16), self.decoded)


def index_preprocess(index: int) -> torch.Tensor:
    return torch.full((3, 16, 16), float(index))


def constant_images(values: list[int]) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (v, v, v)) for v in values]


def grey_preprocess(image: Image.Image) -> torch.Tensor:  # the vq family's [-1, 1] space
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1


class ConstantImageTokenizer(IndexedTokenizer):
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:  # codes from the pixel value: 0 or 1
        return (images[:, 0, :4, :4] > 0).long()


# ---- reconstruction: known answers ---------------------------------------------------------------------------


def test_psnr_ssim_mse_and_l1_of_constant_images_are_known_exactly():
    from clipforge.eval.codes import measure_reconstruction

    a, b = 128 / 255, 0.25  # image value, reconstruction value (in [0, 1])
    tokenizer = ConstantImageTokenizer(torch.zeros(1, 4, 4, dtype=torch.long), 2, decoded=2 * b - 1)
    result = measure_reconstruction(tokenizer, constant_images([128, 128, 128]), grey_preprocess, batch_size=2)
    c1 = 0.01 ** 2  # SSIM of two constant images: the luminance term alone (variances are 0)
    assert result.metrics["psnr"] == pytest.approx(10 * math.log10(1 / (a - b) ** 2), rel=1e-5)
    # float32 (float64 SSIM is ~15x slower): E[x^2] - E[x]^2 leaves ~1e-7 of variance, ~3e-5 of SSIM
    assert result.metrics["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)
    assert result.metrics["mse"] == pytest.approx((a - b) ** 2, rel=1e-5)
    assert result.metrics["l1"] == pytest.approx(a - b, rel=1e-5)
    # a perfect reconstruction: SSIM 1, PSNR at its 100 dB cap
    perfect = ConstantImageTokenizer(torch.zeros(1, 4, 4, dtype=torch.long), 2, decoded=2 * a - 1)
    metrics = measure_reconstruction(perfect, constant_images([128]), grey_preprocess).metrics
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6) and metrics["psnr"] == pytest.approx(100.0)


def test_usage_perplexity_and_histogram_of_hand_made_codes():
    from clipforge.eval.codes import measure_reconstruction

    codes = torch.zeros(3, 2, 2, dtype=torch.long)
    codes[0] = torch.tensor([[0, 0], [1, 1]])
    codes[1] = torch.tensor([[0, 0], [0, 0]])
    codes[2] = torch.tensor([[2, 2], [2, 2]])  # counts 6, 2, 4, 0 of a codebook of 4
    tokenizer = IndexedTokenizer(codes, codebook_size=4)
    result = measure_reconstruction(tokenizer, [0, 1, 2], index_preprocess, batch_size=2)
    assert result.histogram.tolist() == [6, 2, 4, 0]
    p = np.array([6, 2, 4]) / 12
    assert result.metrics["codebook_usage"] == pytest.approx(75.0)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


# ---- the Fréchet distance ------------------------------------------------------------------------------------


def test_frechet_distance_matches_torchmetrics_and_analytic_answers():
    from torchmetrics.image.fid import _compute_fid

    from clipforge.eval.frechet import frechet_distance, frechet_distance_from_statistics

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                    dtype=torch.float64) + 0.5
    expected = _compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # 1-D Gaussians: (mu_a - mu_b)^2 + (s_a - s_b)^2, from the sample statistics
    x, y = a[:, :1], 3 * b[:, :1] - 2
    mean_x, mean_y, std_x, std_y = x.mean(), y.mean(), x.std(), y.std()  # unbiased, as np.cov
    assert frechet_distance(x, y) == pytest.approx(float((mean_x - mean_y) ** 2 + (std_x - std_y) ** 2), rel=1e-9)
    # diagonal covariances: the sum over dimensions of the 1-D answers
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    analytic = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance_from_statistics(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(analytic)


# ---- semantic probes -----------------------------------------------------------------------------------------

GRID = 8


def oracle_codes(scenes: list[dict], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, 8, 8], codebook [K, D]) that hold every answer. Background is code 0; each object's centre cell
    holds a code naming its colour, shape, size and fill, and whether it is the main object. Each codebook vector
    is the one-hot encoding of its code's attributes, so the answers are linear in the vectors."""
    from clipforge.data.synth import COLORS, FILLS, SHAPES, SIZES

    vocabularies = (COLORS, SHAPES, SIZES, FILLS, ("secondary", "main"))
    names = [()] + [tuple(v) for v in np.ndindex(*[len(v) for v in vocabularies])]  # code -> attribute indices
    codebook = torch.zeros(len(names), sum(len(v) for v in vocabularies) + 1)
    codebook[0, -1] = 1.0  # background
    for code, name in enumerate(names[1:], start=1):
        offsets = np.cumsum([0] + [len(v) for v in vocabularies[:-1]])
        codebook[code, [int(o + i) for o, i in zip(offsets, name)]] = 1.0
    index = {name: code for code, name in enumerate(names)}
    codes = torch.zeros(len(scenes), GRID, GRID, dtype=torch.long)
    for image, scene in enumerate(scenes):
        for rank, item in enumerate(scene["objects"]):
            x0, y0, x1, y1 = item["box"]
            column, row = int((x0 + x1) / 2 * GRID / image_size), int((y0 + y1) / 2 * GRID / image_size)
            name = (COLORS.index(item["color"]), SHAPES.index(item["shape"]), SIZES.index(item["size"]),
                    FILLS.index(item["fill"]), int(rank == 0))
            codes[image, row, column] = index[name]
    return codes, codebook


@pytest.fixture(scope="module")
def probe_inputs():
    """SynthScenes held-out and train sets (32 px), their oracle and constant code vectors, caption features."""
    from clipforge.eval import code_language, code_probes
    from clipforge.eval.datasets import synth_eval_datasets

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: later test modules keep the thread count they expect
    dataset = synth_eval_datasets(num_eval=300, image_size=32, groups=("base",), variants=[])[0]
    vectors = {}
    for name, split in (("train", dataset.train), ("test", dataset)):
        codes, codebook = oracle_codes(split.scenes, 32)
        oracle = IndexedTokenizer(codes, codebook_size=len(codebook))
        oracle.quantizer = TableQuantizer(codebook)
        constant = IndexedTokenizer(torch.zeros_like(codes), codebook_size=2, embed_dim=codebook.shape[1])
        vectors[name] = {"oracle": code_probes.code_vectors(oracle, codes),
                         "constant": code_probes.code_vectors(constant, torch.zeros_like(codes))}
    prior, tokenizer = code_language.probe_text_prior(None)
    text = {name: code_language.split_text(prior, tokenizer, split, 0, train=name == "train")
            for name, split in (("train", dataset.train), ("test", dataset))}
    yield dataset, vectors, prior, tokenizer, text
    torch.set_num_threads(before)


def test_scene_probes_read_the_answers_from_oracle_codes_and_nothing_from_constant_codes(probe_inputs, one_thread):
    from clipforge.eval.code_probes import QUESTIONS, scene_probes

    dataset, vectors, *_ = probe_inputs
    results = {kind: scene_probes(vectors["train"][kind], dataset.train.scenes, vectors["test"][kind],
                                  dataset.scenes, steps=300, width=32, seed=0)[0] for kind in ("oracle", "constant")}

    for question in QUESTIONS:
        chance = results["oracle"][f"{question}_chance"]
        assert chance == results["constant"][f"{question}_chance"] < 0.6
        # left_of: objects whose centres share a column of the 8x8 grid cannot be told apart (ceiling ~0.96)
        assert results["oracle"][f"{question}_accuracy"] > (0.85 if question == "left_of" else 0.95), results

        assert results["constant"][f"{question}_accuracy"] < chance + 0.06, (question, results["constant"])


def test_language_probes_read_captions_from_oracle_codes_and_nothing_from_constant_codes(probe_inputs, one_thread):
    """Constant codes leave retrieval at chance and masked words to the caption's context alone; oracle codes
    lift both (150 steps on 300 images: the masked-word head is data-hungry, so far from 1 on the oracle)."""
    from clipforge.eval.code_language import language_probe

    _, vectors, prior, tokenizer, text = probe_inputs
    results = {kind: language_probe(vectors["train"][kind], text["train"], vectors["test"][kind], text["test"],
                                    prior, tokenizer, steps=150, width=32, seed=0)[0]
               for kind in ("oracle", "constant")}
    oracle, constant = results["oracle"], results["constant"]
    assert constant["image_retrieval_recall@1"] <= 2 * constant["image_retrieval_chance@1"]
    assert oracle["image_retrieval_recall@1"] > 100 * oracle["image_retrieval_chance@1"]  # > 0.33 of 300
    assert oracle["masked_word_recall@1_visual"] > constant["masked_word_recall@1_visual"] + 0.08, results
    assert oracle["masked_word_chance"] == constant["masked_word_chance"] < 0.25
    assert oracle["code_word_similarity_mse"] < constant["code_word_similarity_mse"]


def test_the_masked_word_probe_cannot_see_the_masked_word(probe_inputs):
    """Changing a hidden word leaves every input of the probe bit-identical; changing a visible word does not."""
    from clipforge.eval.code_language import masked_captions

    _, _, prior, tokenizer, _ = probe_inputs
    captions = ["a large solid red circle left of a small dotted blue square",
                "there is a small striped green star", "a picture of a large solid pink heart"]
    owner = torch.arange(len(captions))
    for caption in captions:  # one token per word, so token p is word p - 1
        assert int(prior.attention(tokenizer([caption])).sum()) == len(caption.split()) + 2

    def replaced(position: int) -> list[str]:
        words = captions[0].split()
        words[position - 1] = "purple" if words[position - 1] != "purple" else "yellow"
        return [" ".join(words)] + captions[1:]

    before = masked_captions(prior, tokenizer, captions, owner, seed=3)
    assert bool((before.masked_ids[before.masked] == prior.mask_id).all())
    hidden = int(before.masked[0].nonzero()[0])
    after = masked_captions(prior, tokenizer, replaced(hidden), owner, seed=3)
    assert int(after.ids[0, hidden]) != int(before.ids[0, hidden])  # the answer changed...
    assert torch.equal(after.masked, before.masked) and torch.equal(after.masked_ids, before.masked_ids)
    assert torch.equal(after.context, before.context) and torch.equal(after.padding, before.padding)  # ...not the input
    visible = int((~before.masked[0] & ~before.padding[0]).nonzero()[1])  # a word (index 0 is [CLS])
    control = masked_captions(prior, tokenizer, replaced(visible), owner, seed=3)
    assert not torch.equal(control.context[0], before.context[0])


def test_code_word_similarity_mse_pools_relationship_alignment_loss_over_word_pairs():
    from clipforge.eval.code_language import code_word_similarity_mse
    from clipforge.objectives.lgvq import relationship_alignment_loss

    generator = torch.Generator().manual_seed(0)
    words, tokens = torch.randn(5, 6, 8, generator=generator), torch.randn(5, 10, 8, generator=generator)
    vectors = torch.randn(5, 10, 3, generator=generator)
    valid = torch.rand(5, 6, generator=generator) > 0.3
    valid[2] = False  # a caption without words
    pooled = code_word_similarity_mse(words, valid, tokens, vectors, chunk=2)
    assert pooled == pytest.approx(float(relationship_alignment_loss(words, valid, tokens, vectors)), rel=1e-6)
    # codes that are the words themselves: every word finds its own position, the cosines agree
    assert code_word_similarity_mse(words, valid, words, words) == pytest.approx(0.0, abs=1e-6)
    # two orthogonal words matched to codes at 45 degrees: off-diagonal error 1/2, mean over 4 pairs 1/4
    two_words = torch.eye(2)[None]  # [1, 2, 2]
    codes = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    assert code_word_similarity_mse(two_words, torch.ones(1, 2, dtype=torch.bool), two_words, codes) == \
        pytest.approx(0.25, rel=1e-6)


# ---- one suite run on a tiny random vq model -----------------------------------------------------------------


@pytest.fixture
def feature_run(tmp_path):
    """A clipforge CLIP run folder (clipforge-vit-micro, random weights) whose image tower is the extractor."""
    from clipforge.models import create_model
    from clipforge.models.checkpoint import save_model_weights
    from clipforge.models.factory import write_model_json

    torch.manual_seed(1)
    bundle = create_model(ModelConfig(family="clip", name="clipforge-vit-micro"))
    folder = tmp_path / "feature_run"
    folder.mkdir()
    write_model_json(bundle, folder)
    save_model_weights(bundle.model, folder / "model.safetensors", exclude=bundle.frozen)
    return folder


def test_run_suite_on_a_tiny_vq_model_writes_both_code_tasks(tmp_path, feature_run, one_thread):
    from torchvision.transforms.functional import to_pil_image

    from clipforge.eval.codes import measure_reconstruction
    from clipforge.eval.datasets import synth_eval_datasets
    from clipforge.eval.features import compute_image_features
    from clipforge.eval.frechet import frechet_distance
    from clipforge.eval.suite import run_suite
    from clipforge.models import create_model, load_model
    from clipforge.registry import EVAL_TASKS

    assert {"reconstruction", "code_semantics"} <= set(EVAL_TASKS.names())
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(family="vq", name="vq-tiny"))
    model, preprocess = bundle.model.eval(), bundle.preprocess_val
    dataset = synth_eval_datasets(num_eval=40, num_train=40, image_size=32, groups=("base",), variants=[])[0]
    config = EvalConfig(tasks=["reconstruction", "code_semantics"], probe_steps=3, feature_run=str(feature_run))
    summary = run_suite(model, preprocess, None, config, [dataset], tmp_path / "out", model_name="vq-tiny")
    records = {r["clipforge_task"]: r for r in summary["results"]}
    assert set(records) == {"reconstruction", "code_semantics"} and not summary["skipped"]

    reconstruction = records["reconstruction"]
    expected = measure_reconstruction(model, dataset.images, preprocess, keep_images=True)
    for name, value in expected.metrics.items():
        assert reconstruction["metrics"][name] == pytest.approx(value, rel=1e-6), name
    assert reconstruction["details"]["code_histogram"] == expected.histogram.long().tolist()
    assert sum(reconstruction["details"]["code_histogram"]) == 40 * 8 * 8
    clip, clip_preprocess, _ = load_model(None, checkpoint=feature_run)
    real = compute_image_features(clip, clip_preprocess, dataset.images)
    fake = compute_image_features(clip, clip_preprocess, [to_pil_image((model.decode_codes(
        model.encode_codes(preprocess(image)[None])).clamp(-1, 1)[0] + 1) / 2) for image in dataset.images])
    assert reconstruction["metrics"]["frechet_distance"] == pytest.approx(frechet_distance(real, fake), rel=1e-4)
    assert reconstruction["settings"]["feature_extractor"]["run"] == str(feature_run)
    examples = json.loads(next((tmp_path / "out" / "eval" / "examples").glob("*reconstruction*")).read_text())
    assert len(examples["pairs"]) == 6 and examples["pairs"][0]["key"] == dataset.keys[0]

    semantics = records["code_semantics"]
    for question in ("color", "shape", "count", "left_of"):
        assert 0.0 <= semantics["metrics"][f"{question}_accuracy"] <= 1.0
        assert 0.0 < semantics["metrics"][f"{question}_chance"] <= 1.0
    assert {"image_retrieval_recall@1", "masked_word_recall@1", "code_word_similarity_mse"} <= set(semantics["metrics"])
    assert semantics["settings"]["probe_steps"] == 3 and semantics["settings"]["text_prior"]["kind"] == "minilm"
    assert semantics["details"]["num_masked_captions"] == {"train": 160, "test": 40}

    # no extractor configured: no Fréchet distance, and the settings say why; a dataset without a train split
    # is skipped by code_semantics with the reason
    dataset.train = None
    with pytest.warns(UserWarning, match="'code_semantics' cannot run on any dataset"):
        summary = run_suite(model, preprocess, None, EvalConfig(tasks=["reconstruction", "code_semantics"]),
                            [dataset])
    (record,) = summary["results"]
    assert "frechet_distance" not in record["metrics"]
    assert record["settings"]["frechet_distance"].startswith("not computed: no eval.feature_run")
    assert summary["skipped"][0]["task"] == "code_semantics" and "training split" in summary["skipped"][0]["reason"]
