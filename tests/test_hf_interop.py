"""Hugging Face transformers interop: exported CLIPModel folders equal the open_clip model they came from, read by
plain transformers in a process with nothing of clipforge imported; transformers folders import for training,
fine-tuning and evaluation and export back unchanged; what cannot be converted is refused with one line."""

from __future__ import annotations

import html
import json
import random
import shutil

import ftfy
import open_clip
import pytest
import torch
from helpers.hf_parity import CAPTIONS, Case, measure, random_transformers_folder, save, trained_model
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.config import ModelConfig, load_config
from clipforge.errors import ConfigError
from clipforge.models import create_model, load_model, resolve_model_name
from clipforge.models.hf import UnsupportedArchitecture, export_open_clip, export_transformers
from clipforge.models.hf.architecture import open_clip_architecture, transformers_config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    return random_transformers_folder(tmp_path_factory.mktemp("random") / "tiny-random-clip")


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    return save(trained_model("siglip"), tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_folder, siglip_checkpoint):
    """Both round trips exported, and the parity figures measured (tests/helpers/hf_parity.py)."""
    root = tmp_path_factory.mktemp("hf_interop")
    cases = []
    # (1) a trained clipforge model -> transformers and open_clip folders
    checkpoint = save(trained_model("clip"), root / "micro")
    export_transformers(checkpoint, root / "micro-hf")
    export_open_clip(checkpoint, root / "micro-oc")
    cases.append(Case("clipforge", *load_model(None, checkpoint=checkpoint), root / "micro-hf", root / "micro-oc"))
    # (2) a tiny random transformers CLIPModel -> imported (model.name = the folder) -> checkpoint -> exported
    checkpoint = save(create_model(ModelConfig(name=str(random_folder))), root / "imported")
    export_transformers(checkpoint, root / "random-hf")
    export_open_clip(checkpoint, root / "random-oc")
    cases.append(Case("transformers", *load_model(None, checkpoint=checkpoint), root / "random-hf", root / "random-oc",
                      original_folder=random_folder))
    # (3) a SigLIP-trained model: open_clip's format keeps its logit_bias
    export_open_clip(siglip_checkpoint, root / "siglip-oc")
    cases.append(Case("siglip", *load_model(None, checkpoint=siglip_checkpoint), open_clip_folder=root / "siglip-oc"))
    return {"root": root, "figures": measure(cases, root / "work")}


def test_the_transformers_side_ran_with_nothing_of_clipforge_imported(exported):
    modules = exported["figures"]["modules"]
    assert modules["after_transformers"] == []  # neither clipforge nor open_clip
    assert not [m for m in modules["after_open_clip"] if m.startswith("clipforge")]


@pytest.mark.parametrize("case", ["clipforge", "transformers"])
def test_exported_clip_model_equals_open_clip(exported, case):
    figures = exported["figures"][case]["transformers"]
    assert figures["image_max_diff"] <= TOLERANCE and figures["text_max_diff"] <= TOLERANCE
    assert figures["own_tokens_text_max_diff"] <= TOLERANCE  # its own tokenizer's ids (padding differs) too
    assert figures["text_model_with_projection_max_diff"] <= TOLERANCE  # CLIPTextModelWithProjection, for diffusers
    assert figures["captions_with_equal_tokens"] == f"{len(CAPTIONS)}/{len(CAPTIONS)}"
    # CLIPImageProcessor = the eval transform: exactly with the PIL backend (open_clip resizes with PIL); within
    # one intensity level of a downscaled pixel with transformers' default torchvision backend
    assert figures["pil_backend_pixel_max_diff"] <= 1e-6
    assert figures["own_preprocessing_pixel_max_diff"] <= 1.0001 / 255 / min(open_clip.OPENAI_DATASET_STD + (0.5,))
    # zero-shot on SynthScenes, each side with its own preprocessing and tokenizer: the same prediction for every
    # image with either image-processor backend; with PIL's, every logit (100 x cosine) agrees within 1e-3
    for backend in ("", "_pil"):
        assert figures[f"zeroshot_same_predictions{backend}"] == "96/96"
        assert figures[f"zeroshot_acc1_exported{backend}"] == figures["zeroshot_acc1_open_clip"]
    assert figures["zeroshot_logits_max_diff_pil"] <= 1e-3
    assert figures["logit_scale_equal"]


