"""Image tokens of any image encoder, for frozen-transfer tasks that train their own pooling on top
(the attentive probe, LiT-style retrieval, captioning).

    encode_image_tokens(model, images [B, 3, S, S]) -> [B, N, W]

A model that has its own `encode_image_tokens` method serves it (the `lcl` family: its ViT's patch tokens,
before the attentive pooler). An open_clip ViT image tower (a CLIP or FineCLIP run) gives its output tokens
after `ln_post`, class token excluded, before the projection: the same place in both encoders, so CLIP, FineCLIP
and LCL compare in one table.
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.errors import ConfigError


def _open_clip_vit(model: nn.Module):
    from open_clip.transformer import VisionTransformer

    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    return visual if isinstance(visual, VisionTransformer) else None


def serves_image_tokens(model: nn.Module) -> bool:
    return callable(getattr(model, "encode_image_tokens", None)) or _open_clip_vit(model) is not None


def encode_image_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, N, W] output tokens of the model's image encoder (see the module docstring)."""
    own = getattr(model, "encode_image_tokens", None)
    if callable(own):
        return own(images)
    visual = _open_clip_vit(model)
    if visual is None:
        raise ConfigError(f"{type(model).__name__} has no image tokens (needs encode_image_tokens or an open_clip "
                          f"ViT image tower)")
    x = visual.transformer(visual._embeds(images))
    _, tokens = visual._pool(x)  # the tower's own pooling split: ln_post applied as the tower does
    return tokens
