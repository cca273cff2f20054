"""Bad configs: a generator of 300+ broken experiment configs, each of which `clipforge train` must answer with
exit status 2 and exactly one line on stderr naming the problem -- no traceback, no run folder, nothing run.

The cases are generated from the config tree itself (clipforge.config), so a key added there is covered
without touching this file: a typo of every key at every level, two wrong-type values for every leaf, every
declared range crossed, NaN/inf where a finite number is needed, missing files (config, data, model config,
weights, resume folder), contradictory options, YAML that does not parse, YAML with Python object tags,
non-mapping documents and malformed command-line overrides.

The fast tests run the in-process CLI entry `clipforge.cli.main([...])` for every case (with the optimiser
factory replaced by a sentinel, so a config that slips through validation stops where training would start
instead of training), plus a few real `python -m clipforge train BAD.yaml` processes end to end.
benchmarks/reliability.py imports `bad_configs()` and `run_case()` from here and runs every case for real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import subprocess
import sys
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml

from clipforge.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = "@SUPPORT@"  # replaced by the folder holding the support files (shards, CSV, weight files, ...)
RUNS = "@RUNS@"  # replaced by the folder where each case's output_dir points
MARKER = "PWNED"  # a hostile payload would create @SUPPORT@/PWNED

# Known defects (see the final report of the reliability suite). Each case that fails because of one carries it;
# the test is then xfail(strict=True) and flips to a failure as soon as the defect is fixed.
MAX_LINE = 1000  # characters: an error line longer than this does not 'name the problem' any more



@dataclass(frozen=True)
class BadConfig:
    name: str  # unique id (also the run folder name)
    kind: str  # unknown_key | wrong_type | out_of_range | not_finite | missing_file | contradiction | yaml_syntax
    #            | yaml_tag | not_mapping | bad_override
    body: Any = None  # config as a mapping (dumped as YAML); ignored when `text` is given
    text: str | bytes | None = None  # raw config file content
    overrides: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()  # e.g. ("--resume", PATH)
    expect: str = ""  # the error line must contain this (it names the key or the problem)
    also: str = ""  # ... and this (what is wrong with it)
    defect: str | None = None  # the answer is wrong (traceback, accepted, ...) because of this known defect
    folder_defect: str | None = None  # the answer is right but a run folder is left behind
    config_path: str | None = None  # default: @SUPPORT@/configs/<name>.yaml; a missing path when no file
    no_file: bool = False  # the config path does not exist
    gpu_free_only: bool = False  # only bad on a machine without CUDA


# ----------------------------------------------------------------------------------------------------------
# The generator


def base_body(name: str) -> dict:
    """A valid, tiny config (8 SynthScenes images of 32 px, the micro model, one step on CPU)."""
    return {
        "name": name,
        "seed": 0,
        "output_dir": f"{RUNS}/{name}",
        "data": {"batch_size": 4, "workers": 0, "shuffle_buffer": 8,
                 "synth": {"num_train": 8, "num_val": 8, "image_size": 32, "shard_size": 8}},
        "model": {"name": "clipforge-vit-micro"},
        "train": {"max_steps": 1, "warmup_steps": 0, "progress": False, "tensorboard": False, "device": "cpu"},
        "eval": {"num_eval": 8, "batch_size": 8},
    }


@dataclass(frozen=True)
class Leaf:
    key: str  # dotted
    tp: Any  # type hint
    meta: dict  # range metadata (lo, hi, lo_open) or {}


def config_leaves(cls: type = ExperimentConfig, prefix: str = "") -> tuple[list[Leaf], list[str]]:
    """(every leaf key with its type and range, every section key) of the config tree."""
    leaves, sections = [], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            sections.append(key)
            sub_leaves, sub_sections = config_leaves(tp, f"{key}.")
            leaves += sub_leaves
            sections += sub_sections
        else:
            leaves.append(Leaf(key, tp, dict(f.metadata or {})))
    return leaves, sections


def _set(body: dict, key: str, value: Any) -> dict:
    node = body
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    return body


def _typo(word: str, variant: int) -> str:
    """A plausible misspelling: drop, swap, double or replace a letter (never the word itself)."""
    i = max(1, len(word) // 2)
    candidates = [
        word[:i] + word[i + 1:],  # drop
        word[: i - 1] + word[i] + word[i - 1] + word[i + 1:] if len(word) > 2 else word + "s",  # swap
        word[:i] + word[i] + word[i:],  # double
        word[:i] + ("x" if word[i] != "x" else "y") + word[i + 1:],  # replace
    ]
    for offset in range(len(candidates)):
        typo = candidates[(variant + offset) % len(candidates)]
        if typo != word:
            return typo
    return word + "_"  # pragma: no cover


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _wrong_values(tp: Any) -> list[tuple[str, Any, str]]:
    """(label, value, phrase the error must contain) of two values of the wrong type for `tp`."""
    base, _ = _strip_optional(tp)
    origin = typing.get_origin(base)
    if origin is Literal:
        return [("bogus_choice", "bogus", "must be one of"), ("int_for_choice", 3, "must be one of")]
    if origin is list:
        item = typing.get_args(base)[0]
        bad_item = "x" if item is int else [1]
        return [("scalar_for_list", 7, "must be a list"), ("bad_item", [bad_item], "must be")]
    if base is bool:
        return [("word_for_bool", "maybe", "true or false"), ("int_for_bool", 1, "true or false")]
    if base is int:
        return [("word_for_int", "many", "must be an integer"), ("float_for_int", 2.5, "must be an integer")]
    if base is float:
        return [("word_for_float", "fast", "must be a number"), ("bool_for_float", True, "must be a number")]
    if base is str:
        return [("list_for_str", [1, 2], "must be a string"), ("int_for_str", 5, "must be a string")]
    raise AssertionError(f"no wrong values for {tp}")  # pragma: no cover


def _out_of_range(leaf: Leaf) -> list[tuple[str, Any, str]]:
    base, _ = _strip_optional(leaf.tp)
    lo, hi, lo_open = leaf.meta.get("lo"), leaf.meta.get("hi"), leaf.meta.get("lo_open")
    cast = int if base is int else float
    values = []
    if lo is not None:
        if lo_open:
            values.append(("zero" if lo == 0 else "at_bound", cast(lo), f"must be > {lo}"))
        values.append(("below", cast(lo - 1) if base is int else cast(lo) - 0.5, f"must be >= {lo}"
                       if not lo_open else f"must be > {lo}"))
    if hi is not None:
        hi_open = leaf.meta.get("hi_open")
        bound = f"must be < {hi}" if hi_open else f"must be <= {hi}"
        if hi_open:
            values.append(("at_upper_bound", cast(hi), bound))
        values.append(("above", cast(hi + 1) if base is int else cast(hi) + 0.5, bound))
    return values


def _syntax_cases() -> list[tuple[str, str | bytes, str]]:
    return [
        ("unclosed_list", "data:\n  batch_size: [1, 2\n", "not valid YAML"),
        ("unclosed_brace", "train: {lr: 1, epochs: 2\n", "not valid YAML"),
        ("double_comma", "train: {lr: 1,, epochs: 2}\n", "not valid YAML"),
        ("bad_indent", "train:\n  lr: 1\n   epochs: 2\n", "not valid YAML"),
        ("tab_indent", "train:\n\tlr: 1\n", "not valid YAML"),
        ("unterminated_quote", "name: 'unterminated\nseed: 1\n", "not valid YAML"),
        ("two_colons", "train: lr: 1\n", "not valid YAML"),
        ("list_then_mapping", "- a\nname: b\n", "not valid YAML"),
        ("undefined_alias", "name: *nowhere\n", "not valid YAML"),
        ("reserved_indicator", "name: @home\n", "not valid YAML"),
        ("control_character", "name: a\x00b\n", "not valid YAML"),
        ("not_utf8", b"name: caf\xe9\n", "not UTF-8"),
        ("binary_garbage", bytes(range(256)) * 4, "not"),
        ("deep_nesting", "name: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
        ("billion_laughs", f"name: {laughs(6)}\n", "'name' must be a string"),
    ]


def laughs(depth: int) -> str:
    """A YAML flow list of 10**depth strings written in ~50*depth bytes with nested aliases."""
    if depth == 1:
        return "&l0 [" + ", ".join(['"lol"'] * 10) + "]"
    return f"&l{depth - 1} [{laughs(depth - 1)}, " + ", ".join([f"*l{depth - 2}"] * 9) + "]"


def _tag_cases() -> list[tuple[str, str, str]]:
    touch = f"touch {SUPPORT}/{MARKER}"
    return [
        ("apply_os_system_top", f"!!python/object/apply:os.system ['{touch}']\n", "refused"),
        ("apply_os_system_value", f"name: !!python/object/apply:os.system ['{touch}']\n", "refused"),
        ("apply_subprocess", f"train:\n  lr: !!python/object/apply:subprocess.check_call [['sh', '-c', '{touch}']]\n",
         "refused"),
        ("new_popen", f"name: !!python/object/new:subprocess.Popen [['sh', '-c', '{touch}']]\n", "refused"),
        ("python_name", "name: !!python/name:os.system\n", "refused"),
        ("python_module", "name: !!python/module:os\n", "refused"),
        ("python_tuple", "data:\n  batch_size: !!python/tuple [1, 2]\n", "refused"),
        ("python_object", "model: !!python/object:clipforge.config.ModelConfig {name: x}\n", "refused"),
        ("custom_tag", "name: !shell 'rm -rf /'\n", "refused"),
    ]


def bad_configs() -> list[BadConfig]:
    """Every generated bad config (more than 300), in a stable order with unique names."""
    leaves, sections = config_leaves()
    cases: list[BadConfig] = []

    def add(name: str, kind: str, **kw) -> None:
        if "body" not in kw and "text" not in kw and not kw.get("no_file"):
            kw["body"] = base_body(name)
        cases.append(BadConfig(name=name, kind=kind, **kw))

    def body_with(name: str, key: str, value: Any) -> dict:
        return _set(base_body(name), key, value)

    # -- an unknown key (a typo) at every level: every leaf and every section --------------------------------
    all_keys = [leaf.key for leaf in leaves] + sections
    for variant, key in enumerate(all_keys):
        parent, _, last = key.rpartition(".")
        siblings = {k.rpartition(".")[2] for k in all_keys if k.rpartition(".")[0] == parent}
        typo = next(t for t in (_typo(last, variant + i) for i in range(4)) if t not in siblings)
        typo_key = f"{parent}.{typo}" if parent else typo
        name = f"typo__{key}"
        body = base_body(name)
        _set(body, typo_key, {} if key in sections else 1)
        add(name, "unknown_key", body=body, expect=f"'{typo_key}' is unknown")
    add("unknown_top_section", "unknown_key", body={**base_body("unknown_top_section"), "optimizer": {"lr": 1}},
        expect="'optimizer' is unknown")
    add("unknown_deep_key", "unknown_key", body=body_with("unknown_deep_key", "data.synth.colors", 3),
        expect="'data.synth.colors' is unknown")

    # -- wrong types: two per leaf, and a scalar where a section belongs --------------------------------------
    for leaf in leaves:
        for label, value, phrase in _wrong_values(leaf.tp):
            name = f"type__{leaf.key}__{label}"
            add(name, "wrong_type", body=body_with(name, leaf.key, value), expect=f"'{leaf.key}", also=phrase)
    for key in sections:
        name = f"type__{key}__scalar_section"
        add(name, "wrong_type", body=body_with(name, key, 5), expect=f"'{key}' must be a mapping")

    # -- every declared range crossed ----------------------------------------------------------------------------
    for leaf in leaves:
        for label, value, phrase in _out_of_range(leaf):
            name = f"range__{leaf.key}__{label}"
            add(name, "out_of_range", body=body_with(name, leaf.key, value), expect=f"'{leaf.key}' {phrase}")

    # -- NaN and inf where a finite number is needed ------------------------------------------------------------
    float_leaves = [leaf for leaf in leaves if _strip_optional(leaf.tp)[0] is float]
    for leaf in float_leaves:
        if leaf.meta:
            name = f"nan__{leaf.key}"
            add(name, "not_finite", body=body_with(name, leaf.key, float("nan")), expect=f"'{leaf.key}'")
    for key in ("train.lr", "train.eps", "train.weight_decay"):
        name = f"inf__{key}"
        add(name, "not_finite", body=body_with(name, key, float("inf")), expect=f"'{key}'")
    add("override_1e999", "not_finite", overrides=("train.lr=1e999",), expect="'train.lr'")
    ranged = {leaf.key for leaf in float_leaves if leaf.meta}
    for key in ("train.grad_clip_norm", "objective.siglip.init_logit_scale"):
        if key in ranged:  # already covered by the loop above since the field got range metadata
            continue
        name = f"nan__{key}"
        add(name, "not_finite", body=body_with(name, key, float("nan")), expect=f"'{key}'")

    # -- values with no declared range that still must be positive / known ----------------------------------
    for key, value in [("seed", -1), ("train.max_steps", -5), ("train.max_steps", 0),
                       ("train.save_every_steps", -1), ("train.grad_clip_norm", -1.0),
                       ("objective.fineclip.teacher_resolution", -4), ("objective.fineclip.teacher_resolution", 0)]:
        name = f"range__{key}__{value}"
        add(name, "out_of_range", body=body_with(name, key, value), expect=f"'{key}'")
    add("range__data.synth.seed__negative", "out_of_range", body=body_with("range__data.synth.seed__negative",
                                                                           "data.synth.seed", -1),
        expect="seed")
    add("range__train.device__tpu", "out_of_range", body=body_with("range__train.device__tpu", "train.device", "tpu"),
        expect="train.device")
    add("range__eval.tasks__unknown", "out_of_range",
        body=body_with("range__eval.tasks__unknown", "eval.tasks", ["zeroshot", "zero_shot_typo"]),
        expect="eval.tasks")

    # -- contradictory options -------------------------------------------------------------------------------------
    def contradiction(name: str, expect: str, **changes) -> None:
        body = base_body(name)
        for key, value in changes.items():
            _set(body, key.replace("__", "."), value)
        add(name, "contradiction", body=body, expect=expect)

    contradiction("lock_both_towers", "lock_image", model__lock_image=True, model__lock_text=True)
    contradiction("warmup_over_max_steps", "warmup_steps", train__warmup_steps=5, train__max_steps=2)
    contradiction("fp16_on_cpu", "precision", model__precision="amp_fp16")
    contradiction("bf16_on_cpu", "precision", model__precision="amp_bf16")
    contradiction("batch_over_synth_size", "batch_size", data__batch_size=64)
    contradiction("fewshot_zero_shots", "fewshot_shots", eval__fewshot_shots=[0, 5])
    for name, expect, changes in [
        ("fp16_on_auto_without_gpu", "precision", {"model.precision": "amp_fp16", "train.device": "auto"}),
        ("cuda_without_gpu", "cuda", {"train.device": "cuda"}),
    ]:
        body = base_body(name)
        for key, value in changes.items():
            _set(body, key, value)
        add(name, "contradiction", body=body, expect=expect, gpu_free_only=True)
    add("batch_over_shard_dataset", "contradiction",
        body=_set(_set(base_body("batch_over_shard_dataset"), "data.train", f"{SUPPORT}/shards"), "data.batch_size", 16),
        expect="batch_size")

    # -- missing or unusable files ---------------------------------------------------------------------------------
    add("config_missing", "missing_file", no_file=True, config_path=f"{SUPPORT}/no/such/config.yaml",
        expect="does not exist")
    add("config_is_a_folder", "missing_file", no_file=True, config_path=f"{SUPPORT}/empty", expect="does not exist")
    data_cases = [
        ("data_train_missing", "data.train", f"{SUPPORT}/no/such/shards", "does not exist"),
        ("data_train_missing_csv", "data.train", f"{SUPPORT}/no/such.csv", "does not exist"),
        ("data_train_glob_no_match", "data.train", f"{SUPPORT}/shards/nothing-*.tar", "no shard matches"),
        ("data_train_brace_missing", "data.train", f"{SUPPORT}/shards/shard-{{000000..000003}}.tar", "does not exist"),
        ("data_train_empty_folder", "data.train", f"{SUPPORT}/empty", "neither"),
        ("data_train_garbage_tar", "data.train", f"{SUPPORT}/garbage.tar", "no samples"),
        ("data_val_missing", "data.val", f"{SUPPORT}/no/such/val", "does not exist"),
    ]
    for name, key, value, expect in data_cases:
        add(name, "missing_file", body=body_with(name, key, value), expect=expect)
    name = "data_csv_missing_column"
    add(name, "missing_file", body=_set(body_with(name, "data.train", f"{SUPPORT}/pairs.csv"),
                                        "data.csv_caption_key", "text"),
        expect="no column 'text'")
    name = "data_format_csv_on_shards"
    add(name, "missing_file", body=_set(body_with(name, "data.train", f"{SUPPORT}/shards"), "data.format", "csv"),
        expect="data.train")
    model_cases = [
        ("model_unknown_architecture", "model.name", "clipforge-vit-micr", "did you mean 'clipforge-vit-micro'"),
        ("model_config_missing", "model.name", f"{SUPPORT}/no_such_model.json", "does not exist"),
        ("model_config_malformed", "model.name", f"{SUPPORT}/malformed_model.json", "could not be read"),
        ("model_config_incomplete", "model.name", f"{SUPPORT}/incomplete_model.json", "needs the keys"),
        ("pretrained_missing", "model.pretrained", f"{SUPPORT}/no_such_weights.safetensors", "neither"),
        ("pretrained_pickle_refused", "model.pretrained", f"{SUPPORT}/evil.pt", "pickled checkpoint"),
        ("pretrained_garbage_safetensors", "model.pretrained", f"{SUPPORT}/garbage.safetensors", "not a readable"),
        ("pretrained_wrong_model", "model.pretrained", f"{SUPPORT}/other_model.safetensors", "does not match"),
    ]
    for name, key, value, expect in model_cases:
        add(name, "missing_file", body=body_with(name, key, value), expect=expect)
    add("resume_missing_folder", "missing_file", extra_args=("--resume", f"{SUPPORT}/no/such/checkpoint"),
        expect="not a checkpoint folder")
    add("resume_not_a_checkpoint", "missing_file", extra_args=("--resume", f"{SUPPORT}/empty"),
        expect="not a checkpoint folder")
    add("output_dir_is_a_file", "missing_file", body=body_with("output_dir_is_a_file", "output_dir",
                                                               f"{SUPPORT}/a_file"), expect="not writable")
    add("output_dir_under_a_file", "missing_file", body=body_with("output_dir_under_a_file", "output_dir",
                                                                  f"{SUPPORT}/a_file/run"), expect="not writable")
    add("output_dir_in_proc", "missing_file", body=body_with("output_dir_in_proc", "output_dir",
                                                             "/proc/clipforge-denied/run"), expect="not writable")

    # -- YAML that does not parse, that would build Python objects, or that is not a mapping -------------------
    for name, text, expect in _syntax_cases():
        add(f"yaml__{name}", "yaml_syntax", text=text, expect=expect)
    for name, text, expect in _tag_cases():
        add(f"tag__{name}", "yaml_tag", text=text, expect=expect)
    for name, text in [("list", "- a\n- b\n"), ("integer", "42\n"), ("string", "just some words\n"),
                       ("boolean", "true\n"), ("empty_list", "[]\n"), ("empty_string", "''\n")]:
        add(f"toplevel__{name}", "not_mapping", text=text, expect="top level must be a mapping")

    # -- malformed command-line overrides ---------------------------------------------------------------------
    for name, override, expect in [
        ("no_equals", "train.lr", "must look like key=value"),
        ("no_equals_word", "fast", "must look like key=value"),
        ("empty_key", "=3", "is unknown"),
        ("unknown_key", "train.lrr=1e-3", "'train.lrr' is unknown; did you mean 'train.lr'"),
        ("unknown_section", "optim.lr=1", "'optim' is unknown"),
        ("section_as_value", "train=5", "'train' must be a mapping"),
        ("leaf_as_section", "train.lr.value=1", "train.lr"),
        ("wrong_type", "data.batch_size=big", "'data.batch_size' must be an integer"),
        ("float_for_int", "train.epochs=1.5", "'train.epochs' must be an integer"),
        ("empty_value", "train.lr=", "'train.lr' must be a number"),
        ("bad_choice", "model.precision=fp8", "'model.precision' must be one of"),
        ("negative", "data.synth.num_train=-3", "'data.synth.num_train' must be > 0"),
        ("double_dot", "data..batch_size=4", "is unknown"),
        ("leading_dot", ".train.lr=1", "is unknown"),
        ("python_tag", f"train.lr=!!python/object/apply:os.system ['touch {SUPPORT}/{MARKER}']",
         "'train.lr' must be a number"),
        ("list_for_int", "data.batch_size=[1,2]", "'data.batch_size' must be an integer"),
    ]:
        add(f"override__{name}", "bad_override", overrides=(override,), expect=expect)

    names = [c.name for c in cases]
    assert len(names) == len(set(names)), f"case names must be unique: {sorted({n for n in names if names.count(n) > 1})}"
    return cases


# ----------------------------------------------------------------------------------------------------------
# Support files and running a case


def make_support(folder: Path) -> Path:
    """The files the cases point at: a tiny shard set, a CSV, model configs, weight files, an empty folder."""
    from safetensors.torch import save_file

    from clipforge.data.shards import write_shards
    from clipforge.data.synth import SynthScenes

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configs").mkdir(exist_ok=True)
    (folder / "empty").mkdir(exist_ok=True)
    records = list(SynthScenes(image_size=32, seed=3).records(0, 8))
    write_shards(records, folder / "shards", shard_size=8, prefix="shard")
    image = folder / "one.png"
    image.write_bytes(records[0]["png"])
    (folder / "pairs.csv").write_text("filepath,caption\none.png,a red square\n", encoding="utf-8")
    (folder / "garbage.tar").write_bytes(os.urandom(3000))
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (folder / "a_file").write_text("not a folder\n")
    (folder / "malformed_model.json").write_text('{"embed_dim": 64, ')
    (folder / "incomplete_model.json").write_text('{"embed_dim": 64}')
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(folder / "other_model.safetensors"))
    marker = folder / MARKER

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "evil.pt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    return folder


def _substitute(value: Any, support: Path, runs: Path) -> Any:
    if isinstance(value, str):
        return value.replace(SUPPORT, str(support)).replace(RUNS, str(runs))
    if isinstance(value, bytes):
        return value.replace(SUPPORT.encode(), str(support).encode()).replace(RUNS.encode(), str(runs).encode())
    if isinstance(value, dict):
        return {k: _substitute(v, support, runs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, support, runs) for v in value]
    return value


def case_argv(case: BadConfig, support: Path, runs: Path) -> list[str]:
    """Write the case's config file (unless it must not exist); the `clipforge` arguments that run it."""
    path = Path(_substitute(case.config_path, support, runs)) if case.config_path else \
        support / "configs" / f"{case.name}.yaml"
    if not case.no_file:
        content = case.text if case.text is not None else yaml.safe_dump(case.body, sort_keys=False)
        content = _substitute(content, support, runs)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    overrides = [_substitute(o, support, runs) for o in case.overrides]
    extra = [_substitute(a, support, runs) for a in case.extra_args]
    return ["train", str(path), *overrides, *extra, "--no-progress"]


