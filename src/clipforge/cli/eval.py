"""`clipforge eval RUN_DIR | --model NAME [--checkpoint PATH] [--dataset synth|PATH] [--tasks ...]`.

A run folder is evaluated by `clipforge.eval.suite.evaluate_run` (its latest checkpoint, its eval settings and
its own data, with the flags as overrides); `--model` by `evaluate_model`. Every flag is checked before any work.
Draws a progress bar per feature pass and task, prints a results table, and writes eval/*.json plus report.html
into the run folder (or --out).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

EXAMPLES = """examples:
  clipforge eval runs/clip_synth_tiny                      # a trained run: its latest checkpoint, SynthScenes
  clipforge eval runs/clip_synth_tiny --tasks zeroshot retrieval
  clipforge eval --model clipforge-vit-tiny --checkpoint model.safetensors --out runs/eval_tiny
  clipforge eval --model ViT-B-32 --checkpoint open_clip_model.safetensors --dataset data/pets \\
                 --templates openai_imagenet --tasks zeroshot linear_probe fewshot
  clipforge eval --model clipforge-vit-tiny --dataset pairs.csv --tasks retrieval

datasets: 'synth' (SynthScenes base and novel classes, every shifted variant, generated in memory), an
ImageFolder root (class folders; train/ + test/ adds a linear-probe training set), a .csv of
filepath,caption rows, or webdataset shards (a folder, a .tar, a glob or a {000..009} pattern)."""


def add_parser(subparsers) -> None:
    from clipforge.eval.tasks import available_tasks

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: zero-shot, retrieval, linear probe, few-shot, robustness",
        description="Evaluate a trained run or any open_clip model. Each image is encoded once and shared by "
                    "all tasks. Results go to <out>/eval/<model>__<dataset>__<task>.json (CLIP_benchmark "
                    "metric names) and an HTML report to <out>/report.html.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="a run folder (config.yaml + checkpoints/); results are written into it")
    parser.add_argument("--model", default=None,
                        help="open_clip architecture name or model-config file (instead of a run folder)")
    parser.add_argument("--checkpoint", default=None,
                        help="weights: a .safetensors file, a checkpoint folder or a run folder")
    parser.add_argument("--dataset", action="append", default=None, metavar="synth|PATH",
                        help="dataset to evaluate on (repeatable; default: a run's own (SynthScenes like its "
                             "training data, or its data.val), else synth)")
    parser.add_argument("--set", dest="settings", nargs="+", default=None, metavar="KEY=VALUE",
                        help="any eval setting, checked like a config key (e.g. feature_run=runs/clip_synth_tiny "
                             "for the Fréchet distance and the text-to-image judge, lit_steps=300, probe_steps=100)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help=f"tasks to run (default: the config's eval.tasks, each on the datasets that support "
                             f"it); choices: {', '.join(available_tasks())}")
    parser.add_argument("--classnames", default=None, metavar="FILE",
                        help="class names, one per line in label order (overrides the dataset's; the "
                             "dataset's own names in another order are matched by name)")
    parser.add_argument("--csv-separator", default=None, metavar="CHAR",
                        help="column separator of .csv/.tsv datasets (default: ',' for .csv, tab for .tsv; "
                             "'tab' or '\\t' for a tab)")
    parser.add_argument("--templates", default=None, metavar="NAME|FILE",
                        help="prompt templates: synthscenes, openai_imagenet, or a file with one '{}' template "
                             "per line (default: the config's, else synthscenes)")
    parser.add_argument("--num-eval", type=int, default=None, help="SynthScenes images per evaluated split")
    parser.add_argument("--batch-size", type=int, default=None, help="images/texts per forward pass")
    parser.add_argument("--ways", type=int, default=None, help="few-shot: classes per episode")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="few-shot: K values (e.g. 1 5 10)")
    parser.add_argument("--episodes", type=int, default=None, help="few-shot: episodes per K")
    parser.add_argument("--seed", type=int, default=None, help="seed of few-shot episodes and probe splits")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="autocast the forward passes (GPU)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--out", default=None,
                        help="output folder (default: the run folder, or runs/eval-<model>)")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow loading pickled (.pt/.bin) checkpoints, which can run code")
    parser.set_defaults(handler=run)


class ProgressView:
    """One rich progress bar per stage (data generation, each feature pass, each task)."""

    def __init__(self, console, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
        self.bars: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.bars[stage], completed=done, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _resolve_device(name: str) -> str:
    """'auto' -> cuda when there is one, else cpu; anything else must name a device this machine has."""
    import torch

    from clipforge.errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name} but MPS is not available")
    elif device.type != "cpu":
        raise ConfigError(f"--device '{name}' is not a device (auto, cpu, cuda, cuda:N or mps)")
    return name


def _check_out_dir(out_dir: Path) -> None:
    """The output folder must be a folder or creatable as one: no file on its path."""
    from clipforge.errors import ConfigError

    for path in [out_dir, *out_dir.parents]:
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"--out '{out_dir}': '{path}' is a file, not a folder")
            return


def _csv_separator(text: str | None) -> str | None:
    from clipforge.errors import ConfigError

    if text is None:
        return None
    separator = "\t" if text in ("\\t", "tab") else text
    if len(separator) != 1:
        raise ConfigError(f"--csv-separator must be one character (or 'tab'), got {text!r}")
    return separator


def _settings(args) -> dict:
    """Everything the flags say, checked before any work: a one-line ConfigError/DataError for each mistake."""
    import dataclasses

    from clipforge.config import EvalConfig, load_config
    from clipforge.errors import ConfigError
    from clipforge.eval.suite import run_dataset_specs
    from clipforge.eval.tasks import get_task
    from clipforge.eval.templates import load_classnames, load_templates
    from clipforge.models.factory import find_model_weights

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and args.model is None:
        raise ConfigError("give a run folder or --model NAME (see 'clipforge eval --help')")
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' does not exist")
    is_run = run_dir is not None and (run_dir / "config.yaml").is_file()
    if is_run and args.model is not None:
        raise ConfigError(f"--model cannot be used with the run folder '{run_dir}' (its config.yaml names the "
                          f"model); pick other weights with --checkpoint")
    if run_dir is not None and not is_run and args.model is None:
        raise ConfigError(f"'{run_dir}' has no config.yaml; give --model NAME to evaluate the weights in it")
    settings = [item if item.startswith("eval.") else f"eval.{item}" for item in (args.settings or [])]
    experiment = load_config(run_dir / "config.yaml", settings) if is_run else None
    if experiment is not None:
        run_dataset_specs(run_dir, experiment.data, args.dataset)  # a run with nothing to evaluate on: say so now
    eval_config = dataclasses.replace(experiment.eval) if experiment else \
        (load_config(None, settings).eval if settings else EvalConfig())
    overrides = {"tasks": args.tasks, "templates": args.templates, "num_eval": args.num_eval,
                 "batch_size": args.batch_size, "fewshot_ways": args.ways, "fewshot_shots": args.shots,
                 "fewshot_episodes": args.episodes, "seed": args.seed}
    eval_config = dataclasses.replace(eval_config, **{k: v for k, v in overrides.items() if v is not None})
    for key in ("num_eval", "batch_size", "fewshot_ways", "fewshot_episodes"):
        if getattr(eval_config, key) < 1:
            raise ConfigError(f"--{key.replace('fewshot_', '').replace('_', '-')} must be >= 1")
    if any(s < 1 for s in eval_config.fewshot_shots):
        raise ConfigError("--shots entries must be >= 1")
    if eval_config.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {eval_config.seed}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    for task in eval_config.tasks:
        get_task(task)
    load_templates(eval_config.templates)  # a bad template file fails now, not after the image passes
    if args.classnames is not None:
        load_classnames(args.classnames)
    device = _resolve_device(args.device)
    out_dir = Path(args.out) if args.out else run_dir
    if out_dir is None:
        out_dir = Path("runs") / f"eval-{Path(args.model).stem}"
    _check_out_dir(out_dir)
    checkpoint = args.checkpoint or (str(run_dir) if run_dir is not None else None)
    weights = find_model_weights(checkpoint) if checkpoint is not None else None  # pointers are checked here
    return {"run_dir": run_dir, "is_run": is_run, "config": eval_config, "device": device, "out_dir": out_dir,
            "csv_separator": _csv_separator(args.csv_separator), "weights": weights}


def run(args) -> int:
    from rich.console import Console

    from clipforge.eval.suite import evaluate_model, evaluate_run

    console = Console(stderr=True)
    settings = _settings(args)
    out_dir, device = settings["out_dir"], settings["device"]
    subject = f"run {settings['run_dir']}" if settings["is_run"] else args.model
    weights = settings["weights"]
    # a --model folder is a transformers CLIP folder, which carries its weights
    own = "its own weights" if args.model is not None and Path(args.model).is_dir() else "random init"
    console.print(f"[bold]evaluating[/] {subject} with {weights or own} on {device} -> {out_dir}",
                  soft_wrap=True)
    common = {"config": settings["config"], "out_dir": out_dir, "classnames_file": args.classnames,
              "csv_separator": settings["csv_separator"], "device": device, "workers": args.workers,
              "amp": args.amp, "strict": args.tasks is not None, "trust_pickle": args.trust_pickle}

    with ProgressView(console, not args.no_progress) as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if settings["is_run"]:
            summary = evaluate_run(settings["run_dir"], checkpoint=weights, datasets=args.dataset,
                                   progress=progress, **common)
        else:
            summary = evaluate_model(args.model, checkpoint=weights, datasets=args.dataset or ["synth"],
                                     progress=progress, **common)
    for message in dict.fromkeys(str(w.message) for w in caught):  # each distinct warning once
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    console.print(results_table(summary))
    for item in summary["skipped"]:
        console.print(f"[dim]not run: {item['task']} on {item['dataset']} ({item['reason']})[/]", soft_wrap=True)
    timing = summary["timing"]
    console.print(f"{timing['total_s']:.1f} s in all; {timing['images_encoded']} images encoded once each "
                  f"({timing['image_features_s']:.1f} s), {timing['texts_encoded']} texts "
                  f"({timing['text_features_s']:.1f} s)")
    console.print(f"results: {out_dir / 'eval'}")
    if not args.no_report:
        from clipforge.eval.report import write_report

        console.print(f"report:  {write_report(out_dir)}")
    return 0


def _format_ci(value) -> str:
    """A 95% interval in percent, or n/a when there is none (a single episode)."""
    if value is None or value != value:  # None or NaN
        return "±n/a"
    return f"±{100 * value:.1f}"


def results_table(summary: dict):
    from rich.table import Table

    from clipforge.eval.report import HEADLINE_METRICS, METRIC_LABELS
    from clipforge.eval.results import is_fraction

    table = Table(title=f"evaluation of {summary['model']} (accuracies and recalls in %)")
    for column, justify in (("dataset", "left"), ("task", "left"), ("metrics", "left")):
        table.add_column(column, justify=justify)
    for record in summary["results"]:
        task = record["clipforge_task"]
        names = HEADLINE_METRICS.get(task) or [k for k in record["metrics"] if "ci95" not in k]
        cells = []
        for name in names:
            value = record["metrics"].get(name)
            if value is None:
                continue
            label = METRIC_LABELS.get(name, name)
            if task == "fewshot" and name.startswith("fewshot_acc1@"):
                ci = record["metrics"].get(name.replace("acc1", "ci95"))
                cells.append(f"{name.split('@')[1]} {100 * value:.1f}{_format_ci(ci)}")
            elif not is_fraction(name, value):
                cells.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
            elif "effective_robustness" in name:
                cells.append(f"{label} {100 * value:+.1f}pp")
            else:
                cells.append(f"{label} {100 * value:.1f}")
        table.add_row(record["dataset"], task, "  ".join(cells))
    return table
