"""Load a Stable-Diffusion-layout diffusers folder: the one loader GeNIe's sampler uses.

The layout is what `StableDiffusionPipeline.save_pretrained` writes: `model_index.json` naming the components,
and one subfolder per component (`unet/`, `scheduler/`, `text_encoder/`, `tokenizer/`, optionally `vae/`). A folder
without a VAE (no `vae` entry, or `[null, null]`) is a pixel-space model: the UNet denoises images directly. The
components are loaded one by one (no pipeline object, so no pipeline progress bar) and only from safetensors: no
pickled code runs. A hub id (`owner/name`) is fetched with `huggingface_hub.snapshot_download` when online.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.errors import CheckpointError, ConfigError, DataError

REQUIRED_COMPONENTS = {
    "unet": ("UNet2DConditionModel",),
    "scheduler": None,  # any scheduler class: its config seeds the solver chosen by name (SCHEDULERS)
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
OPTIONAL_COMPONENTS = {"vae": ("AutoencoderKL",)}

# solver name -> diffusers class; all deterministic (no per-step noise), so a per-sample seed fixes the output.
# "dpm" is DPM-Solver++ of order 2 (diffusers' defaults), what the GeNIe paper's sampler uses.
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# the weight files looked at when fetching from a hub (one copy of each weight, safetensors only)
_HUB_IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.h5", "*.fp16.*", "*non_ema*"]


@dataclass
class DiffusionComponents:
    """The parts of a latent (or pixel-space) text-to-image diffusion model, in eval mode, on one device."""

    unet: torch.nn.Module
    scheduler: object  # a diffusers scheduler (the template: the sampler copies it per noise level)
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module | None  # None: pixel space
    folder: Path
    fingerprint: str  # sha256 over the folder's files (names and bytes)
    scheduler_name: str

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downsample(self) -> int:
        """Image side / latent side: 2 ** (VAE levels - 1), or 1 in pixel space."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.downsample

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def resolve_model_folder(spec: str | Path) -> Path:
    """A local diffusers folder as it is, or a hub id's snapshot when online; DataError otherwise."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"model '{spec}' is not a folder (expected a diffusers folder with model_index.json)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not _looks_like_hub_id(str(spec)) or offline:
        raise DataError(f"model folder '{spec}' does not exist" + (" (HF_HUB_OFFLINE is set)" if offline else ""))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec), ignore_patterns=_HUB_IGNORE))
    except Exception as err:  # network, auth, missing repository: one line
        raise DataError(f"cannot fetch model '{spec}' from the hub: {type(err).__name__}") from None


def read_model_index(folder: Path) -> dict[str, str | None]:
    """{component: class name or None} after checking that `folder` is a Stable-Diffusion-layout pipeline."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"'{index_file}' is not valid JSON") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"'{index_file}' is not a JSON object")

    def class_of(name: str) -> str | None:
        entry = index.get(name)
        if entry is None or (isinstance(entry, list) and len(entry) == 2 and entry[1] is None):
            return None
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
            raise CheckpointError(f"'{index_file}': entry '{name}' is not [library, class]")
        return entry[1]

    classes: dict[str, str | None] = {}
    for name, allowed in {**REQUIRED_COMPONENTS, **OPTIONAL_COMPONENTS}.items():
        found = class_of(name)
        if found is None:
            if name in REQUIRED_COMPONENTS:
                raise CheckpointError(f"'{folder}' is not a Stable-Diffusion-layout pipeline: no '{name}' component")
        elif allowed is not None and found not in allowed:
            raise CheckpointError(f"'{folder}': component '{name}' is a {found}; GeNIe needs {' or '.join(allowed)}")
        elif not (folder / name).is_dir():
            raise CheckpointError(f"'{folder}': model_index.json names '{name}' but there is no '{name}/' folder")
        classes[name] = found
    return classes


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every regular, non-hidden file under `folder` (relative name, then bytes), in name order.

    Reads every byte once (a few seconds for Stable Diffusion's ~4 GB); what the output folder's settings record.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        digest.update(str(path.relative_to(folder).as_posix()).encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def build_scheduler(config: dict, name: str):
    """The solver `name` (SCHEDULERS) built from a folder's scheduler config (its betas and prediction type)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULERS)})")
    if name == "ddim" and "clip_sample" not in config:
        # DDIM's default clips x0 to [-1, 1], right for pixels only; Stable Diffusion's PNDM config has no such key
        config = {**config, "clip_sample": False}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def _load(what: str, folder: Path, load):
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load the {what} of '{folder}': {first[:200]}") from None


def load_diffusion(spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   scheduler: str = "dpm", fingerprint: str | None = None) -> DiffusionComponents:
    """Every component of the diffusers folder (or hub id) `spec`, frozen, in eval mode, on `device`."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{scheduler}' (choose from {', '.join(SCHEDULERS)})")
    folder = resolve_model_folder(spec)
    classes = read_model_index(folder)
    config = _load("scheduler", folder, lambda: diffusers.DDPMScheduler.load_config(folder, subfolder="scheduler"))
    solver = build_scheduler(config, scheduler)
    options = {"use_safetensors": True, "low_cpu_mem_usage": False, "torch_dtype": dtype}
    unet = _load("unet", folder, lambda: diffusers.UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", **options))
    vae = None
    if classes.get("vae") is not None:
        vae = _load("vae", folder, lambda: diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", **options))
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # transformers' "Loading weights" bar: the library does not print
    try:
        text_encoder = _load("text encoder", folder, lambda: CLIPTextModel.from_pretrained(
            folder / "text_encoder", use_safetensors=True, dtype=dtype))
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    tokenizer = _load("tokenizer", folder, lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    expected = 3 if vae is None else int(vae.config.latent_channels)
    if int(unet.config.in_channels) != expected or int(unet.config.out_channels) != expected:
        space = "pixel space (no VAE)" if vae is None else f"the VAE's {expected} latent channels"
        raise CheckpointError(f"'{folder}': the UNet has {unet.config.in_channels} input channels, not {expected} "
                              f"for {space}")
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return DiffusionComponents(unet=unet, scheduler=solver, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                               folder=folder, fingerprint=fingerprint or folder_fingerprint(folder),
                               scheduler_name=scheduler)
