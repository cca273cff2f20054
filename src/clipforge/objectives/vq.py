"""The `vq` objective: train a `vq`-family image tokenizer, VQ-GAN style (LG-VQ, NeurIPS 2024; docs/lgvq.md).

Phase `main` (the tokenizer):
    reconstruction   L1 (default) or L2 between the image and its reconstruction, in the preprocess's [-1, 1]
    codebook         codebook_weight * ||sg[z] - e||^2          (quantizer vq and simvq: the codebook learns)
    commitment       commitment_weight * ||z - sg[e]||^2        (vq, ema, simvq: the encoder commits)
    adversarial      disc_weight * -mean D(reconstruction)      (taming's generator term, once D has trained)
Phase `discriminator` (the objective's own PatchGAN, only when disc_weight > 0): its own Adam (betas 0.5/0.9
as taming, `disc_lr`), from optimiser step `disc_start`, hinge loss on images vs reconstructions that are
computed without gradient and without touching the codebook. The toy_gan precedent, with taming's losses;
taming's adaptive generator weight (a gradient-norm ratio at the decoder's last layer) is not built: the
weight is the fixed `disc_weight`.

Metrics: codebook usage (% of codes used in the batch, over all ranks), perplexity (exp of the code entropy),
PSNR (dB, images in [0, 1]), and `codebook_collapse` (1 when usage is under `collapse_threshold` %): the
collapse warning sits in metrics.jsonl and the run summary, where the run's records are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import VqObjectiveConfig
from clipforge.data.batches import LabelledImageBatch
from clipforge.errors import ConfigError
from clipforge.objectives.base import MAIN_PHASE, Objective, ObjectiveOutput, Phase

DISCRIMINATOR_PHASE = "discriminator"


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """[K] how often each code occurs in `codes` (any shape), summed over every rank."""
    from clipforge.distributed import is_enabled

    counts = torch.bincount(codes.detach().flatten(), minlength=codebook_size).float()  # [K]
    if is_enabled():
        torch.distributed.all_reduce(counts)
    return counts


def codebook_usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage in % of the codebook, perplexity exp(H(p))) from a code histogram [K]."""
    usage = (counts > 0).float().mean() * 100.0
    probabilities = counts / counts.sum().clamp_min(1.0)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()  # 0 log 0 = 0
    return usage, entropy.exp()


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (measured on [0, 1], as is usual)."""
    mse = ((reconstruction.detach().clamp(-1, 1) - images) / 2).pow(2).mean()
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator without BatchNorm: one logit per overlapping patch."""

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for n in range(1, layers + 1):
            wider = width * min(2 ** n, 8)
            modules += [nn.Conv2d(channels, wider, 4, stride=2 if n < layers else 1, padding=1), nn.LeakyReLU(0.2)]
            channels = wider
        modules.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # [B, 1, h', w']


def check_vq_model(model: nn.Module, objective: str) -> None:
    if not all(hasattr(model, name) for name in ("quantize", "decode_features", "quantizer")):
        raise ConfigError(f"objective '{objective}' trains a model of the vq family (model.family=vq), got "
                          f"{type(model).__name__}")


class VqObjective(Objective):
    batch_type = LabelledImageBatch
    name = "vq"
    families = ("vq",)
    # the discriminator gets no gradient in the tokenizer's phase, the tokenizer none in the discriminator's
    find_unused_parameters = True

    def __init__(self, settings: VqObjectiveConfig | None = None):
        super().__init__()
        settings = settings or VqObjectiveConfig()
        self.settings = settings
        self.discriminator = PatchDiscriminator(settings.disc_width, settings.disc_layers) \
            if settings.disc_weight > 0 else None
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimiser steps applied

    @classmethod
    def from_config(cls, config, model: nn.Module) -> VqObjective:
        check_vq_model(model, cls.name)
        return cls(config.objective.vq)

    def phases(self, model: nn.Module) -> list[Phase]:
        phases = [Phase(MAIN_PHASE)]
        if self.discriminator is not None:
            phases.append(Phase(DISCRIMINATOR_PHASE, parameters=list(self.discriminator.parameters()),
                                lr=self.settings.disc_lr, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=0,
                                start_step=self.settings.disc_start))
        return phases

    def forward(self, model: nn.Module, batch, phase: str = MAIN_PHASE) -> ObjectiveOutput:
        if phase == DISCRIMINATOR_PHASE:
            return self.discriminator_losses(model, batch.images)
        output = model(batch.images)
        losses, metrics = self.tokenizer_losses(model, batch.images, output)
        return ObjectiveOutput(losses=losses, metrics=metrics)

    def tokenizer_losses(self, model: nn.Module, images: torch.Tensor, output) -> tuple[dict, dict]:
        settings, quantized, kind = self.settings, output.quantized, model.quantizer.kind
        difference = output.reconstruction - images
        losses = {"reconstruction": difference.abs().mean() if settings.reconstruction == "l1"
                  else difference.pow(2).mean()}
        if kind in ("vq", "simvq") and settings.codebook_weight > 0:
            losses["codebook"] = settings.codebook_weight * quantized.codebook_loss
        if kind != "fsq" and settings.commitment_weight > 0:
            losses["commitment"] = settings.commitment_weight * quantized.commitment_loss
        if self.discriminator is not None and int(self.steps_done) > settings.disc_start:  # D has trained
            losses["adversarial"] = settings.disc_weight * -self.discriminator(output.reconstruction).mean()
        usage, perplexity = codebook_usage(code_histogram(quantized.codes, model.codebook_size))
        metrics = {"codebook_usage": usage, "perplexity": perplexity, "psnr": psnr(output.reconstruction, images),
                   "codebook_collapse": (usage < settings.collapse_threshold).float()}
        return losses, metrics

    def discriminator_losses(self, model: nn.Module, images: torch.Tensor) -> ObjectiveOutput:
        with torch.no_grad():  # the tokenizer's phase has stepped; the codebook is left as it is
            fake = model(images, update_codebook=False).reconstruction
        real_logits, fake_logits = self.discriminator(images), self.discriminator(fake)
        hinge = 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
        return ObjectiveOutput(losses={"hinge": hinge},
                               metrics={"real_score": real_logits.detach().mean(),
                                        "fake_score": fake_logits.detach().mean()})

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self.steps_done += 1

