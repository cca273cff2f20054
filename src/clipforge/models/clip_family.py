"""The `clip` family: open_clip CLIP/SigLIP models, their transforms and tokenizer.

Our small architectures (src/clipforge/model_configs/*.json) are registered with open_clip when this module
is imported, so `open_clip.create_model("clipforge-vit-tiny")` works anywhere after `import clipforge.models`.
`model.name` is an open_clip architecture name, a path to a JSON or YAML file in open_clip's format, an
`hf-hub:` id (online, open_clip's own hub layout), or a transformers `CLIPModel` folder or hub id (converted to
open_clip's CLIP by clipforge.models.hf). The resolved architecture is embedded in the bundle's config
(model.json), so a checkpoint loads back without the file or folder it was first built from.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import tempfile
from pathlib import Path

import open_clip
import torch
import yaml
from torch import nn

from clipforge.config import ModelConfig
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.checkpoint import check_compatible, read_weight_shapes, refuse_untrusted
from clipforge.models.family import ModelBundle

NO_WEIGHT_DECAY = ("logit_scale", "logit_bias")  # the temperature and the SigLIP bias (CLIP paper, open_clip)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

_yaml_config_dir: Path | None = None  # YAML model configs are registered as JSON copies written here


def _register_config_file(path: Path) -> str:
    """Register a JSON/YAML open_clip model config file; returns the name to create it by (the file stem)."""
    global _yaml_config_dir
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"model config '{path}' could not be read ({type(err).__name__})") from None
    if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"model config '{path}' needs the keys embed_dim, vision_cfg and text_cfg")
    if path.suffix == ".json":
        open_clip.add_model_config(path)
    else:  # open_clip's registry reads JSON only: register a JSON copy
        if _yaml_config_dir is None:
            _yaml_config_dir = Path(tempfile.mkdtemp(prefix="clipforge-model-configs-"))
        copy = _yaml_config_dir / f"{path.stem}.json"
        copy.write_text(json.dumps(config), encoding="utf-8")
        open_clip.add_model_config(copy)
    return path.stem


def resolve_model_name(name_or_path: str) -> str:
    """An open_clip architecture name for `name_or_path` (a registered name, a config file, a hub id, or a
    transformers CLIP folder or hub id, whose converted architecture is registered under the name returned)."""
    if name_or_path.startswith(("hf-hub:", "local-dir:")):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"model config file '{path}' does not exist")
        return _register_config_file(path)
    known = open_clip.list_models()
    if name_or_path not in known and name_or_path.replace("/", "-") in known:  # OpenAI's spelling, not a hub id
        raise ConfigError(f"model.name '{name_or_path}' is not an open_clip architecture; did you mean "
                          f"'{name_or_path.replace('/', '-')}'?")
    imported = _open_transformers(name_or_path, check_weights=False) if name_or_path not in known else None
    if imported is not None:
        return imported.name
    if name_or_path not in known:
        nearest = difflib.get_close_matches(name_or_path, known, n=1)
        hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
        raise ConfigError(f"model.name '{name_or_path}' is not an open_clip architecture or a config file{hint}")
    return name_or_path


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's informational warnings (e.g. 'initialized randomly'): the library does not print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "open_clip" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip():
    quiet = _QuietOpenClip()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _open_transformers(name_or_path: str, trust_pickle: bool = False, check_weights: bool = True):
    """The transformers CLIP model `name_or_path` names (a folder, or an `org/name` hub id), checked and its
    converted architecture registered with open_clip; None when it names none."""
    from clipforge.models.hf.folder import is_transformers_source, open_transformers_clip

    if name_or_path.startswith(("hf-hub:", "local-dir:")) or not is_transformers_source(name_or_path):
        return None
    imported = open_transformers_clip(name_or_path, trust_pickle=trust_pickle, check_weights=check_weights)
    _register_architecture(imported.name, imported.architecture)
    return imported


def _is_pretrained_tag(model_name: str, pretrained: str) -> bool:
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained))


def _fetch_tag(model_name: str, tag: str, trust_pickle: bool) -> None:
    """Download (or find in the cache) the weights of a pretrained tag and apply the pickle policy to them."""
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(open_clip.get_pretrained_cfg(model_name, tag))
    except Exception as err:  # noqa: BLE001 - network or hub failures are the user's environment
        raise CheckpointError(f"pretrained tag '{tag}' of '{model_name}' could not be fetched "
                              f"(offline? {type(err).__name__})") from None
    refuse_untrusted(path, trust_pickle)


def build_clip(
    model_config: ModelConfig,
    device: str | torch.device = "cpu",
    model_kwargs: dict | None = None,
    saved: dict | None = None,
) -> ModelBundle:
    """Build an open_clip model and its transforms and tokenizer.

    `model_config.pretrained` is an open_clip tag (downloaded by open_clip when online) or a local file.
    `model_kwargs` reach the open_clip model constructor (e.g. SigLIP's init_logit_scale / init_logit_bias).
    The model is in fp32 (mixed precision is autocast in the loop) and in train mode. `saved` is a model.json
    written by an earlier build: its embedded architecture is registered first, under its name.
    """
    imported = None  # a transformers CLIP folder, converted
    if saved is not None and saved.get("architecture"):
        _register_architecture(saved["name"], saved["architecture"])
        model_kwargs = {**saved.get("model_kwargs", {}), **(model_kwargs or {})}
        name = saved["name"]
    elif (imported := _open_transformers(model_config.name, model_config.trust_pickle)) is not None:
        model_kwargs = {**imported.model_kwargs, **(model_kwargs or {})}  # its preprocessing
        name = imported.name
    else:
        name = resolve_model_name(model_config.name)
    model_kwargs = dict(model_kwargs or {})
    pretrained = model_config.pretrained
    tag = pretrained if pretrained and _is_pretrained_tag(name, pretrained) else None
    weight_file = Path(pretrained) if pretrained and tag is None else None
    if weight_file is not None and not weight_file.is_file():
        raise CheckpointError(f"model.pretrained '{pretrained}' is neither a pretrained tag of '{name}' "
                              f"nor an existing file")
    if tag is not None:
        _fetch_tag(name, tag, model_config.trust_pickle)
    if weight_file is not None:
        shapes = read_weight_shapes(weight_file, model_config.trust_pickle)  # refuses untrusted pickles

    with _quiet_open_clip():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device, output_dict=True, **model_kwargs
        )
        if weight_file is not None:
            check_compatible(model, shapes, str(weight_file), name)
            _load_weight_file(model, weight_file)
        elif imported is not None:
            from clipforge.models.hf.folder import load_transformers_weights

            load_transformers_weights(model, imported)

    if model_config.lock_image:  # LiT: a frozen image tower, only text (and temperature) learn
        model.lock_image_tower(unlocked_groups=0)
    if model_config.lock_text:
        model.lock_text_tower(unlocked_layers=0)
    if model_config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(name)  # bundled BPE vocabulary; context length from the config
    architecture = None if name.startswith("hf-hub:") else open_clip.get_model_config(name)
    config = {"family": "clip", "name": name, "model_kwargs": model_kwargs, "architecture": architecture}
    source = imported.source if imported is not None else (saved or {}).get("source")
    if source is not None:  # the transformers folder or hub id model.name gave, as the run's config names it
        config["source"] = source
    no_decay = frozenset(n for n, _ in model.named_parameters() if n in NO_WEIGHT_DECAY)
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, config=config, no_weight_decay=no_decay)


def _register_architecture(name: str, architecture: dict) -> None:
    """Make `name` buildable by open_clip from an embedded architecture dict (a model.json's)."""
    if open_clip.get_model_config(name) == architecture:
        return
    global _yaml_config_dir
    if _yaml_config_dir is None:
        _yaml_config_dir = Path(tempfile.mkdtemp(prefix="clipforge-model-configs-"))
    copy = _yaml_config_dir / f"{name}.json"
    copy.write_text(json.dumps(architecture), encoding="utf-8")
    open_clip.add_model_config(copy)


def _load_weight_file(model: nn.Module, path: Path) -> None:
    initial_bias = getattr(model, "logit_bias", None)
    initial_bias = None if initial_bias is None else initial_bias.detach().clone()
    # safetensors are read with safetensors; a trusted pickle with torch's restricted unpickler
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True, device="cpu")
    except ValueError as err:  # e.g. numpy refusing a pickled .npz/.npy (nothing ran): one line, not a traceback
        raise CheckpointError(f"weights file '{path}' could not be loaded: {str(err).splitlines()[0][:200]}") \
            from None
    if initial_bias is not None and "logit_bias" not in read_weight_shapes(path, trust_pickle=True):
        # open_clip fills a missing bias with 0; keep the objective's initial bias (SigLIP: -10) instead
        with torch.no_grad():
            model.logit_bias.copy_(initial_bias)


build_clip.resolve_name = resolve_model_name
