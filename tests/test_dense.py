"""Dense ViT features, region pooling and region crops (clipforge.models.dense)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

from clipforge.errors import ConfigError
from clipforge.models.dense import (
    crop_regions,
    encode_dense,
    encode_image_and_dense,
    encode_image_any_size,
    enlarge_boxes,
    pool_regions,
    positional_embedding_for_grid,
    value_only_block,
)

open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = open_clip.create_model("clipforge-vit-micro")  # 32 px, patch 8, 2 blocks, embed 32
    # random init leaves ln_post/proj near identity-ish; perturb every parameter so no term is trivially 0
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_global_embedding_equals_encode_image_exactly(micro):
    images = torch.randn(3, 3, 32, 32)
    embedding, dense = encode_image_and_dense(micro, images)
    assert torch.equal(embedding, micro.encode_image(images))
    assert torch.equal(encode_image_any_size(micro, images), micro.encode_image(images))
    assert dense.shape == (3, 32, 4, 4)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(3, 4, 4))


def test_dense_map_matches_last_block_with_identity_attention_mask(micro):
    """Reference: open_clip's own last block, run with a mask that lets every token attend only to itself,
    on the penultimate block's output captured by a hook during model.encode_image."""
    images = torch.randn(2, 3, 32, 32)
    captured = {}
    blocks = micro.visual.transformer.resblocks
    handle = blocks[-2].register_forward_hook(lambda mod, inp, out: captured.update(x=out))
    micro.encode_image(images)
    handle.remove()
    tokens = captured["x"].shape[1]
    # additive mask (open_clip casts masks to float): 0 on the diagonal, -inf elsewhere
    self_only = torch.full((tokens, tokens), float("-inf")).fill_diagonal_(0.0)
    reference = blocks[-1](captured["x"], attn_mask=self_only)[:, 1:]  # [B, 16, width]
    reference = F.normalize(micro.visual.ln_post(reference) @ micro.visual.proj, dim=-1)
    reference = reference.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # row-major patches -> [B, D, h, w]
    torch.testing.assert_close(encode_dense(micro, images), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("custom", [False, True])
def test_value_only_block_is_the_block_on_a_single_token(custom):
    """With one token, softmax attention is the identity, so the value-only block equals the block."""
    torch.manual_seed(1)
    if custom:  # open_clip's custom block with head scaling, inner norm and layer scale
        block = CustomResidualAttentionBlock(16, 4, ls_init_value=0.5, scale_heads=True, scale_attn_inner=True,
                                             scale_attn=True)
        with torch.no_grad():
            block.attn.head_scale.copy_(torch.rand(4, 1, 1) + 0.5)
    else:
        block = ResidualAttentionBlock(16, 4, ls_init_value=0.5)
    block.eval()
    x = torch.randn(3, 1, 16)
    torch.testing.assert_close(value_only_block(block, x), block(x), atol=1e-6, rtol=1e-5)
    # and each token only sees itself: changing token 1 leaves token 0 unchanged
    pair = torch.randn(3, 2, 16)
    changed = pair.clone()
    changed[:, 1] += 1.0
    assert torch.equal(value_only_block(block, pair)[:, 0], value_only_block(block, changed)[:, 0])


def test_non_native_resolution(micro):
    images = torch.randn(2, 3, 48, 64)  # grid 6 x 8 instead of 4 x 4
    embedding, dense = encode_image_and_dense(micro, images)
    assert dense.shape == (2, 32, 6, 8)
    assert embedding.shape == (2, 32)
    torch.testing.assert_close(encode_image_any_size(micro, images), embedding)
    # the native grid keeps the learned embedding; another grid resizes only the patch part
    assert positional_embedding_for_grid(micro.visual, (4, 4)) is micro.visual.positional_embedding
    resized = positional_embedding_for_grid(micro.visual, (6, 8))
    assert resized.shape == (1 + 48, 32)
    assert torch.equal(resized[0], micro.visual.positional_embedding[0])


def test_resnet_tower_is_refused():
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
    )
    with pytest.raises(ConfigError, match="ViT image tower, got ModifiedResNet"):
        encode_dense(model, torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# Region pooling: boxes in pixels of a 32 x 48 (H x W) image over a 4 x 6 map (patch 8)


def hot_cell_map(row: int, col: int) -> torch.Tensor:
    """[1, 2, 4, 6]: channel 0 is 1 at one cell and 0 elsewhere, channel 1 is 1 everywhere."""
    dense = torch.zeros(1, 2, 4, 6)
    dense[0, 0, row, col] = 1.0
    dense[0, 1] = 1.0
    return dense


def pool(dense, boxes, normalize=False):
    boxes = torch.tensor(boxes, dtype=torch.float32).unsqueeze(0)  # [1, M, 4]
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool)
    return pool_regions(dense, boxes, valid, (32, 48), normalize=normalize)[0, :, 0]  # channel 0 per box


