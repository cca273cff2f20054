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

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

MODEL_CONFIG_FILE = "model.json"
MODEL_JSON_VERSION = 1

# family -> the name of its tiny variant (for tests and smoke runs); each family module adds its own
TINY_VARIANTS: dict[str, str] = {"clip": "clipforge-vit-micro", "toy": "toy-classifier-tiny", "vq": "vq-tiny",
                                 "lcl": "lcl-tiny", "code_prior": "code-prior-tiny", "lit": "lit-tiny"}


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
