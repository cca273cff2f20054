"""Run every requested evaluation task on every dataset it applies to, sharing features across tasks.

    from clipforge.eval import run_suite, synth_eval_datasets
    summary = run_suite(model, preprocess, tokenizer, EvalConfig(), synth_eval_datasets(num_eval=500),
                        out_dir="runs/my_run", model_name="clipforge-vit-tiny")

Works with any model and its preprocess (PIL -> tensor) and tokenizer (list[str] -> [N, L] tokens, or None
for an image-only model). Each task declares the model capabilities it needs (clipforge.eval.capabilities):
zero-shot, retrieval and robustness need `encode_image` and `encode_text`; the linear probe and few-shot only
`encode_image`, so an image encoder alone (an LCL encoder, a user's backbone) gets those. Each dataset's images
are encoded once and shared by every task; the zero-shot classifier and the linear probe are computed once and
shared too. The model is put in eval mode for the run and restored after.

A task that the model or a dataset cannot serve (text tasks on an image-only model, retrieval without captions,
robustness without shifted variants...) is skipped for that dataset, never called, and listed with its reason
in the summary's `skipped`; a requested task that no dataset can serve raises DataError when `strict`, a
warning otherwise.

Run folders: `evaluate_run(run_dir)` evaluates a training run with its own settings (what `clipforge eval RUN`
and the end of `clipforge train` call); `evaluate_model(name, checkpoint=...)` evaluates any model on dataset
specs (what `clipforge eval --model` calls).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from clipforge.config import EvalConfig
from clipforge.errors import ConfigError, DataError
from clipforge.eval.capabilities import model_capabilities
from clipforge.eval.datasets import EvalDataset, ProgressFn
from clipforge.eval.features import FeatureStore
from clipforge.eval.fewshot import DEFAULT_QUERIES
from clipforge.eval.results import (
    make_record,
    remove_stale_results,
    safe_name,
    write_examples,
    write_json,
    write_result,
)
from clipforge.eval.retrieval import DEFAULT_RECALL_K
from clipforge.eval.tasks import TaskContext, get_task
from clipforge.eval.templates import load_templates

SUMMARY_FILE = "eval_suite.json"  # beside eval/, not in it: clip_benchmark's `build` reads every eval/*.json


def run_suite(
    model,
    preprocess,
    tokenizer,
    config: EvalConfig,
    datasets: Sequence[EvalDataset] | EvalDataset,
    out_dir: str | Path | None = None,
    *,
    model_name: str = "model",
    pretrained: str | None = None,
    templates: list[str] | None = None,
    device: torch.device | str | None = None,
    workers: int = 0,
    amp: bool = False,
    strict: bool = False,
    recall_k: tuple[int, ...] = DEFAULT_RECALL_K,
    fewshot_queries: int = DEFAULT_QUERIES,
    progress: ProgressFn | None = None,
) -> dict:
    """Evaluate `model` on `datasets` with the tasks in `config.tasks`.

    Writes one result JSON per (model, dataset, task) to `<out_dir>/eval/` (nothing when out_dir is None) and a
    summary to `<out_dir>/eval_suite.json`; results that other weights of the same `model_name` left there are
    removed first. `templates` overrides `config.templates` (a list of prompts). Dataset names must be unique.
    Returns {"model", "pretrained", "capabilities", "results": [records], "files": [paths],
    "skipped": [{"task", "dataset", "reason"}],
    "timing": {"total_s", "image_features_s", "text_features_s", "images_encoded", "texts_encoded",
    "tasks": {"<task>/<dataset>": seconds}}}.
    """
    start = time.perf_counter()
    datasets = [datasets] if isinstance(datasets, EvalDataset) else list(datasets)
    if not datasets:
        raise DataError("run_suite needs at least one dataset")
    names: dict[str, str] = {}
    for dataset in datasets:
        key = safe_name(dataset.name)
        if key in names:
            raise DataError(f"two evaluation datasets are named '{names[key]}' and '{dataset.name}' (their result "
                            f"files would overwrite each other); give them different names")
        names[key] = dataset.name
    tasks = [get_task(name) for name in dict.fromkeys(config.tasks)]  # each task once, in the given order
    capabilities = model_capabilities(model)
    note = ""
    if tokenizer is None and "encode_text" in capabilities:
        capabilities, note = capabilities - {"encode_text"}, " (no tokenizer was given)"
    template_source = "custom" if templates is not None else config.templates
    templates = list(templates) if templates is not None else load_templates(config.templates)
    device = torch.device(device) if device is not None else None
    store = FeatureStore(model, preprocess, tokenizer, batch_size=config.batch_size, device=device,
                         workers=workers, amp=amp, progress=progress)
    context = TaskContext(features=store, config=config, templates=templates, template_source=template_source,
                          recall_k=tuple(recall_k), fewshot_queries=fewshot_queries)

    plan, skipped = [], []
    for task in tasks:
        applicable = []
        for dataset in datasets:
            reason = task.missing(dataset, config, capabilities, note)
            if reason is None:
                applicable.append(dataset)
            else:
                skipped.append({"task": task.name, "dataset": dataset.name, "reason": reason})
        if not applicable:
            reasons = "; ".join(dict.fromkeys(s["reason"] for s in skipped if s["task"] == task.name))
            message = f"task '{task.name}' cannot run on any dataset ({reasons})"
            if strict:
                raise DataError(message)
            warnings.warn(message, stacklevel=2)
        plan.extend((task, dataset) for dataset in applicable)

    eval_dir = Path(out_dir) / "eval" if out_dir is not None else None
    if eval_dir is not None:  # the folder shows what ran with these weights, never another checkpoint's numbers
        remove_stale_results(eval_dir, model_name, pretrained)
    records, files, task_seconds = [], [], {}
    was_training = getattr(model, "training", False)
    if callable(getattr(model, "eval", None)):
        model.eval()
    try:
        for task, dataset in plan:
            stage = f"{task.name} {dataset.name}"
            if progress is not None:
                progress(stage, 0, 1)
            task_start = time.perf_counter()
            output = task.run(context, dataset)
            task_seconds[f"{task.name}/{dataset.name}"] = time.perf_counter() - task_start
            if progress is not None:
                progress(stage, 1, 1)
            record = make_record(
                model=model_name, pretrained=pretrained, dataset=dataset.name, task=task.name,
                benchmark_task=task.benchmark_task, metrics=output.metrics,
                settings={**output.settings, "batch_size": config.batch_size, "amp": amp},
                data=dataset.describe(), details=output.details,
                classnames=dataset.classnames if output.uses_classnames else None,
                templates=templates if output.uses_templates else None,
            )
            records.append(record)
            if eval_dir is not None:
                files.append(str(write_result(record, eval_dir)))
                if output.examples is not None:
                    write_examples(output.examples, record, eval_dir)
    finally:
        if callable(getattr(model, "train", None)):
            model.train(was_training)

    summary = {
        "model": model_name, "pretrained": pretrained or "", "capabilities": sorted(capabilities),
        "results": records, "files": files, "skipped": skipped,
        "timing": {
            "total_s": time.perf_counter() - start,
            "image_features_s": store.seconds["image"], "text_features_s": store.seconds["text"],
            "images_encoded": store.images_encoded, "texts_encoded": store.texts_encoded, "tasks": task_seconds,
        },
    }
    if out_dir is not None:
        write_json({k: v for k, v in summary.items() if k != "results"}, Path(out_dir) / SUMMARY_FILE)
    return summary


def evaluate_model(
    model_name: str,
    *,
    checkpoint: str | Path | None = None,
    config: EvalConfig | None = None,
    datasets: Sequence[str] = ("synth",),
    out_dir: str | Path | None = None,
    classnames_file: str | Path | None = None,
    synth=None,
    csv_image_key: str = "filepath",
    csv_caption_key: str = "caption",
    csv_separator: str | None = None,
    device: torch.device | str = "cpu",
    workers: int = 0,
    amp: bool = False,
    strict: bool = False,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Load `model_name` (with `checkpoint`: a weight file, a checkpoint folder or a run folder) and evaluate it
    on the dataset specs in `datasets` (see load_eval_datasets; SynthScenes generated as `synth`, a
    SynthConfig, says). Returns run_suite's summary; results go to `out_dir` when given."""
    from clipforge.config import SynthConfig
    from clipforge.eval.datasets import load_eval_datasets
    from clipforge.models.factory import find_model_weights, load_model

    config = config or EvalConfig()
    synth = synth or SynthConfig()
    weights = find_model_weights(checkpoint) if checkpoint is not None else None
    model, preprocess, tokenizer = load_model(model_name, checkpoint=weights, device=device,
                                              trust_pickle=trust_pickle)
    loaded = load_eval_datasets(list(datasets), classnames_file=classnames_file, num_eval=config.num_eval,
                                image_size=synth.image_size, seed=synth.seed, omit_fraction=synth.omit_fraction,
                                csv_image_key=csv_image_key, csv_caption_key=csv_caption_key,
                                csv_separator=csv_separator, progress=progress)
    return run_suite(model, preprocess, tokenizer, config, loaded, out_dir, model_name=safe_name(model_name),
                     pretrained=str(weights) if weights is not None else None, device=device, workers=workers,
                     amp=amp, strict=strict, progress=progress)


