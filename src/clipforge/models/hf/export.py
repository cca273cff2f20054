"""Exporting a CLIP checkpoint: a transformers `CLIPModel` folder, or a plain open_clip folder.

    export_transformers("runs/clip_synth_tiny", "exports/tiny-hf")      # CLIPModel + CLIPProcessor files
    export_open_clip("runs/clip_synth_tiny", "exports/tiny-open_clip")  # open_clip's local-dir:/hf-hub layout

The source is read with `load_model(None, checkpoint=PATH)` (a run folder, a checkpoint folder, or a weight file
with `model_name` naming its architecture), or, with no checkpoint, built from `model_name` (e.g. a transformers
folder, converted to open_clip's format). The output folder is written beside its final place and renamed into it,
so an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.checkpoint import plain_state_dict, save_model_weights
from clipforge.models.hf.architecture import (
    UnsupportedArchitecture,
    image_processor_config,
    transformers_config,
)
from clipforge.models.hf.quiet import transformers_quiet
from clipforge.models.hf.tokenizer import clip_tokenizer
from clipforge.models.hf.weights import to_transformers, weight_names

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
FORMATS = ("transformers", "open_clip")


@dataclass
class ExportResult:
    out_dir: Path
    format: str  # transformers | open_clip
    name: str  # the architecture exported
    parameters: int
    files: list[str]


@dataclass
class _Source:
    model: torch.nn.Module  # open_clip model, eval mode
    tokenizer: object
    architecture: dict  # its open_clip model config
    name: str
    weights: Path | None


def _load_source(checkpoint: str | Path | None, model_name: str | None, trust_pickle: bool) -> _Source:
    import open_clip

    from clipforge.models.clip_family import resolve_model_name
    from clipforge.models.factory import find_model_weights, load_model, read_model_json
    from clipforge.models.hf.folder import is_transformers_source

    if checkpoint is None and (model_name is None or not is_transformers_source(model_name)):
        raise ConfigError("export needs the weights: a run folder, a checkpoint folder or a weight file (or --model "
                          "with a transformers CLIP folder)")
    weights = find_model_weights(checkpoint) if checkpoint is not None else None
    saved = read_model_json(weights.parent) if weights is not None else None
    if saved is not None and saved["family"] != "clip":
        raise ConfigError(f"'{checkpoint}' holds a '{saved['family']}' model; only CLIP models (model.family clip) "
                          f"export to transformers or open_clip")
    if saved is None and model_name is None:
        raise ConfigError(f"'{weights}' has no model.json beside it; name its architecture with --model NAME")
    model, _, tokenizer = load_model(model_name, checkpoint=weights, trust_pickle=trust_pickle)  # names checked
    if saved is not None:
        name, architecture = saved["name"], saved.get("architecture")
    else:
        name = resolve_model_name(model_name)
        architecture = open_clip.get_model_config(name)
    if not architecture:
        raise ConfigError(f"the architecture of '{checkpoint or model_name}' is not known locally (an hf-hub: model); "
                          f"export it from a clipforge checkpoint or a named open_clip architecture")
    return _Source(model, tokenizer, architecture, name, weights)


def _start(out_dir: str | Path, overwrite: bool, source: _Source) -> tuple[Path, Path]:
    """(final folder, partial folder to write into); ConfigError when the folder holds something already."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export folder '{out_dir}' is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"export folder '{out_dir}' is not empty; pick another or pass --overwrite")
    if source.weights is not None and source.weights.resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError(f"export folder '{out_dir}' holds the checkpoint being exported; pick another")
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return out_dir, partial


@contextlib.contextmanager
def _removed_on_error(partial: Path):
    try:
        yield
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _finish(out_dir: Path, partial: Path, fmt: str, source: _Source) -> ExportResult:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    parameters = sum(p.numel() for p in source.model.parameters())
    return ExportResult(out_dir, fmt, source.name, parameters, sorted(p.name for p in out_dir.iterdir()))


