"""Models by family: `create_model` builds what a config names, `load_model` rebuilds what a checkpoint holds.

    bundle = create_model(ModelConfig(family="clip", name="clipforge-vit-tiny"))   # a ModelBundle
    model, preprocess, tokenizer = load_model(None, checkpoint="runs/my_run")      # eval mode, latest weights

The family (`model.family`, default `clip`) is looked up in `clipforge.registry.FAMILIES`; nothing here
knows what kind of model it builds. A checkpoint folder carries `model.json` (the bundle's resolved
config), so a run folder or checkpoint loads back from it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from clipforge.config import ModelConfig, read_yaml
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.checkpoint import (
    PointerUnreadable,
    check_compatible,
    check_finite_weights,
    read_checkpoint_pointer,
    read_weight_shapes,
    write_json_atomic,
)
from clipforge.models.family import MODEL_CONFIG_FILE, ModelBundle, is_frozen_key
from clipforge.registry import FAMILIES


def create_model(
    model_config: ModelConfig,
    device: str | torch.device = "cpu",
    model_kwargs: dict | None = None,
    saved: dict | None = None,
) -> ModelBundle:
    """Build the model `model_config` names, through its family's builder (in train mode, fp32).

    `model_kwargs` reach the family's constructor (e.g. SigLIP's init_logit_bias for open_clip); `saved` is a
    checkpoint's model.json, from which the family rebuilds exactly what was saved.
    """
    builder = FAMILIES.load(model_config.family)
    return builder(model_config, device=device, model_kwargs=model_kwargs, saved=saved)


def resolve_model_name(model_config: ModelConfig | str) -> None:
    """Check a model name before any work (ConfigError, one line): unknown families and architectures."""
    if isinstance(model_config, str):
        model_config = ModelConfig(name=model_config)
    resolver = getattr(FAMILIES.load(model_config.family), "resolve_name", None)
    if resolver is not None:
        resolver(model_config.name)


def write_model_json(bundle: ModelBundle, folder: Path) -> None:
    """The bundle's resolved config as folder/model.json (temporary file, then rename)."""
    body = {"format_version": 1, **bundle.config, "frozen": list(bundle.frozen)}
    write_json_atomic(folder / MODEL_CONFIG_FILE, body, indent=1, sort_keys=True)


def read_model_json(folder: Path) -> dict | None:
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"'{path}' is not readable JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("family"), str) or not isinstance(body.get("name"), str):
        raise CheckpointError(f"'{path}' needs the string keys \"family\" and \"name\"")
    return body


def load_trained_weights(bundle: ModelBundle, weights: Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's model.safetensors into `bundle.model`: shapes checked first, frozen parts (which
    checkpoints do not copy) kept as the family built them, non-finite values refused."""
    shapes = read_weight_shapes(weights)
    model = bundle.model
    expected = {k: v for k, v in model.state_dict().items() if not is_frozen_key(k, bundle.frozen)}
    check_compatible(_ShapeView(expected), {k: v for k, v in shapes.items() if not is_frozen_key(k, bundle.frozen)},
                     str(weights.parent if weights.name == "model.safetensors" else weights),
                     bundle.config.get("name", "?"))
    state = load_file(str(weights), device=str(device))
    check_finite_weights(state, str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_frozen_key(k, bundle.frozen)]
    if missing or unexpected:  # check_compatible lets optional keys through; anything else is a bug
        raise CheckpointError(f"'{weights}' does not match the model: missing {missing[:1]}, unexpected "
                              f"{unexpected[:1]}")


class _ShapeView:
    """What check_compatible needs of a model: a state_dict() (here, with the frozen parts left out)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def find_model_weights(checkpoint: str | Path) -> Path:
    """The weight file behind `checkpoint`: a file, a checkpoint folder, or a run folder (its latest step)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    pointer_dir = path / "checkpoints"
    for pointer in ("latest.json", "best.json"):
        try:
            step_dir = read_checkpoint_pointer(pointer_dir, pointer)  # never a folder outside the run
        except PointerUnreadable as err:
            raise CheckpointError(f"{err}: not a valid checkpoint pointer") from None
        if step_dir is not None and (step_dir / "model.safetensors").is_file():
            return step_dir / "model.safetensors"
    raise CheckpointError(f"no model weights found at '{path}' (expected a file, a checkpoint folder or a run "
                          f"folder with checkpoints/latest.json)")


def _model_of_run(run_dir: Path) -> tuple[str, str] | None:
    """(family, name) from a run folder's config.yaml."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    raw = read_yaml(config_file)  # safe loader, one-line ConfigError for tags, bad YAML, deep nesting
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name", "clipforge-vit-tiny"), str):
        return None
    return str(model.get("family", "clip")), str(model.get("name", ModelConfig.name))


def load_model(
    name_or_config: str | None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> tuple[nn.Module, object, object]:
    """A model for evaluation: (model in eval mode, preprocess_val, tokenizer or None).

    `checkpoint` is None (random init, or the tag in `name_or_config`'s pretrained), a weight file, a checkpoint
    folder, or a run folder (its latest checkpoint). A checkpoint folder's model.json says what to build; a
    bare weight file (e.g. open_clip's own) needs `name_or_config`, an open_clip architecture.
    """
    weights = find_model_weights(checkpoint) if checkpoint is not None else None
    saved = read_model_json(weights.parent) if weights is not None else None
    if saved is not None:
        if name_or_config is not None and name_or_config not in (saved["name"], saved.get("source")) and \
                not _names_same_file(name_or_config, saved["name"]):
            raise ConfigError(f"checkpoint '{weights.parent}' holds a '{saved['name']}' model, not "
                              f"'{name_or_config}'")
        bundle = create_model(ModelConfig(family=saved["family"], name=saved["name"]), device=device, saved=saved)
        load_trained_weights(bundle, weights, device)
        return bundle.model.eval(), bundle.preprocess_val, bundle.tokenizer
    family = "clip"
    if name_or_config is None:
        run_dir = Path(checkpoint) if checkpoint is not None else None
        found = _model_of_run(run_dir) if run_dir is not None and run_dir.is_dir() else None
        if found is None:
            raise ConfigError("load_model needs a model name or config when the checkpoint is not a run folder")
        family, name_or_config = found
    model_kwargs = {}
    if weights is not None and "logit_bias" in read_weight_shapes(weights, trust_pickle):
        # a bare open_clip weight file with no model.json: a SigLIP-trained model needs the bias parameter
        model_kwargs["init_logit_bias"] = 0.0
    config = ModelConfig(family=family, name=str(name_or_config), pretrained=str(weights) if weights else None,
                         trust_pickle=trust_pickle)
    bundle = create_model(config, device=device, model_kwargs=model_kwargs)
    check_finite_weights(bundle.model.state_dict(), str(weights or name_or_config))
    return bundle.model.eval(), bundle.preprocess_val, bundle.tokenizer


def _names_same_file(given: str, saved: str) -> bool:
    """A model-config file path and the architecture name it registered (its stem) name the same model."""
    return Path(given).suffix in (".json", ".yaml", ".yml") and Path(given).stem == saved
