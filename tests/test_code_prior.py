"""The `code_prior` family and the `code_ar` objective (a text-to-image prior over vq codes), and the
`text_to_image` evaluation task.

- through the engine: the registry-wide checks of tests/test_families.py for (code_ar, code_prior) (finite
  gradients, SIGKILL + resume bit-identical, reload from the folder alone), and a prior over a trained tokenizer
  run that reloads with its tokenizer referenced, not copied, and refuses a tokenizer whose weights changed;
- the loss: taken on the h*w code positions only (analytic, with a head that outputs fixed logits), causal
  (position i never reads code i or later), caption dropout replaces captions by the empty one;
- generation: deterministic per seed, independent of the other prompts in the call, and the cached decoding
  agrees with the training forward (greedy codes are the argmax of the full-sequence logits);
- text_to_image on a hand-made judge (features = mean colour) and hand-made generators: known accuracy and
  Fréchet distance; skipped with the reason when no judge is set.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import test_families as registry_wide
import torch
import yaml
from PIL import Image
from torch import nn

from clipforge.config import EvalConfig, ModelConfig, load_config
from clipforge.errors import CheckpointError

PAIR = ("code_ar", "code_prior")


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def prior():
    from clipforge.models import create_model

    torch.manual_seed(0)
    return create_model(ModelConfig(family="code_prior", name="code-prior-tiny")).model.eval()


# ---- through the engine ------------------------------------------------------------------------------------------

def test_registry_wide_checks_for_the_code_prior(tmp_path, tiny_shards):
    """The three checks every registered family and objective passes (tests/test_families.py), for this pair."""
    for check in (registry_wide.test_one_step_gives_every_trainable_parameter_a_finite_gradient,
                  registry_wide.test_a_checkpoint_reloads_from_its_folder_alone):
        folder = tmp_path / check.__name__
        folder.mkdir()
        check(folder, tiny_shards, *PAIR)


def test_the_code_prior_resumes_bit_identical_after_sigkill(tmp_path, tiny_shards):
    registry_wide.test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, tiny_shards, *PAIR)


def test_a_prior_over_a_trained_tokenizer_references_it_and_refuses_other_weights(tmp_path, tiny_shards):
    from safetensors.torch import load_file, save_file

    from clipforge.engine.loop import train
    from clipforge.models import load_model
    from clipforge.models.factory import find_model_weights
    from clipforge.models.text_prior import file_sha256

    def config(name: str, family: str, objective: dict, steps: int) -> Path:
        body = {"name": name, "seed": 0, "output_dir": str(tmp_path / name),
                "data": {"train": str(tiny_shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
                "model": {"family": family, "name": {"vq": "vq-tiny", "code_prior": "code-prior-tiny"}[family]},
                "objective": objective, "train": {"max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "log_every": 1,
                                                  "tensorboard": False, "progress": False}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body))
        return tmp_path / f"{name}.yaml"

    tokenizer_run = train(load_config(config("vq", "vq", {"name": "vq"}, 3))).run_dir
    run = train(load_config(config("prior", "code_prior", {"name": "code_ar", "code_ar": {
        "tokenizer": str(tokenizer_run), "caption_dropout": 0.5}}, 4)))
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/code_ar", "code_accuracy", "bits_per_code", "caption_dropped"} <= set(records[-1])
    folder = run.checkpoint
    spec = json.loads((folder / "model.json").read_text())["settings"]["tokenizer"]
    weights = find_model_weights(tokenizer_run)
    assert spec["kind"] == "run" and spec["weights_sha256"] == file_sha256(weights)
    assert spec["checkpoint"] == str(weights.parent.resolve())
    assert not any(k.startswith("image_tokenizer.") for k in load_file(str(folder / "model.safetensors")))
    model, preprocess, tokenizer = load_model(None, checkpoint=run.run_dir)
    tokens = tokenizer(["a red circle", ""])
    assert tokens.shape == (2, 24) and tokenizer is model.text_tokenizer
    first = model.generate_codes(["a red circle"], 2, seed=3)
    assert torch.equal(load_model(None, checkpoint=run.run_dir)[0].generate_codes(["a red circle"], 2, seed=3), first)
    state = load_file(str(weights))  # the tokenizer's weights change under the prior: refused on load
    state["decoder.layers.0.weight"] += 0.01
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="trained over tokenizer 'vq-tiny'") as caught:
        load_model(None, checkpoint=run.run_dir)
    assert spec["weights_sha256"][:12] in str(caught.value) and "\n" not in str(caught.value)


# ---- the loss -------------------------------------------------------------------------------------------------------

def batch_of(prior, captions: list[str], seed: int = 0):
    from clipforge.data.batches import ImageTextBatch

    images = torch.rand(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return ImageTextBatch(images=images, texts=prior.text_tokenizer(captions),
                          labels=torch.full((len(captions),), -1), keys=[str(i) for i in range(len(captions))])


def test_the_loss_is_taken_on_the_code_positions_only(prior):
    """With the head's weight zeroed, every position's logits are its bias b, so the loss must be the mean of
    -log softmax(b)[code] over the B*h*w codes and nothing else (no caption position as a target)."""
    from clipforge.config import CodeArObjectiveConfig
    from clipforge.objectives.code_ar import CodeArObjective

    model = copy.deepcopy(prior)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.randn(model.codebook_size, generator=torch.Generator().manual_seed(1)) * 3)
    objective = CodeArObjective(CodeArObjectiveConfig(caption_dropout=0.0))
    batch = batch_of(model, ["a large red circle", "two blue squares", "a dotted star", "x"])
    output = objective(model, batch)
    codes = model.image_codes(batch.images).flatten(1)  # [4, 64]
    expected = -torch.log_softmax(model.head.bias, dim=0)[codes].mean()
    assert codes.numel() == 4 * model.num_codes
    assert output.losses["code_ar"].item() == pytest.approx(expected.item(), rel=1e-6)
    accuracy = (codes == model.head.bias.argmax()).float().mean()
    assert output.metrics["code_accuracy"].item() == pytest.approx(accuracy.item())
    assert output.metrics["bits_per_code"].item() == pytest.approx(expected.item() / math.log(2), rel=1e-6)


def test_position_i_reads_the_caption_and_earlier_codes_only(prior):
    codes = torch.randint(0, prior.codebook_size, (2, prior.num_codes), generator=torch.Generator().manual_seed(0))
    texts = prior.text_tokenizer(["a red circle", "a blue star"])
    with torch.no_grad():
        logits = prior(texts, codes)  # [2, 64, K]
        changed = codes.clone()
        changed[:, 20] = (changed[:, 20] + 1) % prior.codebook_size
        after = prior(texts, changed)
        recaptioned = prior(prior.text_tokenizer(["a green heart", "a blue star"]), codes)
    assert logits.shape == (2, prior.num_codes, prior.codebook_size)
    assert torch.equal(logits[:, :21], after[:, :21])  # positions 0..20 predict codes 0..20: code 20 unseen
    assert not torch.allclose(logits[:, 21:], after[:, 21:])
    assert not torch.allclose(recaptioned[0], logits[0]) and torch.allclose(recaptioned[1], logits[1], atol=1e-6)


def test_caption_dropout_replaces_captions_by_the_empty_one(prior):
    from clipforge.config import CodeArObjectiveConfig
    from clipforge.objectives.code_ar import CodeArObjective, drop_captions

    batch = batch_of(prior, ["a red circle", "a blue star", "a green heart"])
    empty = prior.text_tokenizer([""])
    kept, none_dropped = drop_captions(batch.texts, empty, 0.0)
    dropped, all_dropped = drop_captions(batch.texts, empty, 1.0)
    assert torch.equal(kept, batch.texts) and not none_dropped.any()
    assert torch.equal(dropped, empty.expand(3, -1)) and all_dropped.all()
    torch.manual_seed(0)
    some = drop_captions(batch.texts.repeat(100, 1), empty, 0.3)[1].float().mean().item()
    assert 0.2 < some < 0.4
    unconditional = CodeArObjective(CodeArObjectiveConfig(caption_dropout=1.0))(prior, batch)
    with torch.no_grad():
        codes = prior.image_codes(batch.images).flatten(1)
        reference = torch.nn.functional.cross_entropy(prior(empty.expand(3, -1), codes).flatten(0, 1), codes.flatten())
    assert unconditional.losses["code_ar"].item() == pytest.approx(reference.item(), rel=1e-6)
    assert unconditional.metrics["caption_dropped"].item() == 1.0


# ---- generation ----------------------------------------------------------------------------------------------------

def test_generation_is_deterministic_per_seed_and_independent_of_the_other_prompts(prior):
    prompts = ["a red circle", "a blue star", "a green heart"]
    codes = prior.generate_codes(prompts, num_per_prompt=2, seed=7)
    assert codes.shape == (6, prior.grid_size, prior.grid_size)
    assert torch.equal(prior.generate_codes(prompts, num_per_prompt=2, seed=7), codes)
    assert not torch.equal(prior.generate_codes(prompts, num_per_prompt=2, seed=8), codes)
    assert torch.equal(prior.generate_codes(["a blue star"], num_per_prompt=2, seed=7), codes[2:4])
    assert torch.equal(prior.generate_codes(["a green heart", "a red circle"], num_per_prompt=1, seed=7),
                       codes[[4, 0]])
    images = prior.generate(prompts, num_per_prompt=2, seed=7)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    alone = prior.generate(["a blue star"], num_per_prompt=2, seed=7)
    assert torch.allclose(alone, images[2:4], atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_decoding_agrees_with_the_training_forward(prior, guidance):
    """Greedy codes (temperature 0) must be the argmax of the full-sequence logits, guided the same way."""
    prompts = ["a red circle", "two blue squares"]
    codes = prior.generate_codes(prompts, temperature=0.0, guidance=guidance).flatten(1)  # [2, 64]
    texts = prior.text_tokenizer(prompts)
    with torch.no_grad():
        logits = prior(texts, codes)
        unconditional = prior(prior.empty_caption.expand(2, -1), codes)
    guided = unconditional + guidance * (logits - unconditional)
    assert torch.equal(guided.argmax(dim=-1), codes)


# ---- text_to_image on a hand-made judge ----------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourJudge(nn.Module):
    """Image feature: the mean colour; text feature: the one-hot colour the prompt names."""

    capabilities = frozenset({"encode_image", "encode_text"})

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # [B, 3] in [0, 1] (ToTensor, no normalisation)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return nn.functional.one_hot(tokens[:, 0], 3).float()


def colour_tokens(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[next(i for i, name in enumerate(COLOURS) if name in text)] for text in texts])


def build_colour_judge(model_config, device="cpu", model_kwargs=None, saved=None):
    from torchvision import transforms

    from clipforge.models.family import ModelBundle

    preprocess = transforms.ToTensor()
    return ModelBundle(ColourJudge(), preprocess, preprocess, colour_tokens,
                       config={"family": "colour_judge", "name": "colour-judge"})


class SolidColours(nn.Module):
    """A generator that paints the colour its prompt names (or always `only`)."""

    capabilities = frozenset({"generate"})

    def __init__(self, only: str | None = None):
        super().__init__()
        self.only = only

    def generate(self, prompts, num_per_prompt=1, seed=0):
        colours = [COLOURS[self.only or next(n for n in COLOURS if n in p)] for p in prompts for _ in range(num_per_prompt)]
        return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 16, 16) / 127.5 - 1


@pytest.fixture
def judge_run(tmp_path, monkeypatch) -> Path:
    from safetensors.torch import save_file

    from clipforge.registry import FAMILIES

    monkeypatch.setitem(FAMILIES, "colour_judge", build_colour_judge)
    folder = tmp_path / "judge"
    folder.mkdir()
    save_file({}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({"family": "colour_judge", "name": "colour-judge"}))
    return folder


def colour_dataset(per_class: int):
    from clipforge.eval.datasets import EvalDataset

    images = [Image.new("RGB", (16, 16), rgb) for rgb in COLOURS.values() for _ in range(per_class)]
    labels = [label for label in range(3) for _ in range(per_class)]
    return EvalDataset(name="colours", images=images, labels=labels, classnames=list(COLOURS))


def run_text_to_image(model, judge: Path | None, per_class: int = 2) -> dict:
    from clipforge.eval.suite import run_suite

    config = EvalConfig(tasks=["text_to_image"], generate_per_class=per_class, feature_run=str(judge) if judge else None)
    return run_suite(model, None, None, config, colour_dataset(2), templates=["a {}."])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore::RuntimeWarning")  # singular covariances
def test_text_to_image_scores_generated_images_with_the_judge(judge_run, prior):
    faithful = run_text_to_image(SolidColours(), judge_run)["results"][0]["metrics"]
    assert faithful["t2i_acc1"] == 1.0 and faithful["real_acc1"] == 1.0
    assert abs(faithful["frechet_distance"]) < 1e-4  # the same features as the real images, class for class
    collapsed = run_text_to_image(SolidColours(only="red"), judge_run)["results"][0]["metrics"]
    assert collapsed["t2i_acc1"] == pytest.approx(1 / 3)
    # features e_red for every sample vs one-hot real features (6 of them): |e_r - 1/3|^2 + Tr(cov_real), cov_gen = 0
    assert collapsed["frechet_distance"] == pytest.approx(2 / 3 + (2 / 3) * 6 / 5, rel=1e-6)
    result = run_text_to_image(prior, judge_run, per_class=3)["results"][0]  # the real prior, through the same path
    assert result["details"]["num_generated"] == 9 and math.isfinite(result["metrics"]["frechet_distance"])
    assert result["settings"]["sampling"] == prior.sampling


def test_text_to_image_without_a_judge_is_skipped_with_the_reason():
    with pytest.warns(UserWarning, match="text_to_image"):
        summary = run_text_to_image(SolidColours(), None)
    assert not summary["results"]
    assert "eval.feature_run" in summary["skipped"][0]["reason"]
