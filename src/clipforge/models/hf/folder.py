"""Reading a transformers `CLIPModel` folder (or hub id) as the open_clip model clipforge trains.

    clip = open_transformers_clip("path/to/clip-folder")    # checks everything cheap: config, tokenizer, shapes
    clip.architecture, clip.model_kwargs                     # what open_clip builds (and model.json embeds)
    load_transformers_weights(open_clip_model, clip)         # the weights, converted by the one table

Every check here answers in one line before any weight is read: a folder that is not a CLIP model, a config.json
that disagrees with the weights' shapes, an unreadable (e.g. truncated) weight file, an architecture or a
preprocessing that open_clip's CLIP cannot hold, a tokenizer that is not CLIP's BPE.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.checkpoint import check_finite_weights, read_weight_shapes, refuse_untrusted
from clipforge.models.hf.architecture import open_clip_architecture, preprocess_kwargs
from clipforge.models.hf.quiet import transformers_quiet
from clipforge.models.hf.tokenizer import check_bpe_tokenizer
from clipforge.models.hf.weights import IGNORED_TRANSFORMERS_KEYS, to_open_clip, weight_names

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells repositories
SAFE_WEIGHTS, SAFE_INDEX, PICKLED_WEIGHTS = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
# what a hub id's snapshot fetches: never open_clip's own weight files, which laion's repositories also hold
HUB_FILES = ["config.json", "preprocessor_config.json", "processor_config.json", "vocab.json", "merges.txt",
             "tokenizer.json", "tokenizer_config.json", SAFE_WEIGHTS, SAFE_INDEX, "model-*-of-*.safetensors"]


def is_transformers_source(name: str) -> bool:
    """A folder (checked further by open_transformers_clip), or an `org/name` hub id that is not a local path."""
    path = Path(name)
    if path.is_dir():
        return True
    return bool(HUB_ID.match(name)) and not path.exists() and path.suffix not in (".json", ".yaml", ".yml")


@dataclass
class TransformersCLIP:
    source: str  # model.name as given: a folder or a hub id
    folder: Path  # the local folder (a hub id's cached snapshot)
    name: str  # the open_clip architecture name it is registered under
    architecture: dict  # the open_clip model config
    model_kwargs: dict  # open_clip create_model_and_transforms arguments for its preprocessing
    weight_files: tuple[Path, ...] = field(default_factory=tuple)


def open_transformers_clip(source: str, trust_pickle: bool = False, check_weights: bool = True) -> TransformersCLIP:
    """Check and read the transformers CLIP model `source` names (no weights loaded); ConfigError or
    CheckpointError, one line, for anything it cannot be used for. `check_weights=False` skips the weight files
    (a name check before any work, which has no `trust_pickle` to read a pickled file's shapes with)."""
    folder = Path(source) if Path(source).is_dir() else _download(source, trust_pickle)
    config = _read_json(folder / "config.json", what="config.json")
    if config is None:
        hint = f"; for open_clip's own layout use model.name=local-dir:{source}" \
            if (folder / "open_clip_config.json").is_file() else ""
        raise ConfigError(f"model.name '{source}' is a folder but not a transformers model folder (it has no "
                          f"config.json){hint}")
    if config.get("model_type") != "clip":
        raise ConfigError(f"'{source}' holds a {config.get('model_type')!r} model (config.json model_type), not a "
                          f"transformers CLIP model ('clip')")
    architecture = open_clip_architecture(config, str(folder))
    check_bpe_tokenizer(folder)
    processor = _read_json(folder / "preprocessor_config.json", what="preprocessor_config.json")
    if processor is None:  # transformers 5 keeps it inside the processor's file
        processor = (_read_json(folder / "processor_config.json", what="processor_config.json") or {}).get(
            "image_processor")
        processor = processor if isinstance(processor, dict) else None
    model_kwargs = preprocess_kwargs(processor, architecture["vision_cfg"]["image_size"], str(folder))
    weight_files = ()
    if check_weights:
        weight_files = _weight_files(folder, trust_pickle)
        _check_shapes(config, weight_files, folder, trust_pickle)
    name = "transformers-" + re.sub(r"[^\w.-]", "_", Path(source.rstrip("/\\")).name or "model")
    return TransformersCLIP(source, folder, name, architecture, model_kwargs, weight_files)


def load_transformers_weights(model: torch.nn.Module, clip: TransformersCLIP) -> None:
    """Load `clip`'s weights, converted to open_clip names and layouts, into the open_clip `model` built from
    `clip.architecture`. A SigLIP objective's logit_bias, which a CLIP checkpoint lacks, keeps its initial value."""
    state: dict[str, torch.Tensor] = {}
    for path in clip.weight_files:
        state.update(_load_state(path))
    converted = to_open_clip(state, _names(clip.architecture), str(clip.folder))
    check_finite_weights(converted, str(clip.folder))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected or set(missing) - {"logit_bias"}:
        raise CheckpointError(f"the weights of '{clip.folder}' do not fit the converted model: missing "
                              f"{sorted(set(missing) - {'logit_bias'})[:1]}, unexpected {unexpected[:1]}")


def _names(architecture: dict):
    return weight_names(architecture["vision_cfg"]["layers"], architecture["text_cfg"]["layers"])


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"'{path}' is not readable JSON") from None
    if not isinstance(body, dict):
        raise ConfigError(f"'{path}' does not hold a JSON object ({what})")
    return body


