"""Training objectives: each turns a batch into named losses and metrics (see base.Objective)."""

from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.registry import build_objective, objective_model_kwargs, register_objective

__all__ = ["Objective", "ObjectiveOutput", "build_objective", "objective_model_kwargs", "register_objective"]
