"""The `diffusion` family: a small text-conditioned latent diffusion model in Stable Diffusion's layout.

    caption -> CLIPTokenizer (padded to the context) -> frozen CLIPTextModel -> states [B, L, D]
    image   -> frozen AutoencoderKL posterior sample * scaling_factor -> z0 [B, 4, S/f, S/f]   (pixel space: z0 = x)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps          (DDPM forward process, Stable Diffusion's betas)
    UNet2DConditionModel(z_t, t, states) -> eps_hat       (the only trained part; the `diffusion` objective)

Every part is a diffusers or transformers class, so `clipforge export RUN OUT --format diffusers`
(models/diffusers_export.py) writes a folder that `clipforge augment genie`, diffusers' StableDiffusion(Img2Img)
Pipeline and any other Stable-Diffusion-layout reader load.

The frozen parts are referenced, never copied into checkpoints (`ModelBundle.frozen`):
- `text`: a clipforge CLIP run, whose text tower is converted to a transformers `CLIPTextModel` with its
  `CLIPTokenizer` (models/hf, the `export --format transformers` path). null: a seeded untrained stand-in
  (a 2-layer text tower over open_clip's BPE), so tests and smoke runs need no trained CLIP.
- `autoencoder`: an `autoencoder` run (models/autoencoder.py); "seeded": an untrained stand-in of the variant
  `autoencoder-tiny`; null: pixel space (no VAE).
model.json records each run, the checkpoint read and the weights' sha256; loading refuses other weights.

`scaling_factor` (a buffer) is LDM's `scale_by_std`: 1 / std of the first training batch's latents, set by the
objective at its first step and saved with the weights (Stable Diffusion's 0.18215 was found the same way).

`generate(prompts, num_per_prompt, seed)` -> images [N, 3, S, S] in [-1, 1]: GeNIe's sampler at r = 1 (pure
noise, DPM-Solver++, `steps`, classifier-free `guidance` from the settings), so the `text_to_image` task scores
the model. `encode_image` (the UNet's noise prediction at t = T/2 under the empty caption, flattened) and
`encode_text` (the mean text state) are diagnostic features for the registry-wide tests, not capabilities.

Variants (one small config dict each; `model.name` may also be a JSON/YAML file of such settings):
    diffusion-tiny    16 px over the seeded tiny VAE (8 x 8 x 4 latents), levels (8, 16)    (the registered one)
    diffusion-synth   32 px over autoencoder-synth (16 x 16 x 4), levels (32, 64, 64), 1.7M UNet parameters
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.errors import ConfigError
from clipforge.models.autoencoder import image_preprocess, open_frozen_run
from clipforge.models.family import ModelBundle, family_settings, variant_or_file_settings

SEEDED = "seeded"
_TINY = {"image_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1, "attention_head_dim": 2,
         "norm_groups": 4, "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "steps": 20, "guidance": 3.0, "text": None, "autoencoder": SEEDED}
VARIANTS: dict[str, dict] = {
    "diffusion-tiny": _TINY,
    "diffusion-synth": {**_TINY, "image_size": 32, "block_out_channels": [32, 64, 64], "attention_head_dim": 8,
                        "norm_groups": 8, "steps": 20, "guidance": 3.0},
}
STAND_IN_TEXT = {"kind": SEEDED, "seed": 0, "width": 32, "layers": 2, "heads": 2, "context_length": 16}
STAND_IN_VAE = {"kind": SEEDED, "name": "autoencoder-tiny", "seed": 0}
_INTEGERS = ("image_size", "layers_per_block", "attention_head_dim", "norm_groups", "num_train_timesteps", "steps")


def check_settings(settings: dict, where: str) -> dict:
    unknown = sorted(set(settings) - set(_TINY))
    if unknown:
        raise ConfigError(f"{where}: unknown diffusion setting '{unknown[0]}' (known: {', '.join(_TINY)})")
    merged = {**_TINY, **settings}
    for key in _INTEGERS:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: diffusion setting '{key}' must be a positive integer, got {value!r}")
    levels = merged["block_out_channels"]
    if not isinstance(levels, list | tuple) or len(levels) < 2 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c % merged["norm_groups"] == 0 for c in levels):
        raise ConfigError(f"{where}: diffusion setting 'block_out_channels' must be at least two integers divisible "
                          f"by norm_groups ({merged['norm_groups']}), got {levels!r}")
    merged["block_out_channels"] = list(levels)
    for key in ("beta_start", "beta_end", "guidance"):
        if isinstance(merged[key], bool) or not isinstance(merged[key], int | float) or merged[key] < 0:
            raise ConfigError(f"{where}: diffusion setting '{key}' must be a number >= 0, got {merged[key]!r}")
    if not 0 < merged["beta_start"] < merged["beta_end"] < 1:
        raise ConfigError(f"{where}: diffusion betas must satisfy 0 < beta_start < beta_end < 1")
    if merged["beta_schedule"] not in ("scaled_linear", "linear"):
        raise ConfigError(f"{where}: diffusion setting 'beta_schedule' must be scaled_linear or linear")
    for key in ("text", "autoencoder"):
        if merged[key] is not None and not isinstance(merged[key], str | dict):
            raise ConfigError(f"{where}: diffusion setting '{key}' must be a run folder or null, got {merged[key]!r}")
    return merged


def variant_settings(name: str) -> dict:
    return variant_or_file_settings(name, VARIANTS, "diffusion",
                                    lambda settings: check_settings(settings, f"model '{name}'"))


def resolve_name(name: str) -> None:
    variant_settings(name)


# ---- the frozen parts ------------------------------------------------------------------------------------------

def _stand_in_text(spec: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    from clipforge.models.hf.quiet import transformers_quiet
    from clipforge.models.hf.tokenizer import clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = clip_tokenizer(Path(folder), spec["context_length"])
    with transformers_quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["seed"]))
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=spec["width"], intermediate_size=4 * spec["width"],
            num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
            max_position_embeddings=spec["context_length"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return encoder, tokenizer


def build_text_encoder(spec, device) -> tuple[nn.Module, object, dict]:
    """(frozen CLIPTextModel, its CLIPTokenizer, the spec model.json records). A CLIP run's text tower goes
    through clipforge's transformers export (the same weights `clipforge export --format transformers` writes)."""
    if spec is None or (isinstance(spec, dict) and spec.get("kind") == SEEDED):
        spec = dict(spec or STAND_IN_TEXT)
        encoder, tokenizer = _stand_in_text(spec)
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        from clipforge.models.autoencoder import resolve_frozen_run
        from clipforge.models.hf import export_transformers
        from clipforge.models.hf.quiet import transformers_quiet

        spec = resolve_frozen_run(spec, "clip", "text encoder")  # recorded: the same weights must still be there
        with tempfile.TemporaryDirectory() as folder:
            export_transformers(spec["checkpoint"], Path(folder) / "clip")
            with transformers_quiet():
                encoder = CLIPTextModel.from_pretrained(Path(folder) / "clip", use_safetensors=True)
                tokenizer = CLIPTokenizer.from_pretrained(Path(folder) / "clip")
    return encoder.to(device).eval().requires_grad_(False), tokenizer, spec


