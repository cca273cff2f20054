"""`export_diffusers`: a trained `diffusion`-family run written as a Stable-Diffusion-layout diffusers folder.

    OUT/model_index.json        StableDiffusionPipeline, safety checker and feature extractor null
    OUT/unet/                   UNet2DConditionModel.save_pretrained (safetensors)
    OUT/vae/                    AutoencoderKL, with the measured scaling_factor in its config (latent models)
    OUT/text_encoder/           CLIPTextModel (the frozen clipforge CLIP text tower, via the transformers export)
    OUT/tokenizer/              CLIPTokenizer over open_clip's BPE
    OUT/scheduler/              DPMSolverMultistepScheduler over the training betas (GeNIe's solver)

Every component is written by its library's own `save_pretrained`, so `clipforge augment genie --model OUT`,
`StableDiffusionImg2ImgPipeline.from_pretrained(OUT)` and `StableDiffusionPipeline.from_pretrained(OUT)` load it
(a pixel-space model has no VAE, which clipforge's loader accepts and diffusers' pipelines do not). The folder is
written to a staging folder and renamed into place: a failed export leaves nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from clipforge.errors import CheckpointError, ConfigError

PIPELINE_CLASS = "StableDiffusionPipeline"


def model_index(has_vae: bool, scheduler_class: str) -> dict:
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if has_vae else [None, None],
    }


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the diffusion model of `checkpoint` (a run folder: its latest checkpoint; or a checkpoint folder)."""
    from clipforge.augment.diffusion import build_scheduler
    from clipforge.models.factory import find_model_weights, load_model, read_model_json
    from clipforge.models.hf.quiet import transformers_quiet

    weights = find_model_weights(checkpoint)
    saved = read_model_json(weights.parent)
    if saved is None or saved.get("family") != "diffusion":
        found = "no model.json" if saved is None else f"a '{saved.get('family')}' model"
        raise ConfigError(f"'{checkpoint}' holds {found}; --format diffusers exports a diffusion-family run")
    model, _, _ = load_model(None, checkpoint=weights.parent)
    scale = float(model.scaling_factor)
    if not math.isfinite(scale):
        raise CheckpointError(f"'{weights.parent}' has no measured latent scaling factor (it never trained a step)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"'{out}' is not empty; pass --overwrite to replace it")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        scheduler = build_scheduler(dict(model.noise_scheduler.config), "dpm")
        model.unet.save_pretrained(partial / "unet", safe_serialization=True)
        if model.vae is not None:
            model.vae.register_to_config(scaling_factor=scale)
            model.vae.save_pretrained(partial / "vae", safe_serialization=True)
        with transformers_quiet():
            model.text_encoder.save_pretrained(partial / "text_encoder", safe_serialization=True)
            model.tokenizer.save_pretrained(partial / "tokenizer")
        scheduler.save_pretrained(partial / "scheduler")
        index = model_index(model.vae is not None, type(scheduler).__name__)
        (partial / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (partial / "clipforge.json").write_text(json.dumps(
            {"source": str(weights.parent.resolve()), "model": saved, "scaling_factor": scale}, indent=1) + "\n",
            encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
