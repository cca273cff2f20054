"""The `vq` family: a VQ-GAN-style image tokenizer (conv encoder, quantiser, conv decoder) sized for 32-64 px.

    images [B, 3, S, S] -> encoder -> z [B, D, h, w] -> quantiser -> codes [B, h, w] int64
                                                                  -> features [B, D, h, w] -> decoder -> [B, 3, S, S]

The quantiser comes from vector-quantize-pytorch (`quantizer` in the settings):
    vq      VectorQuantize with a codebook learned by gradient (taming's VectorQuantizer2: codebook and
            commitment losses, straight-through estimator)
    ema     VectorQuantize with an EMA codebook (`decay`); no codebook loss, the commitment loss only
    fsq     FSQ (finite scalar quantisation, `fsq_levels`, codebook_size = their product); no losses
    simvq   SimVQ (a frozen random codebook through a learned linear map), losses as `vq`
`dead_code_threshold` > 0 replaces codes whose EMA cluster size falls under it with encoder outputs (vq, ema).
The library's own commitment loss is switched off: the model returns the codebook and commitment terms
separately (from codes looked up by index) and the objective weighs them.

Distributed: under DDP the codebook statistics (cluster sizes, sums, dead-code samples) are all-reduced inside
forward (`sync_codebook`, set from the process group when the model is built); a learned codebook is a plain
parameter whose gradient DDP all-reduces (the in-place codebook optimiser of vector-quantize-pytorch #222 is
not used). A step the loop skips as non-finite: the EMA update happens in forward, before the loop knows, so
a non-finite encoder output on ANY rank freezes the codebook for that forward on EVERY rank (one all-reduce of
a finiteness flag); nothing non-finite reaches the buffers, and every rank takes the same branch. When the
encoder output is finite but the loss is not (say, the decoder overflows), the update stands: it is a
statistics update from finite inputs, identical on every rank, and it is saved with the weights.

Variants (one small config dict each), or a JSON/YAML file with the same keys as `model.name`:
    vq-tiny          32 px, grid 8x8, codebook 64 x 16, EMA, dead-code replacement  (the registered tiny one)
    vq-tiny-learned  the same with a codebook learned by gradient
    vq-tiny-fsq      FSQ levels [8, 8]
    vq-tiny-simvq    SimVQ
    vq-small         64 px, grid 8x8, codebook 512 x 32, EMA, attention in the middle block
With `text_prior` (set by the `lgvq` objective) the model also carries a frozen text encoder
(models/text_prior.py), and the bundle its tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from clipforge.config import ModelConfig
from clipforge.errors import ConfigError
from clipforge.models.family import ModelBundle, family_settings, variant_or_file_settings

QUANTIZERS = ("vq", "ema", "fsq", "simvq")

_TINY = {"image_size": 32, "channels": 32, "channel_mult": [1, 2, 2], "res_blocks": 1, "attention": False,
         "norm_groups": 8, "embed_dim": 16, "codebook_size": 64, "quantizer": "ema", "decay": 0.9,
         "dead_code_threshold": 1.0, "kmeans_init": False, "rotation_trick": False, "fsq_levels": None,
         "text_prior": None}
VARIANTS: dict[str, dict] = {
    "vq-tiny": _TINY,
    "vq-tiny-learned": {**_TINY, "quantizer": "vq"},
    "vq-tiny-fsq": {**_TINY, "quantizer": "fsq", "fsq_levels": [8, 8], "dead_code_threshold": 0.0},
    "vq-tiny-simvq": {**_TINY, "quantizer": "simvq", "dead_code_threshold": 0.0},
    "vq-small": {**_TINY, "image_size": 64, "channels": 64, "channel_mult": [1, 1, 2, 2], "res_blocks": 2,
                 "attention": True, "embed_dim": 32, "codebook_size": 512, "decay": 0.99},
}


# ---- settings: checked before any work ----------------------------------------------------------------------

def check_settings(settings: dict, where: str) -> dict:
    """The settings, complete and consistent, or a one-line ConfigError naming the key."""
    unknown = sorted(set(settings) - set(_TINY))
    if unknown:
        raise ConfigError(f"{where}: unknown vq setting '{unknown[0]}' (known: {', '.join(_TINY)})")
    merged = {**_TINY, **settings}

    def fail(key: str, problem: str):
        raise ConfigError(f"{where}: vq setting '{key}' {problem}")

    for key in ("image_size", "channels", "res_blocks", "norm_groups", "embed_dim", "codebook_size"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "res_blocks" else 1):
            fail(key, f"must be a positive integer, got {value!r}")
    mult = merged["channel_mult"]
    if not isinstance(mult, list) or not mult or not all(isinstance(m, int) and m >= 1 for m in mult):
        fail("channel_mult", f"must be a non-empty list of positive integers, got {mult!r}")
    factor = 2 ** (len(mult) - 1)
    if merged["image_size"] % factor:
        fail("image_size", f"({merged['image_size']}) is not divisible by the encoder's downsampling factor "
                           f"{factor} (channel_mult has {len(mult)} levels)")
    bad = [merged["channels"] * m for m in mult if (merged["channels"] * m) % merged["norm_groups"]]
    if bad:
        fail("norm_groups", f"({merged['norm_groups']}) does not divide the channel count {bad[0]}")
    if merged["quantizer"] not in QUANTIZERS:
        fail("quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {merged['quantizer']!r}")
    if merged["codebook_size"] < 2:
        fail("codebook_size", f"must be >= 2, got {merged['codebook_size']}")
    if not (isinstance(merged["decay"], int | float) and 0.0 < merged["decay"] < 1.0):
        fail("decay", f"must be in (0, 1), got {merged['decay']!r}")
    if not (isinstance(merged["dead_code_threshold"], int | float) and merged["dead_code_threshold"] >= 0):
        fail("dead_code_threshold", f"must be >= 0, got {merged['dead_code_threshold']!r}")
    if merged["quantizer"] == "fsq":
        levels = merged["fsq_levels"]
        if not isinstance(levels, list) or not levels or not all(isinstance(v, int) and v >= 3 for v in levels):
            fail("fsq_levels", f"must be a list of integers >= 3 for quantizer fsq, got {levels!r}")
        if math.prod(levels) != merged["codebook_size"]:
            fail("codebook_size", f"({merged['codebook_size']}) must equal the product of fsq_levels {levels} "
                                  f"({math.prod(levels)})")
        if merged["dead_code_threshold"]:
            fail("dead_code_threshold", "applies to quantizer vq or ema, not fsq (set it to 0)")
    if merged["quantizer"] == "simvq" and merged["dead_code_threshold"]:
        fail("dead_code_threshold", "applies to quantizer vq or ema, not simvq (set it to 0)")
    if merged["text_prior"] is not None and not isinstance(merged["text_prior"], dict):
        fail("text_prior", f"must be a mapping or null, got {merged['text_prior']!r}")
    return merged


def variant_settings(name: str) -> dict:
    """The checked settings `name` stands for: a registered variant or a JSON/YAML file of settings."""
    return variant_or_file_settings(name, VARIANTS, "vq", lambda settings: check_settings(settings, f"model '{name}'"))


def resolve_name(name: str) -> None:
    variant_settings(name)


# ---- layers --------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, channels_in), nn.SiLU(),
                                   nn.Conv2d(channels_in, channels_out, 3, padding=1),
                                   nn.GroupNorm(groups, channels_out), nn.SiLU(),
                                   nn.Conv2d(channels_out, channels_out, 3, padding=1))
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions (VQ-GAN's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, hw, C] each
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, hw, C]
        return x + self.out(attended.transpose(1, 2).reshape(batch, channels, height, width))


def _middle(channels: int, groups: int, attention: bool) -> nn.Sequential:
    layers = [ResBlock(channels, channels, groups)]
    if attention:
        layers += [AttentionBlock(channels, groups), ResBlock(channels, channels, groups)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, channels: int, channel_mult: list[int], res_blocks: int, attention: bool, groups: int,
                 embed_dim: int):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(current, width, groups))
                current = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(current, current, 4, stride=2, padding=1))  # halves the side
        layers += [_middle(current, groups, attention), nn.GroupNorm(groups, current), nn.SiLU(),
                   nn.Conv2d(current, embed_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # [B, D, h, w]


class Decoder(nn.Module):
    def __init__(self, channels: int, channel_mult: list[int], res_blocks: int, attention: bool, groups: int,
                 embed_dim: int):
        super().__init__()
        widths = [channels * m for m in channel_mult][::-1]
        current = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, current, 3, padding=1), _middle(current, groups, attention)]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(current, width, groups))
                current = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)]
        layers += [nn.GroupNorm(groups, current), nn.SiLU(), nn.Conv2d(current, 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # [B, 3, S, S]


# ---- the quantiser -----------------------------------------------------------------------------------------

@dataclass
class Quantized:
    features: torch.Tensor  # [B, D, h, w] quantised, gradients pass straight through to z
    codes: torch.Tensor  # [B, h, w] int64
    codebook_loss: torch.Tensor  # scalar: ||sg[z] - e||^2, moves the codebook (zero for ema and fsq)
    commitment_loss: torch.Tensor  # scalar: ||z - sg[e]||^2, moves the encoder (zero for fsq)


class Quantizer(nn.Module):
    """One of vector-quantize-pytorch's quantisers behind one contract: z [B, D, h, w] -> Quantized."""

    def __init__(self, kind: str, dim: int, codebook_size: int, decay: float, dead_code_threshold: float,
                 kmeans_init: bool, rotation_trick: bool, fsq_levels: list[int] | None, sync_codebook: bool):
        super().__init__()
        from vector_quantize_pytorch import FSQ, SimVQ, VectorQuantize

        self.kind, self.codebook_size = kind, codebook_size
        if kind in ("vq", "ema"):
            self.vq = VectorQuantize(
                dim=dim, codebook_size=codebook_size, accept_image_fmap=True, commitment_weight=0.0,
                learnable_codebook=kind == "vq", ema_update=kind == "ema", decay=decay,
                threshold_ema_dead_code=dead_code_threshold, kmeans_init=kmeans_init,
                rotation_trick=rotation_trick, straight_through=False, sync_codebook=sync_codebook)
        elif kind == "fsq":
            self.fsq = FSQ(levels=list(fsq_levels), dim=dim)
        else:
            self.simvq = SimVQ(dim=dim, codebook_size=codebook_size, channel_first=True,
                               rotation_trick=rotation_trick, commitment_weight=0.0)

    def forward(self, z: torch.Tensor, update: bool = True) -> Quantized:
        zero = z.new_zeros(())
        if self.kind == "fsq":
            features, codes = self.fsq(z)
            return Quantized(features, codes.long(), zero, zero)
        if self.kind == "simvq":
            features, codes, _ = self.simvq(z)
            if not self.training:  # the library's gather and indices_to_codes round differently: decode_codes
                features = self.lookup(codes.long())  # must give exactly the model's own reconstruction
        else:
            features, codes, _ = self.vq(z, freeze_codebook=not update)
        codes = codes.long()
        if self.kind == "ema":  # the codebook follows the EMA, not a loss
            return Quantized(features, codes, zero, F.mse_loss(z, features.detach()))
        chosen = self.lookup(codes)  # [B, D, h, w], differentiable w.r.t. the codebook
        return Quantized(features, codes, F.mse_loss(chosen, z.detach()), F.mse_loss(z, chosen.detach()))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> their codebook vectors [B, D, h, w] (no straight-through)."""
        if self.kind == "fsq":
            return self.fsq.indices_to_codes(codes)
        if self.kind == "simvq":
            return self.simvq.indices_to_codes(codes)
        return self.vq.get_codes_from_indices(codes)


# ---- the model -------------------------------------------------------------------------------------------------

@dataclass
class VqOutput:
    reconstruction: torch.Tensor  # [B, 3, S, S]
    quantized: Quantized


class VqTokenizer(nn.Module):
    capabilities = frozenset({"codes", "encode_image"})

    def __init__(self, image_size: int, channels: int, channel_mult: list[int], res_blocks: int, attention: bool,
                 norm_groups: int, embed_dim: int, codebook_size: int, quantizer: str, decay: float,
                 dead_code_threshold: float, kmeans_init: bool, rotation_trick: bool, fsq_levels: list[int] | None,
                 text_prior: nn.Module | None = None, sync_codebook: bool = False):
        super().__init__()
        self.image_size, self.embed_dim, self.codebook_size = image_size, embed_dim, codebook_size
        self.grid_size = image_size // 2 ** (len(channel_mult) - 1)
        shape = (channels, channel_mult, res_blocks, attention, norm_groups, embed_dim)
        self.encoder = Encoder(*shape)
        self.quantizer = Quantizer(quantizer, embed_dim, codebook_size, decay, dead_code_threshold, kmeans_init,
                                   rotation_trick, fsq_levels, sync_codebook)
        self.post_quant = nn.Conv2d(embed_dim, embed_dim, 1)
        self.decoder = Decoder(*shape)
        self.text_prior = text_prior  # frozen, or None

    def quantize(self, z: torch.Tensor, update_codebook: bool = True) -> Quantized:
        """z [B, D, h, w] -> Quantized. The codebook statistics update only in training, when asked, and when
        z is finite on every rank (see the module docstring: a skipped step stays consistent)."""
        update = update_codebook and self.training and self.quantizer.kind in ("vq", "ema")
        if update:
            from clipforge.distributed import all_reduce_min

            update = bool(all_reduce_min(torch.isfinite(z).all().float()).item())
        return self.quantizer(z, update=update)

    def forward(self, images: torch.Tensor, update_codebook: bool = True) -> VqOutput:
        quantized = self.quantize(self.encoder(images), update_codebook)
        return VqOutput(self.decode_features(quantized.features), quantized)

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant(features))  # [B, 3, S, S]

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> codes [B, h, w] int64 (never updates the codebook)."""
        return self.quantize(self.encoder(images), update_codebook=False).codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] int64 -> images [B, 3, S, S] (the preprocess's normalised space)."""
        return self.decode_features(self.quantizer.lookup(codes))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, D] the quantised features averaged over the grid (for linear probes)."""
        features = self.quantize(self.encoder(images), update_codebook=False).features.mean(dim=(2, 3))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, Ds] the frozen text prior's sentence feature. Not a declared capability: the model's image and
        text features share no space (the `lgvq` objective's code encoder aligns the codes, not this)."""
        if self.text_prior is None:
            raise AttributeError("this vq model has no text prior")
        features = self.text_prior(tokens).sentence
        return F.normalize(features, dim=-1) if normalize else features


