"""Run every requested evaluation task on every dataset it applies to, sharing features across tasks.

    from clipforge.eval import run_suite, synth_eval_datasets
    summary = run_suite(model, preprocess, tokenizer, EvalConfig(), synth_eval_datasets(num_eval=500),
                        out_dir="runs/my_run", model_name="clipforge-vit-tiny")

Works with any model exposing `encode_image` / `encode_text` (open_clip, ours, a user's own) plus its
preprocess (PIL -> tensor) and tokenizer (list[str] -> [N, L] tokens). Each dataset's images are encoded once
and shared by zero-shot, retrieval, linear probe, few-shot and robustness; the zero-shot classifier and the
linear probe are computed once and shared too. The model is put in eval mode for the run and restored after.

A task that a dataset cannot serve (retrieval without captions, robustness without shifted variants...) is
skipped for that dataset and listed with its reason in the summary's `skipped`; a requested task that no
dataset can serve raises DataError when `strict`, a warning otherwise.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from clipforge.config import EvalConfig
from clipforge.errors import DataError
from clipforge.eval.datasets import EvalDataset, ProgressFn
from clipforge.eval.features import FeatureStore
from clipforge.eval.fewshot import DEFAULT_QUERIES
from clipforge.eval.results import make_record, write_examples, write_json, write_result
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
    summary to `<out_dir>/eval_suite.json`. `templates` overrides `config.templates` (a list of prompts).
    Returns {"model", "results": [records], "files": [paths], "skipped": [{"task", "dataset", "reason"}],
    "timing": {"total_s", "image_features_s", "text_features_s", "images_encoded", "texts_encoded",
    "tasks": {"<task>/<dataset>": seconds}}}.
    """
    start = time.perf_counter()
    datasets = [datasets] if isinstance(datasets, EvalDataset) else list(datasets)
    if not datasets:
        raise DataError("run_suite needs at least one dataset")
    tasks = [get_task(name) for name in dict.fromkeys(config.tasks)]  # each task once, in the given order
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
            reason = task.missing(dataset, config)
            if reason is None:
                applicable.append(dataset)
            else:
                skipped.append({"task": task.name, "dataset": dataset.name, "reason": reason})
        if not applicable:
            reasons = "; ".join(s["reason"] for s in skipped if s["task"] == task.name)
            message = f"task '{task.name}' cannot run on any dataset ({reasons})"
            if strict:
                raise DataError(message)
            warnings.warn(message, stacklevel=2)
        plan.extend((task, dataset) for dataset in applicable)

    eval_dir = Path(out_dir) / "eval" if out_dir is not None else None
    records, files, task_seconds = [], [], {}
    was_training = getattr(model, "training", False)
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
        model.train(was_training)

    summary = {
        "model": model_name, "pretrained": pretrained or "", "results": records, "files": files,
        "skipped": skipped,
        "timing": {
            "total_s": time.perf_counter() - start,
            "image_features_s": store.seconds["image"], "text_features_s": store.seconds["text"],
            "images_encoded": store.images_encoded, "texts_encoded": store.texts_encoded, "tasks": task_seconds,
        },
    }
    if out_dir is not None:
        write_json({k: v for k, v in summary.items() if k != "results"}, Path(out_dir) / SUMMARY_FILE)
    return summary


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    config: EvalConfig | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
) -> dict:
    """Evaluate a training run folder with its own settings: the latest checkpoint (or `checkpoint`), the run's
    `eval` config (or `config`), on SynthScenes generated like its training data (`data.synth`) when it trained
    on synth, else on its `data.val`. Results go into the run folder (eval/, eval_suite.json); returns
    run_suite's summary. `write_report(run_dir)` then renders them.
    """
    from clipforge.config import load_config
    from clipforge.eval.datasets import load_eval_datasets
    from clipforge.eval.results import safe_name
    from clipforge.models.factory import find_model_weights, load_model

    run_dir = Path(run_dir)
    experiment = load_config(run_dir / "config.yaml")
    config = config or experiment.eval
    weights = find_model_weights(checkpoint if checkpoint is not None else run_dir)
    model, preprocess, tokenizer = load_model(experiment.model.name, checkpoint=weights, device=device,
                                              trust_pickle=experiment.model.trust_pickle)
    data = experiment.data
    spec = "synth" if data.train == "synth" else data.val
    if spec is None:
        raise DataError("the run trained on files and has no data.val to evaluate on; use 'clipforge eval "
                        "--dataset PATH'")
    datasets = load_eval_datasets(spec, num_eval=config.num_eval, image_size=data.synth.image_size,
                                  seed=data.synth.seed, omit_fraction=data.synth.omit_fraction,
                                  csv_image_key=data.csv_image_key, csv_caption_key=data.csv_caption_key,
                                  csv_separator=data.csv_separator, progress=progress)
    return run_suite(model, preprocess, tokenizer, config, datasets, run_dir,
                     model_name=safe_name(experiment.model.name), pretrained=str(weights), device=device,
                     progress=progress)