def test_pool_coordinates_are_x_then_y_in_pixels():
    dense = hot_cell_map(row=1, col=4)  # the cell spanning x in [32, 40), y in [8, 16)
    values = pool(dense, [
        [32, 8, 40, 16],  # exactly the hot cell -> one sample at its centre -> 1
        [8, 32, 16, 40],  # the same numbers read as (y, x): another cell -> 0
        [24, 8, 40, 16],  # two cells wide (cols 3, 4): samples at both centres -> 1/2
        [28, 8, 36, 16],  # half a cell to the left: one sample midway between cols 3 and 4 -> 1/2
        [0, 0, 16, 16],  # far away -> 0
        [32, 8, 40, 24],  # two cells tall (rows 1, 2) -> 1/2
    ])
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.5]))


def test_whole_image_box_pools_to_the_map_mean():
    """aligned=True shifts by half a cell and adaptive sampling takes h x w samples, which then land exactly
    on the cell centres: the average of the samples is the exact mean of the map (then unit-normalised)."""
    torch.manual_seed(2)
    dense = torch.randn(2, 8, 4, 6)
    boxes = torch.tensor([[[0, 0, 48, 32]], [[0, 0, 48, 32]]], dtype=torch.float32)
    valid = torch.ones(2, 1, dtype=torch.bool)
    pooled = pool_regions(dense, boxes, valid, (32, 48))[:, 0]  # [2, 8]
    torch.testing.assert_close(pooled, F.normalize(dense.mean(dim=(2, 3)), dim=-1))


def test_invalid_slots_are_zero_and_never_read():
    dense = hot_cell_map(row=1, col=4).requires_grad_(True)
    boxes = torch.tensor([[[32, 8, 40, 16], [float("nan")] * 4, [1e9, -5, 3, 2]]])
    valid = torch.tensor([[True, False, False]])
    pooled = pool_regions(dense, boxes, valid, (32, 48))  # [1, 3, 2]
    torch.testing.assert_close(pooled[0, 0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    assert torch.equal(pooled[0, 1:], torch.zeros(2, 2))
    pooled.sum().backward()
    assert torch.isfinite(dense.grad).all()
    assert torch.equal(pool_regions(dense, boxes, torch.zeros(1, 3, dtype=torch.bool), (32, 48)),
                       torch.zeros(1, 3, 2))


# ---------------------------------------------------------------------------------------------------------
# Crops


def test_crop_of_pixel_aligned_box_is_the_sub_image():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 48)
    boxes = torch.tensor([[0, 0, 48, 32], [8, 4, 24, 20], [40, 16, 48, 32]], dtype=torch.float32)
    batch_index = torch.tensor([0, 1, 0])
    whole = crop_regions(images, boxes[:1], batch_index[:1], (32, 48))
    torch.testing.assert_close(whole[0], images[0])
    part = crop_regions(images, boxes[1:2], batch_index[1:2], (16, 16))  # x 8..24, y 4..20 of image 1
    torch.testing.assert_close(part[0], images[1, :, 4:20, 8:24])
    corner = crop_regions(images, boxes[2:], batch_index[2:], (16, 8))  # (height, width) output
    torch.testing.assert_close(corner[0], images[0, :, 16:32, 40:48])


def test_enlarge_boxes_about_centre_and_clip():
    boxes = torch.tensor([[8.0, 8.0, 24.0, 16.0], [0.0, 0.0, 10.0, 10.0], [40.0, 20.0, 48.0, 32.0]])
    enlarged = enlarge_boxes(boxes, 1.5, (32, 48))
    expected = torch.tensor([[4.0, 6.0, 28.0, 18.0], [0.0, 0.0, 12.5, 12.5], [38.0, 17.0, 48.0, 32.0]])
    torch.testing.assert_close(enlarged, expected)
