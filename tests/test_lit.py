"""The `lit` family and the `lit_retrieval` task: a locked image encoder, a text tower tuned against it.

The registry-wide test (tests/test_families.py) covers one step, SIGKILL + resume and reload for `lit-tiny`;
here: the encoder stays bit-identical through a run and out of its checkpoint, analytic retrieval answers (tokens
that name the caption: recall 1; constant tokens: chance and a loss of exactly ln N), the task end to end on a
CLIP and an LCL model, and reloading a run over a CLIP checkpoint folder (refused once those weights change).
"""

from __future__ import annotations

import json
import math
import tempfile

import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms

from clipforge.config import EvalConfig, ModelConfig, load_config
from clipforge.errors import CheckpointError, ConfigError
from clipforge.eval import run_suite, synth_eval_datasets
from clipforge.eval.datasets import EvalDataset
from clipforge.models.factory import create_model, load_model

WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "cyan",
         "gold", "silver", "navy", "olive"]
RECALL_KEYS = {f"lit_{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


class CodeEncoder(nn.Module):
    """Image tokens that name the image's word: a one-hot of its red level's bin, repeated over 4 tokens."""

    def __init__(self, constant: bool = False):
        super().__init__()
        self.constant = constant
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so freezing and lending have work to do

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        code = (images[:, 0].mean(dim=(1, 2)) * len(WORDS)).floor().long().clamp(0, len(WORDS) - 1)  # [B]
        tokens = nn.functional.one_hot(code, len(WORDS)).float()[:, None].expand(-1, 4, -1) * self.scale
        return torch.ones_like(tokens) if self.constant else tokens  # [B, 4, 16]


def word_dataset() -> EvalDataset:
    """One image per word; the test images are other shades in the same bins (not the training images)."""
    def images(offset: float) -> list[Image.Image]:
        return [Image.new("RGB", (8, 8), (int((i + offset) / len(WORDS) * 255), 0, 0)) for i in range(len(WORDS))]

    captions = [[f"a {word} square"] for word in WORDS]
    train = EvalDataset("words-train", images(0.7), captions=captions)
    return EvalDataset("words", images(0.3), captions=captions, train=train)


def lit_suite(model, preprocess, datasets, **eval_settings) -> dict:
    config = EvalConfig(tasks=["lit_retrieval"], **eval_settings)
    return run_suite(model, preprocess, None, config, datasets, strict=True)


def test_tokens_that_name_the_caption_are_retrieved_and_constant_tokens_stay_at_chance():
    settings = {"lit_steps": 40, "lit_lr": 5e-3, "lit_model": "lit-tiny"}
    informative = lit_suite(CodeEncoder(), transforms.ToTensor(), word_dataset(), **settings)["results"][0]
    assert informative["metrics"]["lit_image_retrieval_recall@1"] >= 0.9
    assert informative["metrics"]["lit_text_retrieval_recall@1"] >= 0.9
    constant = lit_suite(CodeEncoder(constant=True), transforms.ToTensor(), word_dataset(), **settings)["results"][0]
    chance = 1 / len(WORDS)
    assert constant["metrics"]["lit_image_retrieval_recall@1"] <= 1.5 * chance
    assert constant["metrics"]["lit_text_retrieval_recall@1"] <= 1.5 * chance
    # identical image features: every row of the logits is constant, the loss is ln N whatever the text tower does
    assert constant["details"]["final_loss"] == pytest.approx(math.log(len(WORDS)), abs=1e-4)
    assert informative["details"]["final_loss"] < 0.5


def test_the_encoder_is_frozen_through_a_run_and_left_out_of_its_checkpoint(tmp_path, tiny_shards):
    from clipforge.engine.loop import train
    from clipforge.models.lit import TINY_RANDOM_ENCODER, lend_image_encoder, random_encoder

    encoder = random_encoder(TINY_RANDOM_ENCODER).train()
    before = snapshot(encoder)
    with lend_image_encoder(encoder, open_clip.image_transform(32, is_train=False)) as key:
        settings = tmp_path / "lit.yaml"
        settings.write_text(yaml.safe_dump({"image_run": key, "embed_dim": 32, "text_width": 32, "text_heads": 2}))
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "name": "lit", "output_dir": str(tmp_path / "run"),
            "data": {"train": str(tiny_shards), "batch_size": 16, "shuffle_buffer": 64},
            "model": {"family": "lit", "name": str(settings)}, "objective": {"name": "clip"},
            "train": {"max_steps": 4, "lr": 1e-2, "warmup_steps": 0, "tensorboard": False, "progress": False}}))
        result = train(load_config(config))
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training  # locked in the run
    assert_same_weights(encoder, before)
    assert all(p.requires_grad for p in encoder.parameters()) and encoder.training  # handed back as it was
    stored = load_file(str(result.checkpoint / "model.safetensors"))
    assert not any(k.startswith("image_encoder.") for k in stored)
    assert {"logit_scale", "image_projection.weight", "pool.query", "text.token_embedding.weight"} <= set(stored)
    saved = json.loads((result.checkpoint / "model.json").read_text())
    assert saved["frozen"] == ["image_encoder"] and saved["settings"]["image_run"] == key
    summary = result.summary
    assert summary["steps"] == 4
    assert summary["parameters"] - summary["trainable_parameters"] == sum(p.numel() for p in encoder.parameters())
    with pytest.raises(CheckpointError, match="no longer lent"):  # the lent encoder went back with the block
        load_model(None, checkpoint=result.checkpoint)


