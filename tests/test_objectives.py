"""CLIP and SigLIP losses against open_clip's own loss classes and hand-computed answers; optimiser groups
and the learning-rate schedule against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from clipforge.config import load_config
from clipforge.data.batches import ImageTextBatch
from clipforge.engine.optim import learning_rate, parameter_groups
from clipforge.errors import ConfigError
from clipforge.models import create_model
from clipforge.objectives import build_objective, objective_model_kwargs
from clipforge.objectives.clip import MAX_LOGIT_SCALE
from clipforge.objectives.contrastive import contrastive_loss
from clipforge.objectives.siglip import sigmoid_loss


def unit_features(rows: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


def naive_infonce(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """The paper's formula row by row: -(1/N) sum_i log softmax_j(s x_i.y_j)[i], both directions, halved."""
    total = 0.0
    rows = images.shape[0]
    for i in range(rows):
        i2t = scale * images[i] @ texts.T
        t2i = scale * texts[i] @ images.T
        total = total - (i2t[i] - torch.logsumexp(i2t, 0)) - (t2i[i] - torch.logsumexp(t2i, 0))
    return total / rows / 2


def test_contrastive_loss_matches_formula_and_open_clip():
    images, texts = unit_features(8, seed=1), unit_features(8, seed=2)
    scale = torch.tensor(14.285714, dtype=torch.float64)
    ours, metrics = contrastive_loss(images, texts, scale)
    torch.testing.assert_close(ours, naive_infonce(images, texts, float(scale)), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, ClipLoss()(images, texts, scale), rtol=0, atol=1e-12)
    expected_acc = ((scale * images @ texts.T).argmax(1) == torch.arange(8)).double().mean()
    assert float(metrics["i2t_acc"]) == pytest.approx(float(expected_acc))


