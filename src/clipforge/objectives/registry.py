"""Objectives by name (`config.objective.name`), through the lazy registry in `clipforge.registry`.

Each entry points at an Objective subclass ("module:Class") that provides `from_config(config, model)` and,
optionally, `model_kwargs(config)` for the model constructor (SigLIP's bias). A new method adds one line to
`clipforge.registry.OBJECTIVES`, or calls `register_objective` from a plugin.
"""

from __future__ import annotations

from torch import nn

from clipforge.objectives.base import Objective
from clipforge.registry import OBJECTIVES


def register_objective(name: str, target: str | type) -> None:
    """Add an objective at run time, e.g. from a plugin: register_objective("mine", "pkg.mod:MyObjective")."""
    OBJECTIVES.register(name, target)


def objective_class(name: str) -> type[Objective]:
    return OBJECTIVES.load(name)


def objective_model_kwargs(config) -> dict:
    """Extra model constructor arguments the configured objective needs (e.g. SigLIP's bias)."""
    hook = getattr(objective_class(config.objective.name), "model_kwargs", None)
    return dict(hook(config)) if hook else {}


def build_objective(config, model: nn.Module) -> Objective:
    cls = objective_class(config.objective.name)
    return cls.from_config(config, model) if hasattr(cls, "from_config") else cls()
