"""Models by family (clip: open_clip towers and tokenizers; toy; ...), created from a ModelConfig; safe weights."""

from clipforge.models.factory import create_model, find_model_weights, load_model, resolve_model_name
from clipforge.models.family import ModelBundle

__all__ = ["ModelBundle", "create_model", "find_model_weights", "load_model", "resolve_model_name"]
