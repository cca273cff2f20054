"""Hugging Face transformers interop for the `clip` family: `CLIPModel` folders in, `CLIPModel` folders out.

- import: `model.name` may be a transformers CLIPModel folder (config.json with model_type "clip") or, online, a
  hub id; `clipforge.models.clip_family` converts it to the open_clip model the engine trains (folder.py), and
  embeds the converted architecture in model.json, so checkpoints reload without the folder.
- export: `export_transformers` writes a CLIPModel + CLIPProcessor folder, `export_open_clip` a plain open_clip
  folder (export.py); `clipforge export` is the command.
- one table of weight names (weights.py) and one pair of config translations (architecture.py) serve both ways.

Nothing here imports transformers until it is used.
"""

from clipforge.models.hf.architecture import UnsupportedArchitecture
from clipforge.models.hf.export import FORMATS, ExportResult, export_open_clip, export_transformers
from clipforge.models.hf.folder import (
    TransformersCLIP,
    is_transformers_source,
    load_transformers_weights,
    open_transformers_clip,
)

__all__ = [
    "FORMATS", "ExportResult", "TransformersCLIP", "UnsupportedArchitecture", "export_open_clip",
    "export_transformers", "is_transformers_source", "load_transformers_weights", "open_transformers_clip",
]