def build_frozen_vae(spec, device) -> tuple[nn.Module | None, dict | None]:
    if spec is None:
        return None, None
    if spec == SEEDED or (isinstance(spec, dict) and spec.get("kind") == SEEDED):
        from clipforge.models.factory import create_model

        spec = dict(STAND_IN_VAE) if spec == SEEDED else dict(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec["seed"]))
            model = create_model(ModelConfig(family="autoencoder", name=spec["name"]), device=device).model
        return model.vae.eval().requires_grad_(False), spec
    model, spec = open_frozen_run(spec, "autoencoder", "autoencoder", device)
    return model.vae, spec


# ---- the model -------------------------------------------------------------------------------------------------

def build_unet(settings: dict, latent_side: int, channels: int, context_width: int):
    from diffusers import UNet2DConditionModel

    levels = len(settings["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(settings["block_out_channels"]), layers_per_block=settings["layers_per_block"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=context_width, attention_head_dim=settings["attention_head_dim"],
        norm_num_groups=settings["norm_groups"])


def noise_schedule_config(settings: dict) -> dict:
    """The DDPM training schedule, as a diffusers scheduler config (what the exported folder's scheduler holds)."""
    return {"num_train_timesteps": settings["num_train_timesteps"], "beta_start": float(settings["beta_start"]),
            "beta_end": float(settings["beta_end"]), "beta_schedule": settings["beta_schedule"],
            "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}


class TextConditionedDiffusion(nn.Module):
    # encode_image / encode_text are diagnostics, not features: the evaluation tasks get generation and editing
    capabilities = ("generate", "edit")

    def __init__(self, settings: dict, text_encoder: nn.Module, tokenizer, vae: nn.Module | None):
        from diffusers import DDPMScheduler

        super().__init__()
        self.settings = settings
        self.image_size = int(settings["image_size"])
        self.text_encoder, self.tokenizer, self.vae = text_encoder, tokenizer, vae
        downsample = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        if self.image_size % downsample:
            raise ConfigError(f"diffusion image_size {self.image_size} is not divisible by the VAE's factor "
                              f"{downsample}")
        channels = 3 if vae is None else int(vae.config.latent_channels)
        self.unet = build_unet(settings, self.image_size // downsample, channels, text_encoder.config.hidden_size)
        self.noise_scheduler = DDPMScheduler(**noise_schedule_config(settings))
        # NaN until the objective's first step measures it (pixel space: 1, never measured)
        self.register_buffer("scaling_factor", torch.tensor(1.0 if vae is None else float("nan")))
        self.register_buffer("empty_caption", self.tokenize([""]), persistent=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[N, L] ids as diffusers' Stable Diffusion pipelines tokenise (padded to the context, truncated)."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def train(self, mode: bool = True) -> TextConditionedDiffusion:
        super().train(mode)
        self.text_encoder.eval()  # frozen parts stay in eval mode whatever the loop asks
        if self.vae is not None:
            self.vae.eval()
        return self

    @torch.no_grad()
    def text_states(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens.to(self.scaling_factor.device))[0]

    @torch.no_grad()
    def latents(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Unscaled first-stage latents of images in [-1, 1] (a posterior sample from the torch RNG, or its mode)."""
        if self.vae is None:
            return images
        posterior = self.vae.encode(images).latent_dist
        return posterior.sample() if sample else posterior.mode()

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=states).sample

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = self.latents(images, sample=False) * torch.nan_to_num(self.scaling_factor, nan=1.0)
        t = torch.full((z.shape[0],), self.settings["num_train_timesteps"] // 2, device=z.device)
        states = self.text_states(self.empty_caption).expand(z.shape[0], -1, -1)
        features = self(z, t, states).flatten(1)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_states(tokens).mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def components(self, scheduler: str = "dpm"):
        """The model as the GeNIe sampler's DiffusionComponents (sharing these modules; no copy, no folder)."""
        from clipforge.augment.diffusion import DiffusionComponents, build_scheduler

        vae = self.vae
        if vae is not None:
            vae.register_to_config(scaling_factor=float(self.scaling_factor))
        solver = build_scheduler(dict(self.noise_scheduler.config), scheduler)
        return DiffusionComponents(unet=self.unet, scheduler=solver, text_encoder=self.text_encoder,
                                   tokenizer=self.tokenizer, vae=vae, folder=Path("."), fingerprint="in-memory",
                                   scheduler_name=scheduler)

    @torch.no_grad()
    def edit(self, images: torch.Tensor | None, prompts: list[str], ratios: list[float], seeds: list[int],
             guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """GeNIe's sampler (augment/sampler.py): each image [B, 3, S, S] in [-1, 1] noised to r * T and denoised
        toward its prompt with classifier-free guidance; r = 1 ignores the image (None when every r is 1).
        Returns [B, 3, S, S] in [-1, 1]; sample i depends on its own image, prompt, r and seed only."""
        from clipforge.augment.sampler import encode_prompts, generate

        components = self.components()
        was_training = self.training
        self.eval()
        out = generate(components, images=images, prompt_embeds=encode_prompts(components, prompts),
                       negative_embeds=encode_prompts(components, [""]), ratios=list(ratios), seeds=list(seeds),
                       steps=steps or self.settings["steps"],
                       guidance=self.settings["guidance"] if guidance is None else guidance)
        self.train(was_training)
        return out * 2 - 1

    @torch.no_grad()
    def generate(self, prompts: list[str], num_per_prompt: int = 1, seed: int = 0, guidance: float | None = None,
                 steps: int | None = None) -> torch.Tensor:
        """[len(prompts) * num_per_prompt, 3, S, S] in [-1, 1], prompt-major; sample n of prompt p is seeded by
        (seed, p's text, n), so it does not depend on the other prompts of the call."""
        from clipforge.data.transforms import sample_seed

        expanded = [p for p in prompts for _ in range(num_per_prompt)]
        seeds = [sample_seed("generate", seed, p, n) for p in prompts for n in range(num_per_prompt)]
        return self.edit(None, expanded, [1.0] * len(expanded), seeds, guidance=guidance, steps=steps)

    @property
    def sampling(self) -> dict:
        """The sampling defaults, recorded with the generation tasks' numbers."""
        return {"solver": "dpm", "steps": self.settings["steps"], "guidance": self.settings["guidance"]}


def build_diffusion(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
                    saved: dict | None = None) -> ModelBundle:
    """`model_kwargs` may carry {"text": CLIP run, "autoencoder": autoencoder run} (the diffusion objective's)."""
    name, settings = family_settings(model_config, saved, model_kwargs, VARIANTS, "diffusion", check_settings)
    text_encoder, tokenizer, settings["text"] = build_text_encoder(settings["text"], device)
    vae, settings["autoencoder"] = build_frozen_vae(settings["autoencoder"], device)
    model = TextConditionedDiffusion(settings, text_encoder, tokenizer, vae).to(device)
    preprocess = image_preprocess(settings["image_size"])
    config = {"family": "diffusion", "name": name, "settings": settings}
    frozen = ("text_encoder",) + (("vae",) if vae is not None else ())
    return ModelBundle(model, preprocess, preprocess, model.tokenize, config=config, frozen=frozen)


build_diffusion.resolve_name = resolve_name