class ReachedTraining(BaseException):
    """Raised by the sentinel optimiser factory: the config got through every check to the training loop."""


@dataclass
class Outcome:
    status: int | str  # exit status, "accepted" (reached training) or "exception" (escaped main)
    stderr: str
    error: str = ""  # the escaped exception, if any

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_case(case: BadConfig, support: Path, runs: Path, stop_before_training: bool = True) -> Outcome:
    """Run `clipforge train` on the case in this process, from `runs` as the working folder."""
    import clipforge.cli
    import clipforge.engine.loop as loop

    argv = case_argv(case, support, runs)
    stderr, stdout = io.StringIO(), io.StringIO()
    patch = pytest.MonkeyPatch()
    if stop_before_training:
        def sentinel(*args, **kwargs):
            raise ReachedTraining

        patch.setattr(loop, "build_phase_optimizers", sentinel)
    try:
        with contextlib.chdir(runs), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            status: int | str = clipforge.cli.main(argv)
        error = ""
    except ReachedTraining:
        status, error = "accepted", "reached the training loop"
    except SystemExit as exit_:
        status, error = exit_.code if isinstance(exit_.code, int) else 1, ""
    except BaseException as err:  # noqa: BLE001 - an escaped exception is exactly what we look for
        status = "exception"
        error = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1]
        stderr.write("Traceback (most recent call last):\n" + error + "\n")
    finally:
        patch.undo()
    if status == 0:
        status = "accepted"
    return Outcome(status=status, stderr=stderr.getvalue(), error=error)


