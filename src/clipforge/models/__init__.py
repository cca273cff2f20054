"""Models: open_clip towers and tokenizers, created from a ModelConfig; safe weight files."""

from clipforge.models.factory import create_model, find_model_weights, load_model, resolve_model_name

__all__ = ["create_model", "find_model_weights", "load_model", "resolve_model_name"]
