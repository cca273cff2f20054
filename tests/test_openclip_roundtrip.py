"""What we save loads into plain open_clip with identical embeddings, and open_clip checkpoints load into us."""

from __future__ import annotations

import open_clip
import torch
from safetensors.torch import save_file

from clipforge.config import ModelConfig, load_config
from clipforge.data.batches import ImageTextBatch
from clipforge.engine.checkpointing import TrainingState, save_checkpoint
from clipforge.models import create_model, load_model
from clipforge.objectives import build_objective, objective_model_kwargs

CAPTIONS = ["a large red circle left of a small blue square", "a green star", "two yellow triangles"]


def trained_model(objective: str = "clip"):
    """A micro model after a few optimiser steps, so its weights differ from any fresh initialisation."""
    config = load_config(overrides=["model.name=clipforge-vit-micro", f"objective.name={objective}"])
    torch.manual_seed(3)
    _bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    model, tokenizer = _bundle.model, _bundle.tokenizer
    objective_module = build_objective(config, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = ImageTextBatch(images=torch.randn(3, 3, 32, 32), texts=tokenizer(CAPTIONS),
                           labels=torch.full((3,), -1), keys=["a", "b", "c"])
    for _ in range(3):
        objective_module(model, batch).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _bundle, optimizer, tokenizer


@torch.no_grad()
def embeddings(model, tokenizer):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    return model.encode_image(images), model.encode_text(tokenizer(CAPTIONS))


def test_our_checkpoint_loads_into_plain_open_clip_with_identical_embeddings(tmp_path):
    bundle, optimizer, tokenizer = trained_model("clip")
    model = bundle.model.eval()
    folder = save_checkpoint(tmp_path, bundle, {"main": optimizer}, None, TrainingState(step=3), [], {}, keep_last=1,
                             is_best=False)
    plain = open_clip.create_model("clipforge-vit-micro", pretrained=str(folder / "model.safetensors")).eval()
    ours_image, ours_text = embeddings(model, tokenizer)
    plain_image, plain_text = embeddings(plain, open_clip.get_tokenizer("clipforge-vit-micro"))
    assert torch.equal(ours_image, plain_image) and torch.equal(ours_text, plain_text)
    assert torch.equal(model.logit_scale, plain.logit_scale)


def test_a_siglip_checkpoint_keeps_its_bias_in_open_clip_and_in_load_model(tmp_path):
    bundle, optimizer, tokenizer = trained_model("siglip")
    model = bundle.model.eval()
    folder = save_checkpoint(tmp_path, bundle, {"main": optimizer}, None, TrainingState(step=3), [], {}, keep_last=1,
                             is_best=False)
    weights = str(folder / "model.safetensors")
    plain = open_clip.create_model("clipforge-vit-micro", pretrained=weights, init_logit_bias=-10.0)
    assert torch.equal(plain.logit_bias, model.logit_bias) and float(model.logit_bias.detach()) != -10.0
    loaded, _, _ = load_model("clipforge-vit-micro", checkpoint=folder)  # model.json says it has a bias
    assert torch.equal(loaded.logit_bias, model.logit_bias)
    assert torch.equal(embeddings(loaded, tokenizer)[0], embeddings(model, tokenizer)[0])


def test_an_open_clip_state_dict_loads_as_pretrained_weights(tmp_path):
    torch.manual_seed(5)
    plain = open_clip.create_model("clipforge-vit-micro").eval()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "user.safetensors"))
    _bundle = create_model(ModelConfig(name="clipforge-vit-micro",
                                                     pretrained=str(tmp_path / "user.safetensors")))
    ours, tokenizer = _bundle.model, _bundle.tokenizer
    for a, b in zip(embeddings(ours.eval(), tokenizer), embeddings(plain, tokenizer)):
        assert torch.equal(a, b)
    # open_clip_train's own format: a pickled {"state_dict": {"module.<key>": ...}} that the user trusts
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    trusted = create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(tmp_path / "epoch_1.pt"),
                                                trust_pickle=True)).model
    assert torch.equal(embeddings(trusted.eval(), tokenizer)[1], embeddings(plain, tokenizer)[1])
