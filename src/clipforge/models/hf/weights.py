"""The one table of weight names between open_clip's CLIP and transformers' CLIPModel, read both ways.

    names = weight_names(vision_layers=12, text_layers=12)
    hf_state = to_transformers(open_clip_state, names)    # export
    open_clip_state = to_open_clip(hf_state, names)       # import: the same table, read the other way

Where the layouts differ (each row of the table says which):
- `visual.proj` and `text_projection` are matrices applied as x @ W in open_clip, Linear layers (x @ W^T) in
  transformers: transposed.
- attention: open_clip (torch's MultiheadAttention) packs q, k, v into one `in_proj_weight` [3D, D] and
  `in_proj_bias` [3D]; transformers has q_proj, k_proj, v_proj: split in that order along dim 0.
- `logit_scale`: the same log-temperature in both; a scalar in transformers.
- everything else is the same tensor under another name (class_embedding [D], positional embeddings [N, D] as
  an nn.Embedding's weight, conv1 = patch_embedding, ln_pre = pre_layrnorm, ln_post = post_layernorm, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipforge.errors import CheckpointError
from clipforge.models.hf.architecture import UnsupportedArchitecture

# transformers buffers that older checkpoints saved and current ones do not: not weights
IGNORED_TRANSFORMERS_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


@dataclass(frozen=True)
class WeightName:
    open_clip: str
    transformers: tuple[str, ...]  # one name, or the q, k, v names of a packed projection
    layout: str = "same"  # same | transposed | packed_qkv | scalar


# layout -> (open_clip tensor -> transformers tensors, transformers tensors -> open_clip tensor)
LAYOUTS = {
    "same": (lambda t: (t,), lambda ts: ts[0]),
    "transposed": (lambda t: (t.T,), lambda ts: ts[0].T),
    "packed_qkv": (lambda t: t.chunk(3, dim=0), lambda ts: torch.cat(ts, dim=0)),
    "scalar": (lambda t: (t.reshape(()),), lambda ts: ts[0].reshape(())),
}


def _pair(ours: str, theirs: str, layout: str = "same") -> WeightName:
    return WeightName(ours, (theirs,), layout)


def _norm(ours: str, theirs: str) -> list[WeightName]:
    return [_pair(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def _block(ours: str, theirs: str) -> list[WeightName]:
    """One residual attention block: open_clip's resblocks.i <-> transformers' encoder.layers.i."""
    names = [*_norm(f"{ours}.ln_1", f"{theirs}.layer_norm1"), *_norm(f"{ours}.ln_2", f"{theirs}.layer_norm2")]
    for part in ("weight", "bias"):
        names.append(WeightName(f"{ours}.attn.in_proj_{part}",
                                tuple(f"{theirs}.self_attn.{p}_proj.{part}" for p in "qkv"), "packed_qkv"))
        names.append(_pair(f"{ours}.attn.out_proj.{part}", f"{theirs}.self_attn.out_proj.{part}"))
        names.append(_pair(f"{ours}.mlp.c_fc.{part}", f"{theirs}.mlp.fc1.{part}"))
        names.append(_pair(f"{ours}.mlp.c_proj.{part}", f"{theirs}.mlp.fc2.{part}"))
    return names


def weight_names(vision_layers: int, text_layers: int) -> list[WeightName]:
    """Every weight of an open_clip ViT CLIP with these depths, with its transformers name(s) and layout."""
    names = [
        _pair("logit_scale", "logit_scale", "scalar"),
        _pair("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        _pair("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        _pair("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        *_norm("visual.ln_pre", "vision_model.pre_layrnorm"),
        *_norm("visual.ln_post", "vision_model.post_layernorm"),
        _pair("visual.proj", "visual_projection.weight", "transposed"),
        _pair("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        _pair("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        *_norm("ln_final", "text_model.final_layer_norm"),
        _pair("text_projection", "text_projection.weight", "transposed"),
    ]
    for i in range(vision_layers):
        names += _block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(text_layers):
        names += _block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    return names


def to_transformers(state: dict[str, torch.Tensor], names: list[WeightName]) -> dict[str, torch.Tensor]:
    """open_clip state dict -> transformers CLIPModel state dict. A weight the table has no row for is a part
    transformers cannot hold: UnsupportedArchitecture naming it (never dropped)."""
    leftover = sorted(set(state) - {n.open_clip for n in names})
    if leftover:
        raise UnsupportedArchitecture(f"transformers' CLIPModel has no place for the weight '{leftover[0]}' "
                                      f"({len(leftover)} such); not exported")
    converted = {}
    for name in names:
        forward, _ = LAYOUTS[name.layout]
        for key, tensor in zip(name.transformers, forward(state[name.open_clip])):
            converted[key] = tensor.contiguous()
    return converted


def to_open_clip(state: dict[str, torch.Tensor], names: list[WeightName], source: str) -> dict[str, torch.Tensor]:
    """transformers CLIPModel state dict -> open_clip state dict, by the same table. CheckpointError (one line)
    for a missing or unexpected weight."""
    expected = {key for name in names for key in name.transformers}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - set(IGNORED_TRANSFORMERS_KEYS))
    if missing or unexpected:
        problems = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
                   ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        raise CheckpointError(f"weights of '{source}' are not a transformers CLIPModel's: {'; '.join(problems)}")
    converted = {}
    for name in names:
        _, backward = LAYOUTS[name.layout]
        converted[name.open_clip] = backward(tuple(state[key] for key in name.transformers)).contiguous()
    return converted
