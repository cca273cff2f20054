"""`clipforge eval RUN_DIR | --model NAME [--checkpoint PATH] [--dataset synth|PATH] [--tasks ...]`.

Loads the model (a run's latest checkpoint, or any open_clip architecture with optional weights), builds the
evaluation datasets, runs the suite with a progress bar per feature pass and task, prints a results table,
and writes eval/*.json plus report.html into the run folder (or --out).
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
                        help="dataset to evaluate on (repeatable; default: synth)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help=f"tasks to run (default: the config's eval.tasks, each on the datasets that support "
                             f"it); choices: {', '.join(available_tasks())}")
    parser.add_argument("--classnames", default=None, metavar="FILE",
                        help="class names, one per line in label order (overrides the dataset's)")
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
    import torch

    from clipforge.errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is available")
    return name


def _settings(args):
    """(EvalConfig, data settings dict, model name, checkpoint, out dir) from the run folder and the flags."""
    import dataclasses

    from clipforge.config import EvalConfig, SynthConfig, load_config, validate
    from clipforge.errors import ConfigError

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and args.model is None:
        raise ConfigError("give a run folder or --model NAME (see 'clipforge eval --help')")
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' does not exist")
    config = load_config(run_dir / "config.yaml") if run_dir and (run_dir / "config.yaml").is_file() else None
    eval_config = dataclasses.replace(config.eval) if config else EvalConfig()
    synth = config.data.synth if config else SynthConfig()
    overrides = {"tasks": args.tasks, "templates": args.templates, "num_eval": args.num_eval,
                 "batch_size": args.batch_size, "fewshot_ways": args.ways, "fewshot_shots": args.shots,
                 "fewshot_episodes": args.episodes, "seed": args.seed}
    eval_config = dataclasses.replace(eval_config, **{k: v for k, v in overrides.items() if v is not None})
    for key in ("num_eval", "batch_size", "fewshot_ways", "fewshot_episodes"):
        if getattr(eval_config, key) < 1:
            raise ConfigError(f"--{key.replace('fewshot_', '').replace('_', '-')} must be >= 1")
    if config:
        validate(dataclasses.replace(config, eval=eval_config), "command line")
    elif any(s < 1 for s in eval_config.fewshot_shots):
        raise ConfigError("--shots entries must be >= 1")
    model_name = args.model or (config.model.name if config else None)
    checkpoint = args.checkpoint or (str(run_dir) if run_dir else None)
    out_dir = Path(args.out) if args.out else run_dir
    if out_dir is None:
        out_dir = Path("runs") / f"eval-{Path(model_name).stem}"
    return eval_config, synth, model_name, checkpoint, out_dir


def run(args) -> int:
    from rich.console import Console

    from clipforge.eval import load_eval_datasets, run_suite
    from clipforge.eval.results import safe_name
    from clipforge.models.factory import find_model_weights, load_model

    console = Console(stderr=True)
    eval_config, synth, model_name, checkpoint, out_dir = _settings(args)
    device = _resolve_device(args.device)
    model, preprocess, tokenizer = load_model(model_name, checkpoint=checkpoint, device=device,
                                              trust_pickle=args.trust_pickle)
    weights = str(find_model_weights(checkpoint)) if checkpoint else ""
    console.print(f"[bold]evaluating[/] {model_name}{' with ' + weights if weights else ' (random init)'} "
                  f"on {device} -> {out_dir}", soft_wrap=True)

    with ProgressView(console, not args.no_progress) as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = []
        for spec in args.dataset or ["synth"]:
            datasets += load_eval_datasets(
                spec, classnames_file=args.classnames, num_eval=eval_config.num_eval, image_size=synth.image_size,
                seed=synth.seed, omit_fraction=synth.omit_fraction, progress=progress,
            )
        summary = run_suite(model, preprocess, tokenizer, eval_config, datasets, out_dir,
                            model_name=safe_name(model_name), pretrained=weights, device=device,
                            workers=args.workers, amp=args.amp, strict=args.tasks is not None, progress=progress)
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


def results_table(summary: dict):
    from rich.table import Table

    from clipforge.eval.report import HEADLINE_METRICS, METRIC_LABELS

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
                cells.append(f"{name.split('@')[1]} {100 * value:.1f}±{100 * (ci or 0):.1f}")
            elif name == "C" or not isinstance(value, float) or abs(value) > 1:
                cells.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
            elif "effective_robustness" in name:
                cells.append(f"{label} {100 * value:+.1f}pp")
            else:
                cells.append(f"{label} {100 * value:.1f}")
        table.add_row(record["dataset"], task, "  ".join(cells))
    return table