@pytest.mark.parametrize("case", ["clipforge", "transformers", "siglip"])
def test_exported_open_clip_folder_loads_in_plain_open_clip(exported, case):
    figures = exported["figures"][case]["open_clip"]
    assert figures["image_max_diff"] == 0.0 and figures["text_max_diff"] == 0.0 and figures["logit_scale_equal"]
    assert figures["captions_with_equal_tokens"] == f"{len(CAPTIONS)}/{len(CAPTIONS)}"
    assert figures["own_preprocessing_pixel_max_diff"] == 0.0
    if case == "siglip":
        assert figures["logit_bias_equal"]


def test_an_imported_transformers_model_equals_its_folder_and_exports_back_bit_for_bit(exported, random_folder):
    figures = exported["figures"]["transformers"]["original"]
    assert figures["image_max_diff"] <= TOLERANCE and figures["text_max_diff"] <= TOLERANCE
    original = load_file(str(random_folder / "model.safetensors"))
    again = load_file(str(exported["root"] / "random-hf" / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    before = json.loads((random_folder / "config.json").read_text())
    after = json.loads((exported["root"] / "random-hf" / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_act", "layer_norm_eps", "hidden_size", "intermediate_size", "num_attention_heads"):
            assert after[tower][key] == before[tower][key]
    assert after["text_config"]["eos_token_id"] == 49407  # pooled at the first eos token, as before
    processor = json.loads((exported["root"] / "random-hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] * 3 and processor["image_std"] == [0.5] * 3


def test_an_exported_folder_and_an_older_layout_import_as_the_model_they_hold(exported, tmp_path):
    """Our own export (argmax pooling, eos_token_id 2) imports back exactly; so does the layout of older hub
    folders: integer `size`/`crop_size`, no rescale_factor, a saved position_ids buffer."""
    from safetensors.torch import save_file

    reference, _, tokenizer = load_model(None, checkpoint=exported["root"] / "micro" / "step_00000003")
    older = shutil.copytree(exported["root"] / "micro-hf", tmp_path / "older")
    for name in ("processor_config.json", "tokenizer.json"):
        (older / name).unlink()
    (older / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 32,
        "image_mean": list(open_clip.OPENAI_DATASET_MEAN), "image_std": list(open_clip.OPENAI_DATASET_STD),
        "feature_extractor_type": "CLIPFeatureExtractor"}))
    state = load_file(str(older / "model.safetensors"))
    state["text_model.embeddings.position_ids"] = torch.arange(24)[None]
    save_file(state, str(older / "model.safetensors"))
    images, tokens = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), tokenizer(CAPTIONS)
    for folder in (exported["root"] / "micro-hf", older):
        bundle = create_model(ModelConfig(name=str(folder)))
        assert bundle.config["architecture"]["text_cfg"].get("pool_type", "argmax") == "argmax"
        with torch.no_grad():
            assert torch.equal(bundle.model.eval().encode_image(images), reference.encode_image(images))
            assert torch.equal(bundle.model.encode_text(tokens), reference.encode_text(tokens))


def test_argmax_pooling_and_activation_map_exactly():
    micro = open_clip.get_model_config("clipforge-vit-micro")
    config = transformers_config(micro)
    assert config["text_config"]["eos_token_id"] == 2  # transformers' argmax(input_ids) pooling, as open_clip's
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    assert transformers_config(open_clip.get_model_config("ViT-B-32-quickgelu"))["text_config"]["hidden_act"] == \
        "quick_gelu"
    back = open_clip_architecture({**config, "text_config": config["text_config"]}, "x")
    assert "pool_type" not in back["text_cfg"] and "quick_gelu" not in back
    eos = open_clip_architecture({**config, "text_config": {**config["text_config"], "eos_token_id": 49407}}, "x")
    assert eos["text_cfg"]["pool_type"] == "eos" and eos["text_cfg"]["eos_id"] == 49407


def test_text_that_ftfy_would_change_needs_cleaning_first_for_equal_tokens(exported):
    """transformers' CLIPTokenizer has no ftfy/html step (documented in the README): curly quotes, entities,
    ligatures and full-width letters tokenize like open_clip's only once cleaned as open_clip cleans them."""
    from transformers import CLIPTokenizer

    texts = ["“curly quotes” and ‘single’", "Tom &amp; Jerry", "ﬁne ligature", "ＦＵＬＬ width"]
    exported_tokenizer = CLIPTokenizer.from_pretrained(exported["root"] / "micro-hf")
    ours = open_clip.get_tokenizer("clipforge-vit-micro")(texts)

    def ids(batch):
        encoded = exported_tokenizer(batch, padding="max_length", truncation=True, return_tensors="pt")
        return encoded.input_ids.masked_fill(encoded.attention_mask == 0, 0)

    assert not torch.equal(ids(texts), ours)
    assert torch.equal(ids([html.unescape(html.unescape(ftfy.fix_text(t))) for t in texts]), ours)
    # and any text that cleaning leaves unchanged gives open_clip's ids: 500 random strings of ASCII, accents,
    # CJK, Hangul, Cyrillic, emoji, dashes and odd whitespace
    alphabet = [chr(c) for c in range(32, 127)] + list("éàüßçñøÆŒ日本語한국어русский🎉🐱\t\n\u00a0—–…")
    rng = random.Random(0)
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    plain = [t for t in strings if html.unescape(html.unescape(ftfy.fix_text(t))) == t]
    assert len(plain) > 450 and torch.equal(ids(plain), open_clip.get_tokenizer("clipforge-vit-micro")(plain))


def test_clipforge_eval_takes_a_transformers_folder(random_folder, tmp_path, capsys):
    assert main(["eval", "--model", str(random_folder), "--tasks", "zeroshot", "--num-eval", "8", "--no-progress",
                 "--no-report", "--out", str(tmp_path / "eval")]) == 0
    assert "with its own weights" in capsys.readouterr().err
    results = [json.loads(p.read_text()) for p in (tmp_path / "eval" / "eval").glob("*zeroshot*.json")]
    assert results and all(0.0 <= r["metrics"]["acc1"] <= 1.0 for r in results)


def test_fineclip_fine_tunes_an_imported_transformers_folder_and_exports_back(tmp_path, random_folder):
    from transformers import CLIPModel

    from clipforge.data.generate import generate_synth_shards
    from clipforge.engine.loop import train

    folder = shutil.copytree(random_folder, tmp_path / "hf-clip")
    shards = tmp_path / "shards"
    generate_synth_shards(shards, num=16, image_size=32, shard_size=16)
    config = load_config(None, [
        "name=finetune", f"output_dir={tmp_path / 'run'}", f"data.train={shards}", "data.batch_size=8",
        "data.max_regions=2", f"model.name={folder}", "objective.name=fineclip", "train.max_steps=2",
        "train.warmup_steps=1", "train.lr=1e-2", "train.device=cpu", "train.tensorboard=false",
        "train.progress=false",
    ])
    result = train(config)
    saved = json.loads((result.checkpoint / "model.json").read_text())
    assert saved["source"] == str(folder) and saved["architecture"]["text_cfg"]["pool_type"] == "eos"
    shutil.rmtree(folder)  # the checkpoint reloads and exports from its model.json alone
    tuned, _, tokenizer = load_model(str(folder), checkpoint=result.run_dir)  # the run's model.name is accepted
    export_transformers(result.run_dir, tmp_path / "tuned-hf")
    hf = CLIPModel.from_pretrained(tmp_path / "tuned-hf").eval()
    images, tokens = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), tokenizer(CAPTIONS)
    with torch.no_grad():
        assert (hf.get_image_features(pixel_values=images).pooler_output - tuned.encode_image(images)).abs().max() \
            <= TOLERANCE
        assert (hf.get_text_features(input_ids=tokens).pooler_output - tuned.encode_text(tokens)).abs().max() \
            <= TOLERANCE
    original, after = load_file(str(random_folder / "model.safetensors")), load_file(
        str(tmp_path / "tuned-hf" / "model.safetensors"))
    text = [k for k in original if k.startswith("text_model.")]
    assert all(torch.equal(original[k], after[k]) for k in text)  # FineCLIP froze the text tower
    assert not torch.equal(original["vision_model.embeddings.patch_embedding.weight"],
                           after["vision_model.embeddings.patch_embedding.weight"])


# ---- bad input: one line each, exit status 2 ---------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    """The error of a command that exits with status 2: one line (after what the command printed before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("clipforge: error:")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def broken_copy(random_folder, tmp_path, name):
    return shutil.copytree(random_folder, tmp_path / name)


def test_a_folder_that_is_not_a_clip_model(tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    assert "'bert' model" in one_line_error(capsys, ["export", "--model", str(bert), str(tmp_path / "o"),
                                                     "--format", "open_clip"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_line_error(capsys, ["export", "--model", str(empty), str(tmp_path / "o"),
                                                       "--format", "open_clip"])
    with pytest.raises(ConfigError, match="'bert' model"):
        resolve_model_name(ModelConfig(name=str(bert)))  # the engine's check before any work


def test_a_config_that_disagrees_with_the_weights(random_folder, tmp_path, capsys):
    for name, tower, key, value, expected in [("wide", "vision_config", "hidden_size", 48, "disagrees with its weights"),
                                              ("deep", "text_config", "num_hidden_layers", 3, "missing")]:
        folder = broken_copy(random_folder, tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        config[tower][key] = value
        (folder / "config.json").write_text(json.dumps(config))
        assert expected in one_line_error(capsys, ["export", "--model", str(folder), str(tmp_path / "o"),
                                                   "--format", "open_clip"])


def test_a_truncated_weights_file(random_folder, tmp_path, capsys):
    folder = broken_copy(random_folder, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "not a readable safetensors file" in one_line_error(
        capsys, ["eval", "--model", str(folder), "--tasks", "zeroshot", "--num-eval", "8", "--out", str(tmp_path / "e")])


def test_the_export_command_writes_a_folder_and_keeps_a_full_one(exported, tmp_path, capsys):
    run = exported["root"] / "micro"  # a checkpoint root with latest.json, like a run's checkpoints/
    out = tmp_path / "hf"
    assert main(["export", str(run / "step_00000003"), str(out), "--format", "transformers"]) == 0
    assert "CLIPModel.from_pretrained" in capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
            "preprocessor_config.json"} <= set(written)
    assert "not empty" in one_line_error(capsys, ["export", str(run / "step_00000003"), str(out), "--format",
                                                  "open_clip"])
    assert sorted(p.name for p in out.iterdir()) == written  # untouched
    assert main(["export", str(run / "step_00000003"), str(out), "--format", "open_clip", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert not list(tmp_path.glob(".*partial"))


def test_a_siglip_trained_run_is_refused_naming_logit_bias(siglip_checkpoint, tmp_path, capsys):
    err = one_line_error(capsys, ["export", str(siglip_checkpoint), str(tmp_path / "hf"), "--format", "transformers"])
    assert "logit_bias" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, part", [
    ("RN50", "a ResNet image tower"),
    ("convnext_base", "a timm (non-ViT) image tower"),
    ("ViT-B-16-SigLIP", "logit_bias"),
    ("coca_ViT-B-32", "CoCa"),
])
def test_open_clip_architectures_transformers_cannot_hold(name, part):
    with pytest.raises(UnsupportedArchitecture, match=part.replace("(", r"\(").replace(")", r"\)")) as caught:
        transformers_config(open_clip.get_model_config(name))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tower, key, value, part", [
    ("vision_cfg", "attentional_pool", True, "an attentional pooler"),
    ("vision_cfg", "ls_init_value", 1e-5, "layer scale"),
    ("vision_cfg", "pool_type", "avg", "'avg' image pooling"),
    ("text_cfg", "no_causal_mask", True, "bidirectional text tower"),
    ("text_cfg", "pool_type", "last", "'last' text pooling"),
    ("text_cfg", "hf_tokenizer_name", "bert-base-uncased", "a tokenizer other than CLIP's BPE"),
    ("text_cfg", "norm_kwargs", {"eps": 1e-6, "elementwise_affine": False}, "layer-norm options"),
])
def test_options_transformers_cannot_hold(tower, key, value, part):
    architecture = open_clip.get_model_config("clipforge-vit-micro")
    architecture[tower][key] = value
    with pytest.raises(UnsupportedArchitecture, match=part):
        transformers_config(architecture)


def test_a_transformers_config_open_clip_cannot_hold():
    config = transformers_config(open_clip.get_model_config("clipforge-vit-micro"))
    config["vision_config"]["hidden_act"] = "quick_gelu"
    with pytest.raises(UnsupportedArchitecture, match="open_clip uses one activation for both towers"):
        open_clip_architecture(config, "folder")


def test_an_unreachable_hub_id_is_one_line():
    with pytest.raises(ConfigError, match="could not be fetched"):
        resolve_model_name(ModelConfig(name="nobody-here/no-such-clip"))
