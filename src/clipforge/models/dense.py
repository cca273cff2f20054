"""Dense (per-patch) features of an open_clip ViT, region pooling and region crops.

FineCLIP and CLIPSelf read region features off a dense map built from the ViT's last block with its
attention replaced by each token's own value path ("every token attends only to itself"); the residual and
the MLP are kept, the class token is dropped, and every patch token goes through `ln_post` and `proj` like the
pooled token does (FineCLIP, NeurIPS 2024; docs/fineclip.md).

`encode_image_and_dense` computes the global embedding and the dense map in ONE pass of the full image: the
first L-1 blocks are shared, then the last block runs twice on the same input, once as usual (for the class
token) and once value-only (for the map). The official FineCLIP code runs two full-image forward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from clipforge.errors import ConfigError


def vision_transformer(model: nn.Module) -> VisionTransformer:
    """The open_clip ViT image tower of `model` (a CLIP, or the tower itself); ConfigError otherwise."""
    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else type(model).__name__
        raise ConfigError(f"dense region features need an open_clip ViT image tower, got {kind}")
    if visual.attn_pool is not None or visual.pool_type == "none":
        raise ConfigError("dense region features do not support ViTs with attentional pooling")
    if visual.proj is None:
        raise ConfigError("dense region features need the ViT's output projection (visual.proj is None)")
    return visual


def positional_embedding_for_grid(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + h*w, width] positional embedding; the patch part is resized bicubically when the grid differs."""
    embedding = visual.positional_embedding  # [1 + gh*gw, width]
    if tuple(grid) == tuple(visual.grid_size):
        return embedding
    class_pos, patch_pos = embedding[:1], embedding[1:]
    gh, gw = visual.grid_size
    patch_pos = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [1, width, gh, gw]
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(embedding.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([class_pos, patch_pos], dim=0)


def _embed(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embed, class token, positional embedding and ln_pre, as VisionTransformer._embeds does, but for
    any input resolution. Returns tokens [B, 1 + h*w, width] and the grid (h, w)."""
    if visual.training and not isinstance(visual.patch_dropout, nn.Identity):
        raise ConfigError("dense region features cannot be used with patch dropout (it removes patches)")
    x = visual.conv1(images)  # [B, width, h, w]
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    class_token = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([class_token, x], dim=1)  # [B, 1 + h*w, width]
    x = x + positional_embedding_for_grid(visual, grid).to(x.dtype)
    return visual.ln_pre(x), grid


def _run_blocks(visual: VisionTransformer, x: torch.Tensor, blocks) -> torch.Tensor:
    """Run `blocks` on NLD tokens, honouring the transformer's layout and gradient checkpointing."""
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # NLD -> LND
    for block in blocks:
        if visual.transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x if batch_first else x.transpose(0, 1)


def value_only_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block with attention replaced by each token's own value path; residual, MLP and layer scale kept.

    Works on either token layout (the value path is per token). Equals `block(x)` for a one-token sequence,
    where softmax attention is the identity.
    """
    if isinstance(block, ResidualAttentionBlock):
        attention = block.attn  # nn.MultiheadAttention
        width = attention.embed_dim
        if attention._qkv_same_embed_dim:
            value_weight = attention.in_proj_weight[2 * width:]
        else:
            value_weight = attention.v_proj_weight
        value_bias = attention.in_proj_bias[2 * width:] if attention.in_proj_bias is not None else None
        values = F.linear(block.ln_1(x), value_weight, value_bias)
        attended = attention.out_proj(values)
    elif isinstance(block, CustomResidualAttentionBlock):
        attention = block.attn  # open_clip Attention
        width = attention.in_proj_weight.shape[1]
        value_bias = attention.in_proj_bias[2 * width:] if attention.in_proj_bias is not None else None
        values = F.linear(block.ln_1(x), attention.in_proj_weight[2 * width:], value_bias)
        if attention.head_scale is not None:
            heads = attention.num_heads
            values = (values.unflatten(-1, (heads, -1)) * attention.head_scale.view(heads, 1)).flatten(-2)
        attended = attention.out_drop(attention.out_proj(attention.ln_inner(values)))
        attended = block.ln_attn(attended)
    else:
        raise ConfigError(f"dense region features do not support ViT blocks of type {type(block).__name__}")
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _global_embedding(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    pooled, _ = visual._pool(tokens)  # the tower's own pooling (tok/avg, ln_post before or after)
    return pooled @ visual.proj  # [B, D]


def encode_image_and_dense(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the full image -> (image embedding [B, D], dense map [B, D, h, w]).

    The image embedding is unnormalised and equals `model.encode_image(images)` at the native resolution;
    at other resolutions the positional embedding is resized bicubically. The dense map is L2-normalised per
    location; h = H // patch, w = W // patch.
    """
    visual = vision_transformer(model)
    x, (h, w) = _embed(visual, images)
    blocks = visual.transformer.resblocks
    x = _run_blocks(visual, x, blocks[:-1])  # [B, 1 + h*w, width], shared by both heads
    image_embedding = _global_embedding(visual, _run_blocks(visual, x, blocks[-1:]))
    dense = value_only_block(blocks[-1], x)[:, 1:]  # [B, h*w, width], class token dropped
    dense = F.normalize(visual.ln_post(dense) @ visual.proj, dim=-1)  # [B, h*w, D]
    dense = dense.reshape(dense.shape[0], h, w, -1).permute(0, 3, 1, 2)  # [B, D, h, w]
    return image_embedding, dense


def encode_dense(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense map only: [B, D, h, w], L2-normalised per location."""
    return encode_image_and_dense(model, images)[1]


def encode_image_any_size(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`model.encode_image` at any input resolution (positional embedding resized): [B, D] unnormalised."""
    visual = vision_transformer(model)
    if tuple(images.shape[-2:]) == tuple(visual.image_size):
        return model.encode_image(images) if model is not visual else visual(images)
    x, _ = _embed(visual, images)
    return _global_embedding(visual, _run_blocks(visual, x, visual.transformer.resblocks))


def pool_regions(
    dense: torch.Tensor,  # [B, D, h, w]
    boxes: torch.Tensor,  # [B, M, 4] (x0, y0, x1, y1) in pixels of the input image
    valid: torch.Tensor,  # [B, M] bool; invalid slots are never read (they may hold NaN)
    image_size: tuple[int, int],  # (H, W) of the input image
    normalize: bool = True,
) -> torch.Tensor:
    """RoIAlign (1x1, aligned=True, adaptive sampling) of each valid box -> [B, M, D]; invalid rows are 0.

    Pixel coordinates map to feature coordinates by (w / W, h / H); with aligned=True a box [0, 0, W, H]
    samples exactly the h x w cell centres, so it pools to the map's mean. Use image sizes that are a
    multiple of the patch size (open_clip's patch embedding drops any remainder).
    """
    batch, channels, h, w = dense.shape
    height, width = image_size
    pooled = dense.new_zeros(batch, boxes.shape[1], channels)  # [B, M, D]
    # no early return when K = 0: the result stays in the autograd graph on every rank, so a gather with
    # gradients downstream runs its backward collective on all ranks alike
    batch_index, slot_index = valid.nonzero(as_tuple=True)  # [K], [K]
    # coordinates stay float32 (in bf16 a 224 px box would round to whole pixels), and so does the pooling
    scale = torch.tensor([w / width, h / height, w / width, h / height], device=dense.device)
    feature_boxes = boxes[batch_index, slot_index].float() * scale  # [K, 4] in cells
    rois = torch.cat([batch_index.float().unsqueeze(1), feature_boxes], dim=1)  # [K, 5]
    features = roi_align(dense.float(), rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                         aligned=True)
    features = features[:, :, 0, 0].to(dense.dtype)  # [K, D]
    if normalize:
        features = F.normalize(features, dim=-1)
    return pooled.index_put((batch_index, slot_index), features)


def enlarge_boxes(boxes: torch.Tensor, scale: float, image_size: tuple[int, int]) -> torch.Tensor:
    """Scale [K, 4] boxes about their centres by `scale`, then clip to the image (H, W)."""
    height, width = image_size
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [K, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)  # [K, 2]
    low = centre - half
    high = centre + half
    limit = boxes.new_tensor([width, height])
    return torch.cat([low.clamp_min(0), torch.minimum(high, limit)], dim=1)


def crop_regions(
    images: torch.Tensor,  # [B, 3, H, W] (already normalised)
    boxes: torch.Tensor,  # [K, 4] pixels
    batch_index: torch.Tensor,  # [K] image of each box
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Crop and resize every box in one batched RoIAlign (bilinear; area-averaging when shrinking): [K, 3, S, S].

    A box [0, 0, W, H] at output size (H, W) returns the image itself (samples land on pixel centres).
    """
    rois = torch.cat([batch_index.float().unsqueeze(1), boxes.float()], dim=1)  # [K, 5], float32 coordinates
    crops = roi_align(images.float(), rois, output_size=output_size, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)
    return crops.to(images.dtype)
