"""open_clip architectures <-> transformers `CLIPConfig`, and open_clip's eval transform <-> `CLIPImageProcessor`.

`transformers_config(architecture)` turns an open_clip model config (our model_configs/*.json, open_clip's own,
or a checkpoint's model.json "architecture") into `CLIPConfig` keyword arguments; `open_clip_architecture(config)`
reads a transformers config.json back. Both check every option and refuse, with one line naming the part, an
architecture the other side cannot hold: nothing is dropped on the way.

The details that decide parity:
- activation: open_clip has one flag for both towers (`quick_gelu`: x * sigmoid(1.702 x), OpenAI's; else exact
  erf GELU); transformers has `hidden_act` per tower ("quick_gelu" / "gelu").
- layer norm eps: open_clip's default is 1e-5 (torch's); other values live in a tower's `norm_kwargs`.
- text pooling: open_clip pools at argmax(token id) ("argmax", the end-of-text token is the largest id) or at the
  first `eos_id` ("eos"). transformers 5.x pools at argmax(input_ids) exactly when `eos_token_id == 2` (the rule
  kept for configs written before transformers PR #24773) and at the first `eos_token_id` otherwise, so "argmax"
  is written as eos_token_id 2 and "eos" as its id.
"""

from __future__ import annotations

import dataclasses
import math

from clipforge.errors import ConfigError

OPEN_CLIP_LAYER_NORM_EPS = 1e-5
ARGMAX_POOLING_EOS_ID = 2  # transformers' CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2
BPE_VOCAB_SIZE = 49408  # open_clip's bundled BPE (bpe_simple_vocab_16e6): 49406 tokens + start and end of text
START_OF_TEXT_ID, END_OF_TEXT_ID = 49406, 49407
ACTIVATIONS = {False: "gelu", True: "quick_gelu"}  # open_clip quick_gelu flag -> transformers hidden_act
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # open_clip interpolation name -> PIL resampling id


class UnsupportedArchitecture(ConfigError):
    """An architecture the target format cannot express (one line naming the part)."""


# open_clip options that have no counterpart in transformers' CLIPModel, and what each one is
_PARTS = {
    "attentional_pool": "an attentional pooler",
    "timm_model_name": "a timm (non-ViT) image tower",
    "ls_init_value": "layer scale",
    "no_ln_pre": "an image tower without ln_pre",
    "block_type": "a custom attention block",
    "qk_norm": "qk-norm attention",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scales",
    "scale_attn_inner": "an inner attention norm",
    "scale_attn": "a post-attention norm",
    "scale_fc": "an MLP norm",
    "embed_cls": "a text class token (CoCa)",
    "no_causal_mask": "a bidirectional text tower (no causal mask)",
    "proj_bias": "a text projection with a bias",
    "hf_model_name": "a Hugging Face text encoder",
    "hf_tokenizer_name": "a tokenizer other than CLIP's BPE",
    "tokenizer_mode": "a tokenizer other than CLIP's BPE",
    "tokenizer_kwargs": "tokenizer options (transformers' CLIPTokenizer has none)",
    "custom_text": "a custom text tower (open_clip's CustomTextCLIP)",
    "init_logit_bias": "logit_bias (a SigLIP-trained model)",
    "act_kwargs": "activation options",
    "multimodal_cfg": "a multimodal text decoder (CoCa)",
}
# options that do not change what the model computes at inference, or are handled below
_VISION_HANDLED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs",
                   "patch_dropout", "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens"}
_TEXT_HANDLED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "pool_type",
                 "eos_id", "pad_id", "output_tokens", "final_ln_after_pool", "proj_type"}
_TOP_HANDLED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "nonscalar_logit_scale",
                "cast_dtype"}


def _refuse(part: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"transformers' CLIPModel cannot hold {part}; not exported")


def _defaults(cfg_class) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cfg_class) if f.default is not dataclasses.MISSING}


