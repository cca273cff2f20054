"""The embedded latent diffusion model: the `autoencoder` and `diffusion` families and objectives, trained through the
engine, exported as a diffusers folder, and loaded by clipforge's GeNIe loader and by diffusers' own pipelines.

Every model is tiny and trained for a few steps here (a CLIP run for the text tower, an autoencoder run, a
diffusion run over both); nothing is downloaded (HF_HUB_OFFLINE is set by the suite).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from clipforge.config import ModelConfig, load_config
from clipforge.errors import CheckpointError, ConfigError
from tests import test_families as registry_wide

NAMES = {"clip": "clipforge-vit-micro", "autoencoder": "autoencoder-tiny", "diffusion": "diffusion-tiny"}


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


def write_config(folder: Path, shards: Path, name: str, family: str, objective: dict, steps: int) -> Path:
    body = {"name": name, "seed": 0, "output_dir": str(folder / name),
            "data": {"train": str(shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
            "model": {"family": family, "name": NAMES[family]}, "objective": objective,
            "train": {"max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "tensorboard": False,
                      "progress": False}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(body))
    return folder / f"{name}.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards) -> dict[str, Path]:
    """Run folders: a CLIP, an autoencoder, and a diffusion model over both (a few steps each), and its export."""
    from clipforge.engine.loop import train
    from clipforge.models.diffusers_export import export_diffusers

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ldm")
    runs = {"clip": train(load_config(write_config(folder, tiny_shards, "clip", "clip", {"name": "clip"}, 2))).run_dir,
            "autoencoder": train(load_config(write_config(folder, tiny_shards, "ae", "autoencoder",
                                                          {"name": "autoencoder"}, 3))).run_dir}
    objective = {"name": "diffusion", "diffusion": {"text": str(runs["clip"]), "autoencoder": str(runs["autoencoder"]),
                                                    "caption_dropout": 0.25}}
    runs["diffusion"] = train(load_config(write_config(folder, tiny_shards, "ldm", "diffusion", objective, 3))).run_dir
    runs["export"] = export_diffusers(runs["diffusion"], folder / "exported")
    torch.set_num_threads(before)
    return runs


# ---- registry-wide checks, for both pairs ----------------------------------------------------------------------

@pytest.mark.parametrize("pair", [("autoencoder", "autoencoder"), ("diffusion", "diffusion")])
def test_registry_wide_checks(tmp_path, tiny_shards, pair):
    for check in (registry_wide.test_one_step_gives_every_trainable_parameter_a_finite_gradient,
                  registry_wide.test_a_checkpoint_reloads_from_its_folder_alone):
        folder = tmp_path / check.__name__
        folder.mkdir()
        check(folder, tiny_shards, *pair)


# ---- the objectives, against the formulas --------------------------------------------------------------------

def test_the_diffusion_loss_is_noise_prediction_on_the_ddpm_forward_process():
    """Same RNG draws by hand: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, loss = mse(UNet(z_t, t, c), eps)."""
    from clipforge.data.batches import ImageTextBatch
    from clipforge.models import create_model
    from clipforge.objectives.diffusion import DiffusionObjective

    torch.manual_seed(0)
    model = create_model(ModelConfig(family="diffusion", name="diffusion-tiny")).model
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    texts = model.tokenize(["a red circle", "a blue square", "a green star", "a pink heart"])
    batch = ImageTextBatch(images=images, texts=texts, labels=torch.zeros(4, dtype=torch.long), keys=list("abcd"))
    objective = DiffusionObjective()
    objective.settings.caption_dropout = 0.0
    torch.manual_seed(7)
    loss = objective(model, batch).losses["diffusion"]

    torch.manual_seed(7)
    posterior = model.vae.encode(images).latent_dist
    z = posterior.sample()
    scale = 1.0 / z.std(unbiased=False)
    assert torch.allclose(model.scaling_factor, scale, rtol=1e-5)  # measured at the first step
    z0 = z * scale
    eps = torch.randn_like(z0)
    t = torch.randint(0, 1000, (4,))
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    expected = torch.nn.functional.mse_loss(model.unet(noisy, t, encoder_hidden_states=model.text_states(texts))
                                            .sample, eps)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    before = model.scaling_factor.clone()
    objective(model, batch)
    assert torch.equal(model.scaling_factor, before)  # measured once, then kept


def test_the_autoencoder_loss_is_reconstruction_plus_weighted_kl():
    from clipforge.config import AutoencoderObjectiveConfig
    from clipforge.data.batches import LabelledImageBatch
    from clipforge.models import create_model
    from clipforge.objectives.diffusion import AutoencoderObjective

    torch.manual_seed(0)
    model = create_model(ModelConfig(family="autoencoder", name="autoencoder-tiny")).model
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = LabelledImageBatch(images=images, labels=torch.zeros(2, dtype=torch.long), keys=["a", "b"])
    torch.manual_seed(3)
    out = AutoencoderObjective(AutoencoderObjectiveConfig(kl_weight=0.5))(model, batch)
    torch.manual_seed(3)
    posterior = model.vae.encode(images).latent_dist
    reconstruction = model.vae.decode(posterior.sample()).sample
    mean, logvar = posterior.mean, posterior.logvar
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()  # KL(N(m, s^2) || N(0, 1))
    assert torch.allclose(out.losses["reconstruction"], (reconstruction - images).abs().mean(), rtol=1e-5)
    assert torch.allclose(out.losses["kl"], 0.5 * kl, rtol=1e-4)


# ---- the frozen parts and the export -------------------------------------------------------------------------

def test_the_text_tower_is_the_clip_runs_own(trained):
    """The diffusion model's CLIPTextModel, pooled and projected with the CLIP's projection, is open_clip's
    encode_text of the same run; the text tower and the VAE are referenced, not stored in the checkpoint."""
    from clipforge.models import load_model
    from clipforge.models.factory import find_model_weights

    clip, _, clip_tokenizer = load_model(None, checkpoint=trained["clip"])
    model, _, tokenizer = load_model(None, checkpoint=trained["diffusion"])
    captions = ["a red circle left of a blue square", "a small dotted star"]
    tokens = tokenizer(captions)
    assert tokens.shape == (2, model.text_encoder.config.max_position_embeddings)
    assert int(tokens[1, -1]) == model.tokenizer.eos_token_id  # padded with EOT, as the exported tokenizer
    pooled = model.text_encoder(tokens).pooler_output
    with torch.no_grad():
        expected = clip.encode_text(clip_tokenizer(captions))
    assert torch.allclose(pooled @ clip.text_projection, expected, atol=1e-5)
    folder = find_model_weights(trained["diffusion"]).parent
    stored = load_file(str(folder / "model.safetensors"))
    assert stored and all(k.startswith("unet.") or k == "scaling_factor" for k in stored)
    settings = json.loads((folder / "model.json").read_text())["settings"]
    assert settings["text"]["run"] == str(trained["clip"].resolve())
    assert settings["autoencoder"]["sha256"] and settings["autoencoder"]["run"] == str(trained["autoencoder"].resolve())


def test_the_export_loads_in_clipforge_and_in_diffusers_pipelines(trained):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from clipforge.augment.diffusion import load_diffusion
    from clipforge.models import load_model

    model = load_model(None, checkpoint=trained["diffusion"])[0]
    components = load_diffusion(trained["export"])
    assert components.image_size == 16 and components.downsample == 2
    assert components.scaling_factor == pytest.approx(float(model.scaling_factor))
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(components.unet.state_dict()[name], tensor), name
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(trained["export"])
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    out = pipe("a red circle", image=image, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    text_to_image = StableDiffusionPipeline.from_pretrained(trained["export"])
    text_to_image.set_progress_bar_config(disable=True)
    assert text_to_image(["a star"], num_inference_steps=2, height=16, width=16, output_type="pt").images.shape == \
        (1, 3, 16, 16)


def test_generate_is_genie_txt2img_and_per_sample(trained):
    """The family's `generate` is the GeNIe sampler at r = 1 over the exported folder's components (same images),
    and a sample does not depend on the other prompts of the call."""
    from clipforge.augment.diffusion import load_diffusion
    from clipforge.augment.sampler import encode_prompts, generate
    from clipforge.data.transforms import sample_seed
    from clipforge.models import load_model

    model = load_model(None, checkpoint=trained["diffusion"])[0]
    both = model.generate(["a red circle", "a blue star"], num_per_prompt=2, seed=1, steps=4)
    alone = model.generate(["a blue star"], num_per_prompt=2, seed=1, steps=4)
    assert both.shape == (4, 3, 16, 16) and torch.allclose(both[2:], alone, atol=1e-5)
    components = load_diffusion(trained["export"])
    seeds = [sample_seed("generate", 1, "a blue star", n) for n in range(2)]
    reference = generate(components, images=None, prompt_embeds=encode_prompts(components, ["a blue star"] * 2),
                         negative_embeds=encode_prompts(components, [""]), ratios=[1.0, 1.0], seeds=seeds, steps=4,
                         guidance=model.settings["guidance"])
    assert torch.allclose(alone, reference * 2 - 1, atol=1e-5)


def test_changed_frozen_weights_and_wrong_runs_are_refused(trained, tmp_path, tiny_shards):
    from clipforge.engine.loop import train
    from clipforge.models import load_model
    from clipforge.models.diffusers_export import export_diffusers
    from clipforge.models.factory import find_model_weights

    with pytest.raises(ConfigError, match="not a clip model"):  # the text tower must come from a CLIP run
        objective = {"name": "diffusion", "diffusion": {"text": str(trained["autoencoder"])}}
        train(load_config(write_config(tmp_path, tiny_shards, "bad", "diffusion", objective, 1)))
    with pytest.raises(ConfigError, match="exports a diffusion-family run"):
        export_diffusers(trained["clip"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="trains a model of the autoencoder family"):
        train(load_config(write_config(tmp_path, tiny_shards, "bad2", "diffusion", {"name": "autoencoder"}, 1)))
    weights = find_model_weights(trained["autoencoder"])
    original = weights.read_bytes()
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 0.01
    save_file(state, str(weights))
    try:
        with pytest.raises(CheckpointError, match="trained over the autoencoder") as caught:
            load_model(None, checkpoint=trained["diffusion"])
        assert "\n" not in str(caught.value)
    finally:
        weights.write_bytes(original)


# ---- the genie_edits task (GeNIe's label check) ---------------------------------------------------------------

class ThresholdEditor(torch.nn.Module):
    """An editor whose edit is the source below r = 0.6 and the target colour from there on."""

    capabilities = frozenset({"edit"})
    image_size = 16

    def edit(self, images, prompts, ratios, seeds):
        from test_code_prior import COLOURS

        painted = torch.tensor([COLOURS[next(n for n in COLOURS if n in p)] for p in prompts], dtype=torch.float32)
        painted = painted[:, :, None, None].expand(-1, -1, 16, 16) / 127.5 - 1
        keep = torch.tensor([r < 0.6 for r in ratios])[:, None, None, None]
        return torch.where(keep, images, painted)


def run_genie_edits(model, judge: Path, ratios: list[float]) -> dict:
    """The task's record as the report reads it back (with its examples)."""
    from test_code_prior import colour_dataset

    from clipforge.config import EvalConfig
    from clipforge.eval.results import read_results
    from clipforge.eval.suite import run_suite

    config = EvalConfig(tasks=["genie_edits"], genie_sources=6, genie_ratios=ratios, feature_run=str(judge))
    out = judge.parent / "eval"
    run_suite(model, None, None, config, colour_dataset(2), out, templates=["a {}."])
    return read_results(out / "eval")[0]