def answer_problems(case: BadConfig, outcome: Outcome) -> list[str]:
    """Everything wrong with how the CLI answered a bad config (empty = a clean one-line answer)."""
    problems = []
    if outcome.status != 2:
        problems.append(f"status {outcome.status!r} ({outcome.error or 'no error'})")
    if "Traceback" in outcome.stderr:
        problems.append("a traceback on stderr")
    if len(outcome.lines) != 1:
        problems.append(f"{len(outcome.lines)} lines on stderr")
    elif len(outcome.lines[0]) > MAX_LINE:
        problems.append(f"a line of {len(outcome.lines[0])} characters")
    elif not outcome.lines[0].startswith("clipforge: error: "):
        problems.append(f"unexpected line {outcome.lines[0][:120]!r}")
    elif any(part not in outcome.lines[0] for part in (case.expect, case.also)):
        problems.append(f"the line does not name the problem ({case.expect!r}, {case.also!r}): "
                        f"{outcome.lines[0][:200]!r}")
    return problems


def applicable_cases() -> list[BadConfig]:
    has_gpu = torch.cuda.is_available()
    return [c for c in bad_configs() if not (c.gpu_free_only and has_gpu)]


# ----------------------------------------------------------------------------------------------------------
# Tests

CASES = applicable_cases()


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    support = make_support(tmp_path_factory.mktemp("support"))
    runs = tmp_path_factory.mktemp("runs")
    return support, runs, {}


