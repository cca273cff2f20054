"""GeNIe's sampler on diffusers components (Koohpayegani et al., arXiv 2312.02548).

A source image is encoded (VAE posterior mode, times its scaling factor; the image itself in pixel space), noised
to the timestep of noise ratio r, and denoised the rest of the way with classifier-free guidance towards a prompt
(unconditional = the empty prompt), then decoded. The ratio maps to the schedule exactly as diffusers' img2img
`strength` does:

    init_timestep = min(int(steps * r), steps);  t_start = steps - init_timestep
    timesteps = scheduler.timesteps[t_start * order:]          # steps - t_start denoising steps

so r = 0.8 with 50 steps runs 40. r = 1 is true pure noise (the latents are N(0, I) times the scheduler's initial
sigma, the source is not used), unlike diffusers' img2img at strength 1, which still mixes in the image at the
last training timestep.

Every sample has its own `torch.Generator` (CPU, so the noise does not depend on the device): with
`posterior="sample"` it first draws the posterior sample, then the noise, in diffusers' order. Samples that share
a seed share their noise (GeNIe-Ada's grid). A batch may mix noise ratios: samples with the same start index share
a copy of the scheduler (a multistep solver keeps a history per sample), and every sample that has started is in
the one UNet call of a step, since all start on the same schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clipforge.augment.diffusion import DiffusionComponents
from clipforge.errors import ConfigError


def denoising_start(steps: int, ratio: float, order: int = 1) -> tuple[int, int]:
    """(index of the first timestep in scheduler.timesteps, number of denoising steps) at noise ratio `ratio`."""
    init_timestep = min(int(steps * ratio), steps)
    t_start = max(steps - init_timestep, 0)
    return t_start * order, steps - t_start


def check_ratio(ratio: float, steps: int, what: str = "r") -> None:
    """ConfigError unless 0 < ratio <= 1 and the ratio leaves at least one denoising step."""
    if isinstance(ratio, bool) or not (isinstance(ratio, int | float) and 0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"{what} must be in (0, 1], got {ratio!r}")
    if denoising_start(steps, ratio)[1] < 1:
        raise ConfigError(f"{what} = {ratio} runs no denoising step with {steps} steps (int({steps} * {ratio}) = 0)")


def to_model_input(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> [3, size, size] in [-1, 1]: shorter side resized to `size` (bicubic), centre crop."""
    image = image.convert("RGB")
    if image.size != (size, size):
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image).astype(np.float32) / 255.0  # what diffusers' VaeImageProcessor does
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil rounds."""
    array = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def encode_prompts(components: DiffusionComponents, prompts: Sequence[str]) -> torch.Tensor:
    """[N, L, D] text-encoder states, tokenised as diffusers' Stable Diffusion pipelines do (padded to max)."""
    tokenizer = components.tokenizer
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = None
    if getattr(components.text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(components.device)
    states = components.text_encoder(tokens.input_ids.to(components.device), attention_mask=mask)[0]
    return states.to(components.dtype)


def _latent_shape(components: DiffusionComponents) -> tuple[int, int, int]:
    side = components.image_size // components.downsample
    return components.latent_channels, side, side


def _draw(seed: int, shape: tuple[int, ...], posterior: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    posterior_noise = torch.randn((1, *shape), generator=generator) if posterior else None
    return posterior_noise, torch.randn((1, *shape), generator=generator)


@torch.no_grad()
def encode_images(components: DiffusionComponents, images: torch.Tensor,
                  posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, C, h, w] scaled latents: the posterior mode, or mean + std * noise."""
    images = images.to(components.device, components.dtype)
    if components.vae is None:
        return images
    posterior = components.vae.encode(images).latent_dist
    if posterior_noise is None:
        latents = posterior.mode()
    else:
        latents = posterior.mean + posterior.std * posterior_noise.to(posterior.mean.device, posterior.mean.dtype)
    return latents * components.scaling_factor


@torch.no_grad()
def decode_latents(components: DiffusionComponents, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] scaled latents -> [B, 3, H, W] images in [0, 1]."""
    images = latents if components.vae is None else components.vae.decode(latents / components.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(
    components: DiffusionComponents,
    *,
    images: torch.Tensor | None,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    ratios: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    posterior: str = "mode",
) -> torch.Tensor:
    """Edit each source image towards its prompt at its noise ratio; [B, 3, H, W] in [0, 1].

    images: [B, 3, H, W] in [-1, 1] (only rows whose ratio is below 1 are read; None when every ratio is 1);
    prompt_embeds: [B, L, D]; negative_embeds: [1, L, D] (the empty prompt); ratios, seeds: one per sample.
    """
    if posterior not in ("mode", "sample"):
        raise ConfigError(f"posterior must be 'mode' or 'sample', got '{posterior}'")
    count = len(ratios)
    if len(seeds) != count or prompt_embeds.shape[0] != count:
        raise ValueError("one ratio, seed and prompt per sample")
    device, dtype = components.device, components.dtype
    template = copy.deepcopy(components.scheduler)
    template.set_timesteps(steps, device=device)
    timesteps = template.timesteps
    order = int(getattr(template, "order", 1))

    shape = _latent_shape(components)
    drawn = [_draw(seed, shape, posterior == "sample" and ratio < 1) for seed, ratio in zip(seeds, ratios)]
    noise = torch.cat([n for _, n in drawn]).to(device, dtype)  # [B, C, h, w]
    latents = torch.empty_like(noise)
    starts = [denoising_start(steps, ratio, order)[0] for ratio in ratios]

    groups: dict[int, list[int]] = {}  # start index -> sample rows (the pure-noise ones start at 0)
    for row, start in enumerate(starts):
        groups.setdefault(start, []).append(row)
    schedulers = {}
    for start, rows in groups.items():
        scheduler = copy.deepcopy(template)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        schedulers[start] = scheduler
        pure = [row for row in rows if ratios[row] >= 1.0]
        edited = [row for row in rows if ratios[row] < 1.0]
        if pure:
            latents[pure] = noise[pure] * scheduler.init_noise_sigma
        if edited:
            if images is None:
                raise ValueError("source images are needed for ratios below 1")
            posterior_noise = torch.cat([drawn[row][0] for row in edited]) if posterior == "sample" else None
            clean = encode_images(components, images[edited], posterior_noise)
            start_t = timesteps[start:start + 1].repeat(len(edited))
            latents[edited] = scheduler.add_noise(clean, noise[edited], start_t)

    guided = guidance > 1.0 and components.unet.config.time_cond_proj_dim is None  # diffusers' rule
    prompt_embeds = prompt_embeds.to(device, dtype)
    negative_embeds = negative_embeds.to(device, dtype)
    for step in range(min(starts), len(timesteps)):
        t = timesteps[step]
        active = [start for start in sorted(groups) if start <= step]
        rows = [row for start in active for row in groups[start]]
        model_input = torch.cat([schedulers[start].scale_model_input(latents[groups[start]], t) for start in active])
        context = prompt_embeds[rows]
        if guided:
            model_input = torch.cat([model_input, model_input])
            context = torch.cat([negative_embeds.expand(len(rows), -1, -1), context])
        prediction = components.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        offset = 0
        for start in active:
            members = groups[start]
            part = prediction[offset:offset + len(members)]
            latents[members] = schedulers[start].step(part, t, latents[members], return_dict=False)[0]
            offset += len(members)
    return decode_latents(components, latents)