def _check_options(options: dict, defaults: dict, handled: set, where: str) -> None:
    for key, value in options.items():
        if key in handled or value == defaults.get(key, object()) or value in (None, {}, False):
            continue
        raise _refuse(f"{_PARTS.get(key, 'an unknown option')} ({where}{key}={repr(value)[:60]})")


def _layer_norm_eps(tower: dict, where: str) -> float:
    norm_kwargs = dict(tower.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", OPEN_CLIP_LAYER_NORM_EPS))
    if norm_kwargs:
        raise _refuse(f"layer-norm options {sorted(norm_kwargs)} ({where}norm_kwargs)")
    return eps


def _intermediate_size(width: int, mlp_ratio: float) -> int:
    return int(width * mlp_ratio)  # as open_clip's ResidualAttentionBlock sizes its MLP


def transformers_config(architecture: dict, model_kwargs: dict | None = None) -> dict:
    """`CLIPConfig` keyword arguments for an open_clip architecture; UnsupportedArchitecture (one line) for a part
    transformers' CLIPModel cannot hold. `model_kwargs` are the extra constructor arguments the model was built
    with (a checkpoint's model.json), e.g. SigLIP's init_logit_bias."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    options = {**architecture, **{k: v for k, v in (model_kwargs or {}).items() if not k.startswith("image_")}}
    _check_options(options, {"quick_gelu": False, "custom_text": False}, _TOP_HANDLED, "")
    vision, text = dict(architecture["vision_cfg"]), dict(architecture["text_cfg"])
    if isinstance(vision.get("layers"), list | tuple):
        raise _refuse(f"a ResNet image tower (vision_cfg.layers={vision['layers']})")
    _check_options(vision, _defaults(CLIPVisionCfg), _VISION_HANDLED, "vision_cfg.")
    _check_options(text, _defaults(CLIPTextCfg), _TEXT_HANDLED, "text_cfg.")
    if vision.get("pool_type", "tok") != "tok":
        raise _refuse(f"'{vision['pool_type']}' image pooling (vision_cfg.pool_type; transformers pools the class "
                      f"token)")
    if text.get("proj_type", "linear") != "linear":
        raise _refuse(f"a text tower without its linear projection (text_cfg.proj_type={text['proj_type']!r})")
    for key in ("image_size", "patch_size"):
        value = vision.get(key, _defaults(CLIPVisionCfg)[key])
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise _refuse(f"a non-square {key} (vision_cfg.{key}={list(value)})")
            vision[key] = value[0]
    pool_type = text.get("pool_type", "argmax")
    if pool_type == "argmax":
        eos_token_id = ARGMAX_POOLING_EOS_ID
    elif pool_type == "eos" and text.get("eos_id", 2) != ARGMAX_POOLING_EOS_ID:
        eos_token_id = int(text["eos_id"])
    else:
        raise _refuse(f"'{pool_type}' text pooling (text_cfg.pool_type, eos_id={text.get('eos_id', 2)}); "
                      f"transformers pools at argmax or at the first eos_token_id other than 2")
    vocab_size = int(text.get("vocab_size", 49408))
    if vocab_size < BPE_VOCAB_SIZE:
        raise _refuse(f"a {vocab_size}-token text vocabulary with CLIP's {BPE_VOCAB_SIZE}-token BPE tokenizer")
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    if width % head_width:
        raise _refuse(f"an image width {width} that is not a multiple of head_width {head_width}")
    hidden_act = ACTIVATIONS[bool(architecture.get("quick_gelu", False))]
    text_width = int(text.get("width", 512))
    vision_config = {
        "hidden_size": width,
        "intermediate_size": _intermediate_size(width, float(vision.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision.get("layers", 12)),
        "num_attention_heads": width // head_width,
        "image_size": int(vision.get("image_size", 224)),
        "patch_size": int(vision.get("patch_size", 16)),
        "num_channels": 3,
        "hidden_act": hidden_act,
        "layer_norm_eps": _layer_norm_eps(vision, "vision_cfg."),
        "projection_dim": int(architecture["embed_dim"]),
    }
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": _intermediate_size(text_width, float(text.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text.get("layers", 12)),
        "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        "hidden_act": hidden_act,
        "layer_norm_eps": _layer_norm_eps(text, "text_cfg."),
        "bos_token_id": START_OF_TEXT_ID,
        "eos_token_id": eos_token_id,
        "pad_token_id": END_OF_TEXT_ID,  # what the exported tokenizer pads with
        "projection_dim": int(architecture["embed_dim"]),  # read by CLIPTextModelWithProjection
    }
    return {"text_config": text_config, "vision_config": vision_config,
            "projection_dim": int(architecture["embed_dim"])}


def open_clip_architecture(config: dict, source: str) -> dict:
    """The open_clip architecture of a transformers CLIP config.json (a dict); UnsupportedArchitecture (one line)
    for what open_clip's CLIP cannot hold. `source` names the folder in messages."""
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConfigError(f"'{source}/config.json' needs text_config and vision_config objects")
    try:
        text_act, vision_act = text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")
        if text_act != vision_act:
            raise UnsupportedArchitecture(f"'{source}': text hidden_act {text_act!r} and vision hidden_act "
                                          f"{vision_act!r} differ; open_clip uses one activation for both towers")
        quick_gelu = {v: k for k, v in ACTIVATIONS.items()}.get(text_act)
        if quick_gelu is None:
            raise UnsupportedArchitecture(f"'{source}': hidden_act {text_act!r} has no open_clip counterpart "
                                          f"(gelu or quick_gelu)")
        if int(vision.get("num_channels", 3)) != 3:
            raise UnsupportedArchitecture(f"'{source}': {vision['num_channels']}-channel images (open_clip takes RGB)")
        vision_width, heads = int(vision.get("hidden_size", 768)), int(vision.get("num_attention_heads", 12))
        if vision_width % heads:
            raise UnsupportedArchitecture(f"'{source}': vision hidden_size {vision_width} is not a multiple of its "
                                          f"{heads} heads")
        vocab_size = int(text.get("vocab_size", BPE_VOCAB_SIZE))
        if vocab_size < BPE_VOCAB_SIZE:
            raise UnsupportedArchitecture(f"'{source}': a {vocab_size}-token text vocabulary; clipforge trains with "
                                          f"CLIP's {BPE_VOCAB_SIZE}-token BPE tokenizer")
        eos_token_id = int(text.get("eos_token_id", 2))
        text_cfg = {
            "context_length": int(text.get("max_position_embeddings", 77)),
            "vocab_size": vocab_size,
            "width": int(text.get("hidden_size", 512)),
            "heads": int(text.get("num_attention_heads", 8)),
            "layers": int(text.get("num_hidden_layers", 12)),
            "mlp_ratio": _mlp_ratio(text, "text", source),
        }
        if eos_token_id != ARGMAX_POOLING_EOS_ID:
            text_cfg.update(pool_type="eos", eos_id=eos_token_id)
        vision_cfg = {
            "image_size": int(vision.get("image_size", 224)),
            "patch_size": int(vision.get("patch_size", 32)),
            "width": vision_width,
            "head_width": vision_width // heads,
            "layers": int(vision.get("num_hidden_layers", 12)),
            "mlp_ratio": _mlp_ratio(vision, "vision", source),
        }
        for tower, cfg in ((text, text_cfg), (vision, vision_cfg)):
            eps = float(tower.get("layer_norm_eps", OPEN_CLIP_LAYER_NORM_EPS))
            if eps != OPEN_CLIP_LAYER_NORM_EPS:
                cfg["norm_kwargs"] = {"eps": eps}
        architecture = {"embed_dim": int(config.get("projection_dim", 512)), "vision_cfg": vision_cfg,
                        "text_cfg": text_cfg}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"'{source}/config.json' has a malformed value ({err})") from None
    if quick_gelu:
        architecture["quick_gelu"] = True
    return architecture