def _outcome(arena, case: BadConfig) -> Outcome:
    support, runs, cache = arena
    if case.name not in cache:
        cache[case.name] = run_case(case, support, runs)
    return cache[case.name]


def test_the_generator_makes_at_least_200_distinct_bad_configs_of_every_kind():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 200
    assert kinds >= {"unknown_key", "wrong_type", "out_of_range", "not_finite", "missing_file", "contradiction",
                     "yaml_syntax", "yaml_tag", "not_mapping", "bad_override"}
    leaves, sections = config_leaves()
    typo_keys = {c.name.split("__", 1)[1] for c in CASES if c.name.startswith("typo__")}
    type_keys = {c.name.split("__")[1] for c in CASES if c.name.startswith("type__")}
    assert typo_keys >= {leaf.key for leaf in leaves} | set(sections)  # a typo at every level
    assert type_keys >= {leaf.key for leaf in leaves} | set(sections)  # a wrong type for every leaf


def test_the_base_config_is_valid(tmp_path):
    """So every case fails because of what it changed, not because of the base."""
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(_substitute(base_body("base"), tmp_path, tmp_path)))
    config = load_config(path)
    assert config.train.max_steps == 1 and config.data.synth.num_train == 8


def _marks(defect: str | None):
    return [pytest.mark.xfail(strict=True, reason=defect)] if defect else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c.defect)) for c in CASES])