def test_genie_edits_finds_the_flip_where_the_edits_take_the_target_class(tmp_path, monkeypatch):
    from test_code_prior import judge_run

    judge = judge_run.__wrapped__(tmp_path, monkeypatch)
    result = run_genie_edits(ThresholdEditor(), judge, [0.3, 0.5, 0.6, 0.8, 1.0])
    metrics = result["metrics"]
    assert metrics["real_acc1"] == 1.0
    for r in ("0.3", "0.5"):
        assert metrics[f"flip_target_r{r}"] == 0.0 and metrics[f"flip_source_r{r}"] == 1.0
    for r in ("0.6", "0.8", "1"):
        assert metrics[f"flip_target_r{r}"] == 1.0 and metrics[f"flip_source_r{r}"] == 0.0
    assert metrics["flip_point"] == 0.6
    assert all(s != t for s, t in zip(result["details"]["source_classes"], result["details"]["target_classes"]))
    assert len(result["_examples"]["rows"]) == 6 and result["_examples"]["curve_png_base64"]
    from clipforge.eval.report_sections import genie_edits_section

    assert "flip at r = 0.6" in genie_edits_section([result])
    from clipforge.eval.results import is_fraction

    assert not is_fraction("flip_point", 0.6) and is_fraction("flip_target_r0.6", 1.0)  # r is shown as r, not %