def _mlp_ratio(tower: dict, name: str, source: str) -> float:
    width, intermediate = int(tower.get("hidden_size", 512)), int(tower.get("intermediate_size", 2048))
    ratio = intermediate / width
    if _intermediate_size(width, ratio) != intermediate:
        raise UnsupportedArchitecture(f"'{source}': {name} intermediate_size {intermediate} is not expressible as "
                                      f"open_clip's mlp_ratio for width {width}")
    return ratio


# ---- preprocessing ----------------------------------------------------------------------------------------------

def image_processor_config(preprocess_cfg: dict) -> dict:
    """`CLIPImageProcessor` keyword arguments equal to open_clip's eval transform (`get_model_preprocess_cfg`):
    resize (shortest edge, or squash), centre crop, RGB, /255, normalise."""
    size = preprocess_cfg["size"]
    size = size if isinstance(size, int) else (size[0] if len(set(size)) == 1 else None)
    if size is None:
        raise _refuse(f"a non-square input size {list(preprocess_cfg['size'])}")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in PIL_RESAMPLE:
        raise _refuse(f"'{interpolation}' resizing in the eval transform (transformers: bilinear or bicubic)")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode == "shortest":
        resize = {"size": {"shortest_edge": size}, "do_center_crop": True}
    elif resize_mode == "squash":
        resize = {"size": {"height": size, "width": size}, "do_center_crop": False}
    else:
        raise _refuse(f"the '{resize_mode}' resize mode of the eval transform (resize and pad)")
    return {**resize, "crop_size": {"height": size, "width": size}, "resample": PIL_RESAMPLE[interpolation],
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(v) for v in preprocess_cfg["mean"]],
            "image_std": [float(v) for v in preprocess_cfg["std"]], "do_convert_rgb": True}


