"""Typed experiment configs: YAML files + dotted command-line overrides, validated before any work.

An experiment config is a tree of dataclasses. Every leaf has a type, and optionally a range or a set of
choices in its field metadata. `load_config(path, overrides)` reads the YAML (safe loader only, so no
Python objects can be constructed), applies `a.b.c=value` overrides, and checks every key. Any problem
raises `ConfigError` with one line naming the key, the file and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipforge.config_fields import MAX_SEED, between, non_negative, positive, seed_field  # noqa: F401
from clipforge.config_objectives import (  # noqa: F401  re-exported: clipforge.config is where users look
    AutoencoderObjectiveConfig,
    ClipObjectiveConfig,
    CodeArObjectiveConfig,
    DiffusionObjectiveConfig,
    FineclipObjectiveConfig,
    LclObjectiveConfig,
    LgvqObjectiveConfig,
    SiglipObjectiveConfig,
    VqObjectiveConfig,
)
from clipforge.errors import ConfigError


@dataclass
class SynthConfig:
    """SynthScenes generated into `<output_dir>/data` when `data.train` is `synth`."""

    num_train: int = positive(4096)
    num_val: int = positive(1024)
    image_size: int = between(64, 16, 1024)
    seed: int = seed_field(0)
    shard_size: int = positive(1024)
    omit_fraction: float = between(0.3, 0.0, 1.0)  # share of objects left out of global captions
    long_tail: float = non_negative(0.0)  # Zipf exponent for class frequencies; 0 = balanced
    classes: Literal["base", "all"] = "base"  # the training split's main objects: base classes, or every class


@dataclass
class DataConfig:
    train: str = "synth"  # "synth", a shard folder / glob / brace pattern, a .csv, or an ImageFolder root
    val: str | None = None  # same kinds; None = the synth validation split when train is synth
    format: Literal["auto", "wds", "csv", "imagefolder"] = "auto"
    synth: SynthConfig = field(default_factory=SynthConfig)
    batch_size: int = positive(128)
    workers: int = non_negative(0)
    shuffle_buffer: int = non_negative(1000)
    max_regions: int = positive(4)  # regions per image sampled per step (region objectives)
    augment: bool = False  # RandomResizedCrop(scale=(0.9, 1)) as open_clip does
    strict: bool = False  # bad samples raise instead of being skipped and counted
    scan: bool = True  # decode the training data once first, so each epoch delivers every usable sample once
    csv_image_key: str = "filepath"
    csv_caption_key: str = "caption"
    csv_separator: str = ","  # one character (a .tsv file: "\t")


@dataclass
class ModelConfig:
    family: str = "clip"  # the model family (clipforge.registry.FAMILIES): clip (open_clip), toy, ...
    name: str = "clipforge-vit-tiny"  # clip: open_clip name, JSON/YAML config, transformers CLIP folder/hub id
    pretrained: str | None = None  # an open_clip pretrained tag (online), or a local checkpoint file
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False
    trust_pickle: bool = False  # allow loading pickled (.pt/.bin) checkpoints, which can run code


@dataclass
class ObjectiveConfig:
    name: str = "clip"  # a registered objective (clipforge.registry.OBJECTIVES)
    clip: ClipObjectiveConfig = field(default_factory=ClipObjectiveConfig)
    siglip: SiglipObjectiveConfig = field(default_factory=SiglipObjectiveConfig)
    fineclip: FineclipObjectiveConfig = field(default_factory=FineclipObjectiveConfig)
    vq: VqObjectiveConfig = field(default_factory=VqObjectiveConfig)
    lgvq: LgvqObjectiveConfig = field(default_factory=LgvqObjectiveConfig)
    lcl: LclObjectiveConfig = field(default_factory=LclObjectiveConfig)
    code_ar: CodeArObjectiveConfig = field(default_factory=CodeArObjectiveConfig)
    autoencoder: AutoencoderObjectiveConfig = field(default_factory=AutoencoderObjectiveConfig)
    diffusion: DiffusionObjectiveConfig = field(default_factory=DiffusionObjectiveConfig)


@dataclass
class TrainConfig:
    epochs: int = positive(10)
    max_steps: int | None = positive(None)  # stop after this many optimiser steps (overrides epochs)
    lr: float = positive(5e-4)
    weight_decay: float = non_negative(0.2)
    beta1: float = between(0.9, 0.0, 1.0, hi_open=True)  # Adam refuses 1.0
    beta2: float = between(0.98, 0.0, 1.0, hi_open=True)
    eps: float = positive(1e-6)
    warmup_steps: int = non_negative(100)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip_norm: float | None = positive(None)
    accum_steps: int = positive(1)
    log_every: int = positive(10)
    save_every_steps: int | None = positive(None)  # also save mid-epoch every N steps
    keep_last: int = positive(2)
    nan_policy: Literal["stop", "skip"] = "stop"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    tasks: list[str] = field(
        default_factory=lambda: ["zeroshot", "retrieval", "linear_probe", "fewshot", "robustness"]
    )
    templates: str = "synthscenes"  # a bundled set name (synthscenes | openai_imagenet) or a file path
    num_eval: int = positive(1000)  # SynthScenes images per evaluated split
    batch_size: int = positive(256)
    fewshot_ways: int = positive(5)
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_episodes: int = positive(100)
    seed: int = seed_field(0)
    # frozen transfer (clipforge.eval.frozen_transfer): the attentive probe's budget and size
    transfer_epochs: int = positive(50)
    transfer_lr: float = positive(2e-3)
    transfer_heads: int = positive(4)  # lowered to a divisor of the token width when it does not divide it
    transfer_queries: int = positive(1)
    # ... and the captioning head's budget (a 64-wide, 2-layer word LM trained from scratch)
    caption_steps: int = positive(300)
    caption_lr: float = positive(3e-3)
    at_end: bool = False  # `clipforge train` runs these tasks on the run's evaluation data when training ends
    generate_per_class: int = positive(8)  # text_to_image: images generated per class prompt
    genie_sources: int = positive(16)  # genie_edits: images edited toward another class
    genie_ratios: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    feature_run: str | None = None  # reconstruction: a clipforge CLIP run whose image tower gives the Fréchet space
    probe_steps: int = positive(300)  # code_semantics: optimiser steps of every probe (batch 64)
    probe_width: int = positive(32)  # code_semantics: hidden width of the probes
    # lit_retrieval (clipforge.eval.lit): a LiT model trained through the engine on the frozen encoder's tokens
    lit_model: str = "lit-small"  # the lit variant (text tower, projection) or a settings file
    lit_steps: int = positive(200)
    lit_batch_size: int = positive(64)  # lowered to the number of training pairs when there are fewer
    lit_lr: float = positive(1e-3)
    lit_run_dir: str | None = None  # keep each dataset's LiT run in <dir>/<dataset>; None: a temporary folder


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = seed_field(0)
    output_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))


# ----------------------------------------------------------------------------------------------------------
# Loading and validation


def all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class, e.g. 'train.lr'."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def all_sections(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted section path, e.g. 'objective.clip'."""
    sections = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append(f"{prefix}{f.name}")
            sections.extend(all_sections(hints[f.name], f"{prefix}{f.name}."))
    return sections