def test_masked_rows_equal_the_loss_over_valid_rows_only():
    images = unit_features(10, seed=3).requires_grad_()
    texts = unit_features(10, seed=4)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    scale = torch.tensor(20.0, dtype=torch.float64)
    masked, _ = contrastive_loss(images, texts, scale, valid=valid)
    masked.backward()
    reference_images = images.detach()[valid].requires_grad_()
    reference = naive_infonce(reference_images, texts[valid], 20.0)
    reference.backward()
    torch.testing.assert_close(masked, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(images.grad[valid], reference_images.grad, rtol=0, atol=1e-12)
    assert torch.all(images.grad[~valid] == 0)  # padding rows get no gradient


def test_all_rows_invalid_gives_zero_loss_not_nan():
    images = unit_features(4, seed=5).requires_grad_()
    loss, _ = contrastive_loss(images, unit_features(4, seed=6), torch.tensor(10.0, dtype=torch.float64),
                               valid=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(images.grad == 0)


def test_sigmoid_loss_matches_open_clip_and_the_closed_form():
    images, texts = unit_features(6, seed=7), unit_features(6, seed=8)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours, _ = sigmoid_loss(images, texts, scale, bias)
    torch.testing.assert_close(ours, SigLipLoss()(images, texts, scale, bias), rtol=0, atol=1e-10)
    # closed form for identical, orthonormal image and text embeddings: the positives have logit s + b,
    # the negatives have logit b; L = -(1/B) [B log sigma(s+b) + B(B-1) log sigma(-b)]
    basis = torch.eye(6, dtype=torch.float64)
    expected = -(math.log(1 / (1 + math.exp(-0.0))) + 5 * math.log(1 / (1 + math.exp(-10.0))))
    got, _ = sigmoid_loss(basis, basis, scale, bias)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def micro_config(objective: str = "clip"):
    return load_config(overrides=["model.name=clipforge-vit-micro", f"objective.name={objective}"])


def micro_batch(model, tokenizer, rows: int = 4) -> ImageTextBatch:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    texts = tokenizer([f"a {c} circle" for c in ("red", "blue", "green", "pink", "cyan", "gray")[:rows]])
    return ImageTextBatch(images=images, texts=texts, labels=torch.full((rows,), -1), keys=[str(i) for i in range(rows)])


def test_clip_objective_equals_open_clip_loss_on_the_model_and_clamps_temperature():
    config = micro_config("clip")
    _bundle = create_model(config.model)
    model, tokenizer = _bundle.model, _bundle.tokenizer
    objective = build_objective(config, model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))  # open_clip's initial value
    batch = micro_batch(model, tokenizer)
    out = objective(model, batch)
    with torch.no_grad():
        image = model.encode_image(batch.images, normalize=True)
        text = model.encode_text(batch.texts, normalize=True)
        reference = ClipLoss()(image, text, model.logit_scale.exp())
    torch.testing.assert_close(out.total.detach(), reference, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    objective.after_step(model)
    assert float(model.logit_scale.detach()) == pytest.approx(MAX_LOGIT_SCALE)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    objective.after_step(model)
    assert float(model.logit_scale.detach()) == 0.0


def test_siglip_objective_creates_scale_and_bias_and_matches_open_clip():
    config = micro_config("siglip")
    _bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    model, tokenizer = _bundle.model, _bundle.tokenizer
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(10))
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
    objective = build_objective(config, model)
    batch = micro_batch(model, tokenizer)
    out = objective(model, batch)
    with torch.no_grad():
        image = model.encode_image(batch.images, normalize=True)
        text = model.encode_text(batch.texts, normalize=True)
        reference = SigLipLoss()(image, text, model.logit_scale.exp(), model.logit_bias)
    torch.testing.assert_close(out.total.detach(), reference, rtol=1e-6, atol=1e-5)
    out.total.backward()
    assert model.logit_bias.grad is not None and float(model.logit_bias.grad) != 0.0  # the bias learns


def test_siglip_without_a_bias_parameter_is_a_config_error():
    config = micro_config("siglip")
    model = create_model(config.model).model  # no init_logit_bias -> no logit_bias
    with pytest.raises(ConfigError, match="logit_bias"):
        build_objective(config, model)


def test_unknown_objective_is_a_one_line_config_error():
    from clipforge.objectives.registry import objective_class

    with pytest.raises(ConfigError, match="unknown objective .nope."):
        objective_class("nope")


def test_no_weight_decay_on_gains_biases_and_temperature():
    config = micro_config("siglip")
    model = create_model(config.model, model_kwargs=objective_model_kwargs(config)).model
    no_decay_names = create_model(config.model, model_kwargs=objective_model_kwargs(config)).no_weight_decay
    decay, no_decay = parameter_groups(list(model.named_parameters()), 0.2, 1e-3, no_decay_names)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias", "visual.class_embedding", "ln_final.weight", "ln_final.bias",
            "visual.transformer.resblocks.0.attn.in_proj_bias"} <= exempt
    assert {"visual.proj", "text_projection", "visual.conv1.weight", "token_embedding.weight",
            "transformer.resblocks.0.mlp.c_fc.weight"} <= decayed
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.2
    assert no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(exempt) == len(list(model.parameters()))
    model.lock_image_tower()
    decay, no_decay = parameter_groups(list(model.named_parameters()), 0.2, 1e-3, no_decay_names)
    assert not any(n.startswith("visual.") for n, p in model.named_parameters()
                   if any(p is q for q in decay["params"] + no_decay["params"]))


def test_learning_rate_schedule_warmup_then_cosine_or_constant():
    assert learning_rate(0, 1.0, 10, 110, "cosine") == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, 110, "cosine") == pytest.approx(1.0)
    assert learning_rate(10, 1.0, 10, 110, "cosine") == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, 110, "cosine") == pytest.approx(0.5)  # half way down the cosine
    assert learning_rate(110, 1.0, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(85, 1.0, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert learning_rate(500, 2.0, 10, 110, "constant") == 2.0
    assert learning_rate(4, 2.0, 10, 110, "constant") == pytest.approx(1.0)
