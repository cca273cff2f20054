"""The `autoencoder` family: a diffusers `AutoencoderKL`, the first stage of a latent diffusion model.

    images [B, 3, S, S] in [-1, 1] -> encoder -> posterior N(mean, var) [B, C, S/f, S/f] -> decoder -> [B, 3, S, S]
    f = 2 ** (levels - 1), one level per entry of `block_out_channels`

It is trained by the `autoencoder` objective (reconstruction + a small KL term, LDM's KL-regularised first
stage) and then frozen inside a `diffusion` model (models/diffusion.py), which reads it from its run folder.
The module is diffusers' own class, so `export --format diffusers` saves it with `save_pretrained` and
`StableDiffusionImg2ImgPipeline` loads it as the pipeline's `vae`.

`encode_image(images)` (the posterior mean, flattened) is what the registry-wide tests compare across a reload;
it is not a declared capability: latents are not features for the evaluation tasks.

Variants (one small config dict each; `model.name` may also be a JSON/YAML file of such settings):
    autoencoder-tiny    16 px, levels (8, 16), 4 latent channels                (the registered tiny one)
    autoencoder-synth   32 px, levels (32, 64), 4 latent channels: 16 x 16 x 4 latents (configs/genie_*.yaml)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from clipforge.config import ModelConfig
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.family import ModelBundle, family_settings, variant_or_file_settings

_TINY = {"image_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
         "norm_groups": 4}
VARIANTS: dict[str, dict] = {
    "autoencoder-tiny": _TINY,
    "autoencoder-synth": {**_TINY, "image_size": 32, "block_out_channels": [32, 64], "norm_groups": 8},
}


def check_settings(settings: dict, where: str) -> dict:
    unknown = sorted(set(settings) - set(_TINY))
    if unknown:
        raise ConfigError(f"{where}: unknown autoencoder setting '{unknown[0]}' (known: {', '.join(_TINY)})")
    merged = {**_TINY, **settings}
    for key in ("image_size", "layers_per_block", "latent_channels", "norm_groups"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: autoencoder setting '{key}' must be a positive integer, got {value!r}")
    levels = merged["block_out_channels"]
    if not isinstance(levels, list | tuple) or not levels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in levels):
        raise ConfigError(f"{where}: autoencoder setting 'block_out_channels' must be a list of positive integers, "
                          f"got {levels!r}")
    if any(c % merged["norm_groups"] for c in levels):
        raise ConfigError(f"{where}: norm_groups ({merged['norm_groups']}) must divide every block_out_channels "
                          f"entry ({list(levels)})")
    if merged["image_size"] % 2 ** (len(levels) - 1):
        raise ConfigError(f"{where}: image_size {merged['image_size']} is not divisible by the downsampling "
                          f"factor {2 ** (len(levels) - 1)}")
    merged["block_out_channels"] = list(levels)
    return merged


def variant_settings(name: str) -> dict:
    return variant_or_file_settings(name, VARIANTS, "autoencoder",
                                    lambda settings: check_settings(settings, f"model '{name}'"))


def resolve_name(name: str) -> None:
    variant_settings(name)


def build_vae(settings: dict):
    """diffusers' AutoencoderKL with these settings (random weights)."""
    from diffusers import AutoencoderKL

    levels = len(settings["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(settings["block_out_channels"]),
        layers_per_block=settings["layers_per_block"], latent_channels=settings["latent_channels"],
        norm_num_groups=settings["norm_groups"], sample_size=settings["image_size"])


def image_preprocess(size: int):
    """PIL -> [3, size, size] in [-1, 1] (shorter side resized, centre crop): what diffusers' VAEs take."""
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize([0.5] * 3, [0.5] * 3)])


class ImageAutoencoder(nn.Module):
    """An AutoencoderKL (`self.vae`) and the calls the objective and the diffusion model make of it."""

    def __init__(self, **settings):
        super().__init__()
        self.image_size = int(settings["image_size"])
        self.vae = build_vae(settings)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(self, images: torch.Tensor, sample: bool = True):
        """(reconstruction [B, 3, S, S], posterior); the decoder reads a posterior sample (or its mode)."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()  # sample() draws from the torch RNG
        return self.vae.decode(latents).sample, posterior

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.vae.encode(images).latent_dist.mode().flatten(1)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def build_autoencoder(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
                      saved: dict | None = None) -> ModelBundle:
    name, settings = family_settings(model_config, saved, model_kwargs, VARIANTS, "autoencoder", check_settings)
    model = ImageAutoencoder(**settings).to(device)
    preprocess = image_preprocess(settings["image_size"])
    config = {"family": "autoencoder", "name": name, "settings": settings}
    return ModelBundle(model, preprocess, preprocess, None, config=config)


build_autoencoder.resolve_name = resolve_name


def frozen_run_spec(run: str | Path, family: str, what: str) -> dict:
    """{"kind": "run", "run", "checkpoint", "sha256"} of a run folder's (or checkpoint folder's) latest weights,
    after checking they hold a `family` model; what a model that freezes it records in its model.json."""
    from clipforge.models.factory import find_model_weights, read_model_json
    from clipforge.models.text_prior import file_sha256

    if not Path(run).exists():
        raise ConfigError(f"the {what} run '{run}' does not exist")
    weights = find_model_weights(run)
    saved = read_model_json(weights.parent)
    if saved is None or saved.get("family") != family:
        found = "no model.json" if saved is None else f"a '{saved.get('family')}' model"
        raise ConfigError(f"the {what} '{run}' holds {found}, not a {family} model")
    return {"kind": "run", "run": str(Path(run).resolve()), "checkpoint": str(weights.parent.resolve()),
            "sha256": file_sha256(weights)}


def resolve_frozen_run(spec: dict | str | Path, family: str, what: str) -> dict:
    """The spec of a run folder, or of a recorded spec whose weights must still be the recorded ones
    (CheckpointError otherwise); its "checkpoint" is the folder to load."""
    if not isinstance(spec, dict):
        return frozen_run_spec(spec, family, what)
    where = spec["checkpoint"] if Path(spec["checkpoint"]).is_dir() else spec["run"]
    current = frozen_run_spec(where, family, what)
    if current["sha256"] != spec["sha256"]:
        raise CheckpointError(f"this model was trained over the {what} {spec['checkpoint']} (sha256 "
                              f"{spec['sha256'][:12]}), but '{where}' now holds {current['sha256'][:12]}")
    return {**current, "run": spec["run"]}


def open_frozen_run(spec: dict | str | Path, family: str, what: str, device) -> tuple[nn.Module, dict]:
    """(model in eval mode, frozen, with no gradient; its spec) from a run folder or a recorded spec
    (resolve_frozen_run)."""
    from clipforge.models.factory import load_model

    current = resolve_frozen_run(spec, family, what)
    model, _, _ = load_model(None, checkpoint=current["checkpoint"], device=device)
    return model.eval().requires_grad_(False), current
