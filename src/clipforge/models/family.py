"""Model families: one builder per kind of model, and the one bundle every builder returns.

A family turns a `ModelConfig` into a `ModelBundle`. The family is named in the config (`model.family`,
default `clip`) and looked up in `clipforge.registry.FAMILIES`, so the loop, the checkpoints and the
evaluation never ask what kind of model they hold (no name sniffing, as open_clip's CoCa needs).

    bundle = create_model(ModelConfig(family="toy", name="toy-classifier-tiny"))
    bundle.model, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer

`bundle.config` is the resolved config, written as `model.json` beside every checkpoint's weights (as
diffusers' `save_pretrained` writes one config per component): any run folder or checkpoint loads back
from it alone. Every family registers a tiny variant (`TINY_VARIANTS`) that the registry-wide test builds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn

from clipforge.errors import ConfigError

MODEL_CONFIG_FILE = "model.json"
MODEL_JSON_VERSION = 1

# family -> the name of its tiny variant (for tests and smoke runs); each family module adds its own
TINY_VARIANTS: dict[str, str] = {"clip": "clipforge-vit-micro", "toy": "toy-classifier-tiny", "vq": "vq-tiny",
                                 "lcl": "lcl-tiny", "code_prior": "code-prior-tiny", "lit": "lit-tiny",
                                 "autoencoder": "autoencoder-tiny", "diffusion": "diffusion-tiny"}


@dataclass
class ModelBundle:
    model: nn.Module
    preprocess_train: Callable  # PIL image -> [3, H, W] tensor, with training augmentation
    preprocess_val: Callable  # PIL image -> [3, H, W] tensor, deterministic
    tokenizer: Callable | None  # list[str] -> [N, L] int64 token ids; None for image-only models
    config: dict  # JSON-able: {"family", "name", ...}; enough to rebuild this model with no weights at hand
    # state-dict prefixes of frozen pretrained parts: checkpoints reference them (through `config`) instead of
    # copying them, and the family rebuilds them when the checkpoint is loaded
    frozen: tuple[str, ...] = ()
    # parameter names that must not be weight-decayed beyond the usual rule (biases, gains), e.g. a temperature
    no_weight_decay: frozenset[str] = field(default_factory=frozenset)

    def trained_state_dict(self) -> dict:
        """The state dict a checkpoint stores: everything except the frozen pretrained parts."""
        return {k: v for k, v in self.model.state_dict().items() if not is_frozen_key(k, self.frozen)}


def is_frozen_key(key: str, frozen: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in frozen)


def variant_or_file_settings(name: str, variants: dict[str, dict], family: str, check: Callable[[dict], dict],
                             defaults: dict | None = None) -> dict:
    """The checked settings `name` stands for in a family whose variants are small dicts: a registered variant, or
    a JSON/YAML file holding such a dict (over `defaults`, when given). One-line ConfigErrors name the file."""
    if name in variants:
        return check(dict(variants[name]))
    path = Path(name)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"model.name '{name}' is not a {family} variant (known: {', '.join(variants)}) or a "
                          f".json/.yaml file of {family} settings")
    if not path.is_file():
        raise ConfigError(f"model.name '{name}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        body = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{family} model file '{path}' could not be read ({type(err).__name__})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{family} model file '{path}' must hold a mapping of settings")
    return check({**(defaults or {}), **body})


def family_settings(model_config, saved: dict | None, model_kwargs: dict | None, variants: dict[str, dict],
                    family: str, check: Callable[[dict, str], dict]) -> tuple[str, dict]:
    """(name, checked settings) a small-dict family builds from: a checkpoint's model.json (`saved`), or the
    configured variant / settings file with the objective's `model_kwargs` over it. check(settings, where)."""
    if saved is not None:
        name = saved["name"]
        return name, check(dict(saved["settings"]), f"model.json of '{name}'")
    name = model_config.name
    base = variant_or_file_settings(name, variants, family, lambda settings: check(settings, f"model '{name}'"))
    return name, check({**base, **(model_kwargs or {})}, f"model '{name}'")