def test_a_saved_lit_run_over_a_clip_checkpoint_reloads_with_the_same_features(tmp_path):
    from clipforge.engine.checkpointing import TrainingState, save_checkpoint
    from clipforge.models.checkpoint import save_model_weights
    from clipforge.models.factory import write_model_json

    torch.manual_seed(0)
    clip = create_model(ModelConfig(name="clipforge-vit-micro"))
    clip_folder = tmp_path / "clip_checkpoint"
    clip_folder.mkdir()
    save_model_weights(clip.model, clip_folder / "model.safetensors")
    write_model_json(clip, clip_folder)
    settings = tmp_path / "lit.json"
    settings.write_text(json.dumps({"image_run": str(clip_folder)}))  # lit-small's values for the rest
    bundle = create_model(ModelConfig(family="lit", name=str(settings)))
    model = bundle.model
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = bundle.tokenizer(["a red circle", "two blue squares", "a dotted star", "a cyan hexagon"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model.encode_image(images, normalize=True) @ model.encode_text(texts, normalize=True).T
    nn.functional.cross_entropy(logits * model.logit_scale.exp(), torch.arange(4)).backward()
    optimizer.step()  # the trained parts move away from any fresh initialisation
    folder = save_checkpoint(tmp_path / "checkpoints", bundle, {"main": optimizer}, None, TrainingState(step=1), [],
                             {}, keep_last=1, is_best=False)
    assert not any(k.startswith("image_encoder.") for k in load_file(str(folder / "model.safetensors")))
    loaded, preprocess, tokenizer = load_model(None, checkpoint=folder)  # model.json alone: it finds the CLIP run
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokenizer(["a red circle"])), model.encode_text(texts[:1]))
    assert json.loads((folder / "model.json").read_text())["settings"]["image_run"] == str(clip_folder.resolve())
    with torch.no_grad():  # the CLIP run's weights change: its LiT run no longer describes it
        clip.model.visual.conv1.weight.add_(1.0)
    save_model_weights(clip.model, clip_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="weights changed"):
        load_model(None, checkpoint=folder)


@pytest.mark.parametrize(("family", "name"), [("clip", "clipforge-vit-micro"), ("lcl", "lcl-tiny")])
def test_lit_retrieval_end_to_end_through_the_suite(tmp_path, monkeypatch, family, name):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the task's temporary run folder goes here
    torch.manual_seed(0)
    model = create_model(ModelConfig(family=family, name=name), "cpu").model
    model.train()
    before, flags = snapshot(model), [p.requires_grad for p in model.parameters()]
    datasets = synth_eval_datasets(num_eval=48, image_size=32, groups=("base",), variants=[])
    preprocess = open_clip.image_transform(32, is_train=False)
    settings = {"lit_steps": 8, "lit_batch_size": 32}
    rng = torch.get_rng_state()
    summary = lit_suite(model, preprocess, datasets, **settings)
    assert torch.equal(torch.get_rng_state(), rng)  # the nested run leaves the caller's random state alone
    assert_same_weights(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training  # as the suite found it
    assert not list(tmp_path.glob("clipforge-lit-*"))  # the temporary run is gone
    (record,) = summary["results"]
    assert record["task"] == "lit_retrieval" and set(record["metrics"]) == RECALL_KEYS
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert record["settings"]["steps"] == 8 and record["settings"]["train_batch_size"] == 32
    assert record["settings"]["lr"] == EvalConfig().lit_lr
    assert record["details"]["num_train_pairs"] == 4 * 48 and math.isfinite(record["details"]["final_loss"])
    kept = lit_suite(model, preprocess, datasets, lit_run_dir=str(tmp_path / "kept"), **settings)
    assert kept["results"][0]["metrics"] == record["metrics"]  # deterministic: the same numbers, kept or not
    run_dir = tmp_path / "kept" / "synthscenes-base" / "run"
    assert (run_dir / "summary.json").is_file() and kept["results"][0]["settings"]["run_dir"] == str(run_dir)


def test_the_task_is_skipped_without_image_tokens_or_a_captioned_training_split():
    toy = create_model(ModelConfig(family="toy", name="toy-classifier-tiny")).model
    dataset = word_dataset()
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(toy, transforms.ToTensor(), None, EvalConfig(tasks=["lit_retrieval"]), dataset)
    assert summary["results"] == [] and "needs image_tokens" in summary["skipped"][0]["reason"]
    dataset.train = None
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(CodeEncoder(), transforms.ToTensor(), None, EvalConfig(tasks=["lit_retrieval"]), dataset)
    assert summary["results"] == [] and "training split with captions" in summary["skipped"][0]["reason"]


def test_a_lit_model_without_an_image_encoder_is_one_config_line(tmp_path):
    with pytest.raises(ConfigError, match="no image encoder: set 'image_run'") as caught:
        create_model(ModelConfig(family="lit", name="lit-small"))
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="not a lit variant"):
        create_model(ModelConfig(family="lit", name="lit-nope"))
    with pytest.raises(ConfigError, match="takes model_kwargs"):  # e.g. SigLIP's bias: not an objective for lit
        create_model(ModelConfig(family="lit", name="lit-tiny"), model_kwargs={"init_logit_bias": 0.0})