def build_vq(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
             saved: dict | None = None) -> ModelBundle:
    """`model_kwargs` may carry {"text_prior": spec} (the lgvq objective's); `saved` is a model.json."""
    from clipforge.distributed import is_enabled
    from clipforge.models.text_prior import build_text_prior

    name, settings = family_settings(model_config, saved, model_kwargs, VARIANTS, "vq", check_settings)
    prior = None
    if settings["text_prior"] is not None:
        prior = build_text_prior(settings["text_prior"], saved=saved is not None)
        settings["text_prior"] = prior.spec()  # where it came from, with the weights' sha256
    arguments = {k: v for k, v in settings.items() if k != "text_prior"}
    model = VqTokenizer(**arguments, text_prior=prior, sync_codebook=is_enabled()).to(device)
    size = settings["image_size"]
    preprocess = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                     transforms.Normalize([0.5] * 3, [0.5] * 3)])  # [-1, 1]
    no_decay = frozenset(n for n, _ in model.named_parameters() if n.endswith("_codebook.embed"))
    config = {"family": "vq", "name": name, "settings": settings}
    return ModelBundle(model, preprocess, preprocess, prior.tokenizer if prior is not None else None,
                       config=config, frozen=("text_prior",) if prior is not None else (), no_weight_decay=no_decay)


build_vq.resolve_name = resolve_name