def preprocess_kwargs(processor: dict | None, image_size: int, source: str) -> dict:
    """open_clip `create_model_and_transforms` keyword arguments (image_mean, image_std, image_interpolation,
    image_resize_mode) for a transformers preprocessor_config.json, only those that differ from open_clip's
    defaults. UnsupportedArchitecture (one line) for a processing open_clip's eval transform cannot do."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if processor is None:  # no preprocessor_config.json: transformers' CLIPImageProcessor defaults, i.e. open_clip's
        return {}
    where = f"'{source}/preprocessor_config.json'"

    def refuse(what: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(f"{where}: {what}; open_clip's eval transform cannot do that")

    for key in ("do_resize", "do_rescale", "do_normalize"):
        if processor.get(key, True) is not True:
            raise refuse(f"{key} is off")
    if not math.isclose(float(processor.get("rescale_factor", 1 / 255)), 1 / 255, rel_tol=1e-6):
        raise refuse(f"rescale_factor {processor['rescale_factor']}")
    resample = {v: k for k, v in PIL_RESAMPLE.items()}.get(processor.get("resample", 3))
    if resample is None:
        raise refuse(f"resample {processor.get('resample')} (open_clip: bilinear 2 or bicubic 3)")
    size, crop = processor.get("size", {"shortest_edge": 224}), processor.get("crop_size", {})
    size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
    do_crop = processor.get("do_center_crop", True)
    if "shortest_edge" in size and do_crop and size["shortest_edge"] == image_size and \
            crop.get("height", image_size) == crop.get("width", image_size) == image_size:
        resize_mode = "shortest"
    elif size.get("height") == size.get("width") == image_size and not do_crop:
        resize_mode = "squash"
    else:
        raise refuse(f"resize {size}, crop {crop if do_crop else 'off'} for a {image_size}-pixel model")
    kwargs = {}
    mean = tuple(float(v) for v in processor.get("image_mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in processor.get("image_std", OPENAI_DATASET_STD))
    if mean != tuple(OPENAI_DATASET_MEAN):
        kwargs["image_mean"] = list(mean)
    if std != tuple(OPENAI_DATASET_STD):
        kwargs["image_std"] = list(std)
    if resample != "bicubic":
        kwargs["image_interpolation"] = resample
    if resize_mode != "shortest":
        kwargs["image_resize_mode"] = resize_mode
    return kwargs
