"""The two objectives of a latent diffusion model: its first stage, then its denoiser (LDM, Rombach et al. 2022).

`autoencoder` trains an `autoencoder`-family AutoencoderKL:
    loss = |x - D(z)|  (or squared)  +  kl_weight * KL(q(z|x) || N(0, I))     z ~ q(z|x), the posterior sample
    (the KL is summed over latent dimensions and averaged over the batch, as diffusers' `kl()` and LDM do;
    no perceptual or adversarial term: SynthScenes' flat shapes reconstruct without them at 32 px)

`diffusion` trains the UNet of a `diffusion`-family model (models/diffusion.py), Stable Diffusion's recipe:
    z0 = scaling_factor * z,  z ~ q(z|x) of the frozen VAE           (pixel space: z0 = x)
    captions dropped to "" with probability caption_dropout           (classifier-free guidance's unconditional)
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = DDPMScheduler.add_noise(z0, eps, t)
    loss = || eps - UNet(z_t, t, text_states(caption)) ||^2           (mean over every element)
At the first step the scaling factor is measured (LDM's scale_by_std): 1 / std of that batch's latents, over every
rank; it is then a saved buffer, so a resumed run uses the same value. All draws use the torch RNG, which the
loop checkpoints: resume is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import AutoencoderObjectiveConfig, DiffusionObjectiveConfig
from clipforge.data.batches import ImageTextBatch, LabelledImageBatch
from clipforge.errors import ConfigError
from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.code_ar import drop_captions
from clipforge.objectives.vq import psnr


class AutoencoderObjective(Objective):
    batch_type = LabelledImageBatch
    name = "autoencoder"
    families = ("autoencoder",)

    def __init__(self, settings: AutoencoderObjectiveConfig | None = None):
        super().__init__()
        self.settings = settings or AutoencoderObjectiveConfig()

    @classmethod
    def from_config(cls, config, model: nn.Module) -> AutoencoderObjective:
        if not hasattr(model, "vae") or hasattr(model, "unet"):
            raise ConfigError(f"objective 'autoencoder' trains a model of the autoencoder family "
                              f"(model.family=autoencoder), got {type(model).__name__}")
        return cls(config.objective.autoencoder)

    def forward(self, model: nn.Module, batch: LabelledImageBatch) -> ObjectiveOutput:
        reconstruction, posterior = model(batch.images)
        error = reconstruction - batch.images
        loss = error.abs().mean() if self.settings.reconstruction == "l1" else error.pow(2).mean()
        kl = posterior.kl().mean()
        metrics = {"psnr": psnr(reconstruction, batch.images), "kl": kl.detach(),
                   "latent_std": posterior.mean.detach().std()}
        return ObjectiveOutput(losses={"reconstruction": loss, "kl": self.settings.kl_weight * kl}, metrics=metrics)


@torch.no_grad()
def measure_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    """1 / std of `latents` over every element on every rank (LDM's scale_by_std)."""
    from clipforge.distributed import is_enabled

    moments = torch.stack([latents.sum(), latents.pow(2).sum(), torch.tensor(float(latents.numel()))
                           .to(latents)]).double()
    if is_enabled():
        torch.distributed.all_reduce(moments)
    mean = moments[0] / moments[2]
    variance = moments[1] / moments[2] - mean ** 2
    return (1.0 / variance.clamp_min(1e-12).sqrt()).float()


class DiffusionObjective(Objective):
    batch_type = ImageTextBatch
    name = "diffusion"
    families = ("diffusion",)

    def __init__(self, settings: DiffusionObjectiveConfig | None = None):
        super().__init__()
        self.settings = settings or DiffusionObjectiveConfig()

    @staticmethod
    def model_kwargs(config) -> dict:
        """The frozen text tower (a CLIP run) and first stage (an autoencoder run, "seeded", or None)."""
        section = config.objective.diffusion
        return {"text": section.text, "autoencoder": section.autoencoder}

    @classmethod
    def from_config(cls, config, model: nn.Module) -> DiffusionObjective:
        if not all(hasattr(model, name) for name in ("unet", "noise_scheduler", "text_states")):
            raise ConfigError(f"objective 'diffusion' trains a model of the diffusion family "
                              f"(model.family=diffusion), got {type(model).__name__}")
        return cls(config.objective.diffusion)

    def forward(self, model: nn.Module, batch: ImageTextBatch) -> ObjectiveOutput:
        latents = model.latents(batch.images)  # no gradient: the first stage is frozen
        if torch.isnan(model.scaling_factor):
            model.scaling_factor.copy_(measure_scaling_factor(latents))
        clean = latents * model.scaling_factor
        texts, dropped = drop_captions(batch.texts, model.empty_caption, self.settings.caption_dropout)
        states = model.text_states(texts)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device)
        noisy = model.noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps, states), noise)
        metrics = {"caption_dropped": dropped.float().mean(), "scaling_factor": model.scaling_factor.detach()}
        return ObjectiveOutput(losses={"diffusion": loss}, metrics=metrics)