def _nearest(key: str) -> str:
    keys = all_keys() + all_sections()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    if not match:  # compare the last component, which is usually where the typo is
        match = [keys[0]]
    return match[0]


def _fail(source: str, key: str, problem: str, suggest: bool = False) -> None:
    hint = f"; did you mean '{_nearest(key)}'?" if suggest else ""
    raise ConfigError(f"{source}: key '{key}' {problem}{hint}")


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 2


def _show(value: Any) -> str:
    """A bounded repr: a hostile value (e.g. YAML alias bombs) must not make a megabyte error line."""
    return _short.repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            _fail(source, key, f"must be one of {choices}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(source, key, f"must be a list, got {type(value).__name__} {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, key, f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(source, key, f"must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(source, key, f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            _fail(source, key, f"must be a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, key, f"must be a string, got {_show(value)}")
        return value
    raise ConfigError(f"{source}: key '{key}' has unsupported type {_type_name(tp)}")  # pragma: no cover


def _check_range(value: Any, meta: dict, key: str, source: str) -> None:
    if value is None or not meta or isinstance(value, list):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        _fail(source, key, f"must be {bound}, got {_show(value)}")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        bound = f"< {hi}" if meta.get("hi_open") else f"<= {hi}"
        _fail(source, key, f"must be {bound}, got {_show(value)}")


def _build(cls: type, raw: dict, source: str, prefix: str = ""):
    if not isinstance(raw, dict):
        _fail(source, prefix.rstrip(".") or "<root>", f"must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            _fail(source, f"{prefix}{key}", "is unknown", suggest=True)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp, value, key = hints[f.name], raw[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value if value is not None else {}, source, f"{key}.")
        else:
            kwargs[f.name] = _coerce(value, tp, key, source)
            _check_range(kwargs[f.name], f.metadata, key, source)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults are checked too (they could be changed by code)
        if f.name not in raw and not dataclasses.is_dataclass(hints[f.name]):
            _check_range(getattr(obj, f.name), f.metadata, f"{prefix}{f.name}", source)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=1e-3)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):  # YAML reads '1e-3' as a string; accept it as a number
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            pass
    return key.strip(), parsed


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            _fail(source, ".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(str(key)[:60], key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_load_unique(text: str):
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = _safe_load_unique(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: key '{err.key}' appears twice in one section (line {err.line}); "
                          f"keep one") from None
    except yaml.constructor.ConstructorError as err:
        raise ConfigError(f"{path}: refused a YAML tag that would construct an object ({err.problem})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load and validate an experiment config. Raises ConfigError with one line on any problem."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value, f"{source} (override '{text}')")
    config = _build(ExperimentConfig, raw, source)
    validate(config, source)
    return config


def validate(config: ExperimentConfig, source: str = "<config>") -> None:
    """Checks that span several keys."""
    if config.train.warmup_steps and config.train.max_steps and config.train.warmup_steps > config.train.max_steps:
        _fail(source, "train.warmup_steps", f"({config.train.warmup_steps}) exceeds train.max_steps "
              f"({config.train.max_steps})")
    if config.model.lock_image and config.model.lock_text:
        _fail(source, "model.lock_text", "and model.lock_image are both true: nothing would train")
    if config.model.precision != "fp32" and config.train.device == "cpu":
        _fail(source, "model.precision", f"'{config.model.precision}' needs a GPU but train.device is 'cpu'")
    from clipforge.registry import EVAL_TASKS, FAMILIES, OBJECTIVES  # name tables only: imports nothing heavy

    FAMILIES.check(config.model.family, source)
    OBJECTIVES.check(config.objective.name, source)
    for task in config.eval.tasks:
        EVAL_TASKS.check(task, source)
    if config.objective.lgvq.mask_ratio_min > config.objective.lgvq.mask_ratio_max:
        _fail(source, "objective.lgvq.mask_ratio_min", f"({config.objective.lgvq.mask_ratio_min}) exceeds "
              f"objective.lgvq.mask_ratio_max ({config.objective.lgvq.mask_ratio_max})")
    if len(config.data.csv_separator) != 1:
        _fail(source, "data.csv_separator", f"must be one character, got {_show(config.data.csv_separator)}")
    for shots in config.eval.fewshot_shots:
        if shots < 1:
            _fail(source, "eval.fewshot_shots", f"entries must be >= 1, got {shots}")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
