"""The `toy` family: a tiny conv image encoder with a class head and an image decoder.

It exists to keep the family seam honest: it is not open_clip, has no text tower and no tokenizer, draws
from the RNG in training (dropout), and one variant has a frozen "pretrained" part that checkpoints
reference instead of copying. The `classify` objective trains its head; `toy_gan` trains its decoder
against a discriminator in a second optimiser phase. Evaluation sees `encode_image` only.

Variants (diffusers-style: one small config dict each):
    toy-classifier-tiny          32 px, 64 classes, dropout 0.1
    toy-classifier-frozen-stem   the same, with the first conv block frozen and rebuilt from a seed on load
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from clipforge.config import ModelConfig
from clipforge.errors import ConfigError
from clipforge.models.family import ModelBundle

VARIANTS: dict[str, dict] = {
    "toy-classifier-tiny": {"image_size": 32, "width": 16, "embed_dim": 32, "num_classes": 64, "dropout": 0.1,
                            "frozen_stem_seed": None},
    "toy-classifier-frozen-stem": {"image_size": 32, "width": 16, "embed_dim": 32, "num_classes": 64,
                                   "dropout": 0.1, "frozen_stem_seed": 1234},
}


class ToyConvNet(nn.Module):
    capabilities = frozenset({"encode_image"})

    def __init__(self, image_size: int, width: int, embed_dim: int, num_classes: int, dropout: float,
                 frozen_stem_seed: int | None = None):
        super().__init__()
        self.image_size = image_size
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GELU())  # [B, w, S/2, S/2]
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # [B, 2w, S/4, S/4]
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        side = image_size // 4
        self.decoder = nn.Sequential(nn.Linear(embed_dim, 2 * width * side * side), nn.Unflatten(1, (2 * width, side, side)),
                                     nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.GELU(),
                                     nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1))  # [B, 3, S, S]
        if frozen_stem_seed is not None:  # a stand-in for pretrained weights: rebuilt identically from the seed
            generator = torch.Generator().manual_seed(frozen_stem_seed)
            with torch.no_grad():
                for param in self.stem.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            self.stem.requires_grad_(False)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.body(self.stem(images))  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encode_image(images)))  # [B, C] logits

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dropout(self.encode_image(images)))  # [B, 3, S, S]


def resolve_name(name: str) -> None:
    if name not in VARIANTS:
        raise ConfigError(f"model.name '{name}' is not a toy variant (known: {', '.join(VARIANTS)})")


def build_toy(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
              saved: dict | None = None) -> ModelBundle:
    if saved is not None:
        settings = dict(saved["settings"])
    else:
        resolve_name(model_config.name)
        settings = {**VARIANTS[model_config.name], **(model_kwargs or {})}
    model = ToyConvNet(**settings).to(device)
    size = settings["image_size"]
    preprocess = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                     transforms.Normalize([0.5] * 3, [0.5] * 3)])
    frozen = ("stem",) if settings.get("frozen_stem_seed") is not None else ()
    config = {"family": "toy", "name": model_config.name if saved is None else saved["name"], "settings": settings}
    return ModelBundle(model, preprocess, preprocess, None, config=config, frozen=frozen)


build_toy.resolve_name = resolve_name