def test_bad_config_exits_2_with_one_line_naming_the_problem(arena, case):
    outcome = _outcome(arena, case)
    assert not answer_problems(case, outcome), answer_problems(case, outcome)
    assert not (arena[0] / MARKER).exists(), "a hostile YAML/pickle payload ran"


MESSAGE_ONLY_DEFECTS: set[str] = set()  # defects where the status is right (2), only the line is wrong


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=_marks(c.folder_defect or (c.defect if c.defect not in MESSAGE_ONLY_DEFECTS
                                                                   else None)))
    for c in CASES])
def test_bad_config_leaves_no_run_folder(arena, case):
    outcome = _outcome(arena, case)
    support, runs, _ = arena
    assert outcome.status == 2
    assert not (runs / case.name).exists(), "a run folder was created before the config was rejected"
    assert not (runs / "runs").exists()  # the default output_dir (relative to the working folder)


def _suggestion(arena, case: BadConfig) -> str:
    line = (_outcome(arena, case).lines or [""])[0]
    return line.rpartition("did you mean '")[2].rstrip("'?")


def test_typo_suggestions_name_the_intended_leaf_key(arena):
    """For a misspelt leaf key, the nearest-key hint is exactly the key the typo came from."""
    leaves = {leaf.key for leaf in config_leaves()[0]}
    typos = [c for c in CASES if c.name.startswith("typo__") and c.name.split("__", 1)[1] in leaves]
    wrong = {c.name: _suggestion(arena, c) for c in typos if _suggestion(arena, c) != c.name.split("__", 1)[1]}
    assert not wrong and len(typos) == len(leaves)


