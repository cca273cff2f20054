"""Objectives by name (`config.objective.name`).

Each entry points at an Objective subclass ("module:Class") that provides `from_config(config, model)` and,
optionally, `model_kwargs(config)` for the open_clip model constructor (SigLIP's bias). Entries are imported
lazily, so an objective's dependencies load only when it is used. A new method adds one line here.
"""

from __future__ import annotations

import importlib

from torch import nn

from clipforge.errors import ConfigError
from clipforge.objectives.base import Objective

OBJECTIVES: dict[str, str] = {
    "clip": "clipforge.objectives.clip:ClipObjective",
    "siglip": "clipforge.objectives.siglip:SiglipObjective",
    "fineclip": "clipforge.objectives.fineclip:FineclipObjective",
}


def register_objective(name: str, target: str) -> None:
    """Add an objective at run time, e.g. from a plugin: register_objective("mine", "pkg.mod:MyObjective")."""
    OBJECTIVES[name] = target


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name '{name}' is not registered (known: {', '.join(sorted(OBJECTIVES))})")
    module_name, _, attribute = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def objective_model_kwargs(config) -> dict:
    """Extra open_clip model constructor arguments the configured objective needs."""
    hook = getattr(objective_class(config.objective.name), "model_kwargs", None)
    return dict(hook(config)) if hook else {}


def build_objective(config, model: nn.Module) -> Objective:
    cls = objective_class(config.objective.name)
    return cls.from_config(config, model) if hasattr(cls, "from_config") else cls()