def _weight_files(folder: Path, trust_pickle: bool) -> tuple[Path, ...]:
    """The weight files of a transformers folder: model.safetensors, the shards its index names, or (trusted)
    pytorch_model.bin."""
    if (folder / SAFE_WEIGHTS).is_file():
        return (folder / SAFE_WEIGHTS,)
    index = _read_json(folder / SAFE_INDEX, what="a weight index")
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"'{folder / SAFE_INDEX}' has no \"weight_map\"")
        shards = tuple(folder / name for name in sorted(set(weight_map.values())))
        absent = [p for p in shards if not p.is_file()]
        if absent:
            raise CheckpointError(f"'{folder / SAFE_INDEX}' names the missing shard '{absent[0].name}'")
        return shards
    if (folder / PICKLED_WEIGHTS).is_file():
        refuse_untrusted(folder / PICKLED_WEIGHTS, trust_pickle)
        return (folder / PICKLED_WEIGHTS,)
    raise CheckpointError(f"'{folder}' has a CLIP config.json but no weights ({SAFE_WEIGHTS}, {SAFE_INDEX} or "
                          f"{PICKLED_WEIGHTS})")


def _check_shapes(config: dict, weight_files: tuple[Path, ...], folder: Path, trust_pickle: bool) -> None:
    """CheckpointError (one line) when the weights' shapes (read from the file headers) are not what config.json
    describes. Reading a header also finds a truncated or corrupt safetensors file."""
    from transformers import CLIPConfig, CLIPModel

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files:
        shapes.update(read_weight_shapes(path, trust_pickle))
    try:
        with transformers_quiet(), torch.device("meta"):
            reference = CLIPModel(CLIPConfig.from_dict(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"'{folder}/config.json' does not describe a CLIPModel ({str(err).splitlines()[0][:160]})") \
            from None
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for key in IGNORED_TRANSFORMERS_KEYS:
        shapes.pop(key, None)
        expected.pop(key, None)
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    mismatched = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(f"config.json of '{folder}' disagrees with its weights: '{key}' is "
                              f"{list(shapes[key])} in the weights, {list(expected[key])} by config.json "
                              f"({len(mismatched)} such)")
    if missing or unexpected:
        what = f"{len(missing)} missing (e.g. {missing[0]})" if missing else \
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"
        raise CheckpointError(f"the weights of '{folder}' are not those of the CLIPModel its config.json "
                              f"describes: {what}")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"'{path}' is not a readable safetensors file ({err})") from None
    try:  # a pickle the user trusts (refuse_untrusted ran): still torch's restricted unpickler
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"'{path}' could not be read as a checkpoint ({type(err).__name__})") from None
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


@lru_cache(maxsize=16)
def _download(repo_id: str, trust_pickle: bool) -> Path:
    """A hub id's files in the local cache (downloaded when online): config, preprocessing, tokenizer, weights."""
    if not HUB_ID.match(repo_id):
        raise ConfigError(f"model.name '{repo_id}' is neither an existing folder nor a Hugging Face hub id")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        with transformers_quiet():
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
            if trust_pickle and not (folder / SAFE_WEIGHTS).is_file() and not (folder / SAFE_INDEX).is_file():
                folder = Path(snapshot_download(repo_id, allow_patterns=[PICKLED_WEIGHTS]))
    except Exception as err:  # noqa: BLE001 - network, authentication or a missing repository: the user's setup
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(err).__name__
        raise ConfigError(f"model.name '{repo_id}' is not a local folder, and as a Hugging Face hub id it could not "
                          f"be fetched ({reason})") from None
    return folder