def test_typo_suggestions_name_the_intended_section(arena):
    """A misspelt section is answered with the section it came from (objective.clp -> 'objective.clip')."""
    sections = set(config_leaves()[1])
    typos = [c for c in CASES if c.name.startswith("typo__") and c.name.split("__", 1)[1] in sections]
    wrong = {c.name: _suggestion(arena, c) for c in typos
             if _suggestion(arena, c).split(".")[: c.name.count(".") + 1] != c.name.split("__", 1)[1].split(".")}
    assert not wrong, wrong


# -- end to end: real processes --------------------------------------------------------------------------------

END_TO_END = ["tag__apply_os_system_top", "typo__train.lr", "override__no_equals"]


@pytest.mark.slow
def test_bad_configs_end_to_end_in_real_processes(tmp_path):
    support = make_support(tmp_path / "support")
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    by_name = {c.name: c for c in CASES}
    processes = {}
    for name in END_TO_END:  # all at once: the interpreter start-up (torch import) dominates
        argv = case_argv(by_name[name], support, runs)
        processes[name] = subprocess.Popen([sys.executable, "-m", "clipforge", *argv], cwd=runs, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        outcome = Outcome(status=process.returncode, stderr=stderr)
        assert not answer_problems(by_name[name], outcome), (name, stderr[-2000:])
        assert stdout == ""
    assert sorted(p.name for p in runs.iterdir()) == []  # no run folder, nothing written
    assert not (support / MARKER).exists()