def _check_transformers_model(model: torch.nn.Module) -> None:
    import open_clip

    if type(model) is not open_clip.CLIP:
        raise UnsupportedArchitecture(f"transformers' CLIPModel cannot hold an open_clip {type(model).__name__} "
                                      f"model (it holds a ViT CLIP); not exported")
    if getattr(model, "logit_bias", None) is not None:
        raise UnsupportedArchitecture("transformers' CLIPModel cannot hold logit_bias (a SigLIP-trained model: its "
                                      "sigmoid loss bias has no place there); not exported")


def export_transformers(
    checkpoint: str | Path | None, out_dir: str | Path, model_name: str | None = None, trust_pickle: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write a transformers CLIPModel folder: config.json + model.safetensors (save_pretrained), a CLIPTokenizer
    over open_clip's bundled BPE (vocab.json, merges.txt, tokenizer.json) and a CLIPImageProcessor equal to the
    model's eval transform. UnsupportedArchitecture (one line) for a part transformers cannot hold."""
    import open_clip

    source = _load_source(checkpoint, model_name, trust_pickle)
    model = source.model
    _check_transformers_model(model)
    config_kwargs = transformers_config(source.architecture)
    processor_kwargs = image_processor_config(open_clip.get_model_preprocess_cfg(model))
    names = weight_names(config_kwargs["vision_config"]["num_hidden_layers"],
                         config_kwargs["text_config"]["num_hidden_layers"])
    state = to_transformers(plain_state_dict(model), names)
    with transformers_quiet():
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        config = CLIPConfig(**config_kwargs, logit_scale_init_value=float(model.logit_scale.detach()))
        with torch.device("meta"):  # no random initialisation: every weight is assigned below
            exported = CLIPModel(config)
        try:
            exported.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:  # a shape our conversion got wrong: a bug, but say it in one line
            raise CheckpointError(f"converted weights do not fit transformers' CLIPModel: "
                                  f"{str(err).splitlines()[1].strip()[:200]}") from None
        out_dir, partial = _start(out_dir, overwrite, source)
        with _removed_on_error(partial):
            exported.save_pretrained(partial)
            tokenizer = clip_tokenizer(partial, config_kwargs["text_config"]["max_position_embeddings"])
            image_processor = CLIPImageProcessor(**processor_kwargs)
            CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(partial)
            image_processor.save_pretrained(partial)  # preprocessor_config.json too, for readers older than v5
    return _finish(out_dir, partial, "transformers", source)


def export_open_clip(
    checkpoint: str | Path | None, out_dir: str | Path, model_name: str | None = None, trust_pickle: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write a plain open_clip folder: open_clip_model.safetensors + open_clip_config.json ({"model_cfg",
    "preprocess_cfg"}), which `open_clip.create_model_and_transforms("local-dir:OUT")` (or an hf-hub: upload of
    the folder) reads with nothing of clipforge installed."""
    import json

    import open_clip

    source = _load_source(checkpoint, model_name, trust_pickle)
    model = source.model
    model_cfg = dict(source.architecture)
    if getattr(model, "logit_bias", None) is not None:  # a SigLIP-trained model: open_clip builds the bias param
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    if model.logit_scale.dim() > 0:
        model_cfg["nonscalar_logit_scale"] = True
    preprocess = open_clip.get_model_preprocess_cfg(model)
    preprocess_cfg = {key: preprocess[key] for key in ("mean", "std", "interpolation", "resize_mode")
                      if key in preprocess}
    out_dir, partial = _start(out_dir, overwrite, source)
    with _removed_on_error(partial):
        save_model_weights(model, partial / OPEN_CLIP_WEIGHTS)
        body = {"model_cfg": model_cfg, "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in preprocess_cfg.items()}}
        (partial / OPEN_CLIP_CONFIG).write_text(json.dumps(body, indent=2), encoding="utf-8")
        if model_cfg["text_cfg"].get("hf_tokenizer_name") and hasattr(source.tokenizer, "save_pretrained"):
            source.tokenizer.save_pretrained(str(partial))  # local-dir: reads a non-BPE tokenizer from the folder
    return _finish(out_dir, partial, "open_clip", source)