def run_dataset_specs(run_dir: str | Path, data, datasets: Sequence[str] | None = None) -> list[str]:
    """The dataset specs a run is evaluated on: `datasets` when given, else SynthScenes (generated like its
    training data) for a run that trained on synth, else its `data.val`; DataError when it has none.
    `data` is the run's DataConfig."""
    if datasets:
        return list(datasets)
    if data.train == "synth":
        return ["synth"]
    if data.val is None:
        raise DataError(f"run '{run_dir}' trained on files and has no data.val to evaluate on; pass a dataset "
                        f"('clipforge eval {run_dir} --dataset PATH') or set data.val in its config.yaml")
    return [data.val]


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    config: EvalConfig | None = None,
    datasets: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    classnames_file: str | Path | None = None,
    csv_separator: str | None = None,
    device: torch.device | str = "cpu",
    workers: int = 0,
    amp: bool = False,
    strict: bool = False,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Evaluate a training run folder with its own settings: its latest checkpoint (or `checkpoint`), its `eval`
    config (or `config`), on SynthScenes generated like its training data (`data.synth`) when it trained on
    synth, else on its `data.val` read with its CSV keys and separator (`datasets` overrides; they are read with
    its CSV keys, the separator `csv_separator` or the file's extension). Results go into the run folder (or
    `out_dir`); returns run_suite's summary. `write_report(run_dir)` then renders them.

    The one implementation behind `clipforge eval RUN` and the evaluation at the end of `clipforge train`.
    """
    from clipforge.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (it has no config.yaml)")
    experiment = load_config(run_dir / "config.yaml")
    data = experiment.data
    specs = run_dataset_specs(run_dir, data, datasets)
    if csv_separator is None and not datasets:
        csv_separator = data.csv_separator  # the run's own validation file, read as training read it
    return evaluate_model(
        experiment.model.name, checkpoint=checkpoint if checkpoint is not None else run_dir,
        config=config or experiment.eval, datasets=specs, out_dir=out_dir if out_dir is not None else run_dir,
        classnames_file=classnames_file, synth=data.synth, csv_image_key=data.csv_image_key,
        csv_caption_key=data.csv_caption_key, csv_separator=csv_separator, device=device, workers=workers, amp=amp,
        strict=strict, trust_pickle=trust_pickle or experiment.model.trust_pickle, progress=progress,
    )