def test_genie_edits_refuses_a_ratio_outside_zero_one(tmp_path, monkeypatch):
    from test_code_prior import judge_run

    judge = judge_run.__wrapped__(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"eval.genie_ratios must be distinct noise ratios in \(0, 1\]"):
        run_genie_edits(ThresholdEditor(), judge, [0.5, 1.5])


def test_genie_edits_runs_on_the_trained_diffusion_model(trained, tmp_path, monkeypatch):
    from test_code_prior import judge_run

    from clipforge.models import load_model

    model = load_model(None, checkpoint=trained["diffusion"])[0]
    judge = judge_run.__wrapped__(tmp_path, monkeypatch)
    metrics = run_genie_edits(model, judge, [0.5, 1.0])["metrics"]
    for r in ("0.5", "1"):
        assert 0.0 <= metrics[f"flip_target_r{r}"] + metrics[f"flip_source_r{r}"] <= 1.0


def test_augment_genie_takes_the_exported_model_like_any_diffusers_folder(trained, tmp_path, tiny_shards):
    """The embedded model goes through the tool's one loader: edits of the tiny shards toward two classes."""
    from clipforge.augment.genie import augment_genie
    from clipforge.augment.plan import GenieOptions
    from clipforge.reproduce.genie_data import read_images

    targets = ["red circle", "blue square"]
    result = augment_genie(str(tiny_shards), trained["export"], tmp_path / "edits", targets=targets,
                           options=GenieOptions(steps=4, guidance=2.0, shard_size=64), batch_size=32)
    records = read_images(tmp_path / "edits")
    assert result.complete and len(records) == result.num_samples > 0
    assert {meta["target_class"] for meta, _ in records} <= set(targets)
    assert all(image.size == (16, 16) for _, image in records)  # the model's own image side
