"""`clipforge train CONFIG [key=value ...] [--resume latest|PATH] [--overwrite]`: train, show progress, summarise.

The library reports events; this module renders them (a rich progress bar with loss, samples/s and ETA on
the main process, and a summary table at the end). Under torchrun only rank 0 draws. With `eval.at_end`, the
configured evaluation tasks run on the run's evaluation data when training ends (clipforge.eval.evaluate_run,
the same code as `clipforge eval RUN`), and the run folder gets its report.html.
"""

from __future__ import annotations

import argparse

from clipforge.config import load_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (CLIP, SigLIP, FineCLIP, ...) from an experiment config",
        description="Train from an experiment YAML. Any config key can be overridden as key=value "
                    "(e.g. train.lr=1e-3 data.batch_size=64), written before the --options. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m clipforge train CONFIG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  clipforge train configs/clip_synth_tiny.yaml\n"
               "  clipforge train configs/clip_synth_tiny.yaml train.epochs=2 output_dir=runs/quick\n"
               "  clipforge train configs/clip_synth_tiny.yaml --resume latest",
    )
    parser.add_argument("config", help="experiment YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", metavar="latest|PATH", default=None,
                        help="continue the run's latest checkpoint, or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output folder that already holds a run (its records and "
                             "checkpoints are deleted; generated SynthScenes data is kept)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    parser.set_defaults(handler=run)


class ProgressView:
    """Renders TrainEvents: a progress bar while training, a table at the end."""

    def __init__(self, show_bar: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.show_bar = show_bar
        self.progress = None
        self.task = None
        self.enabled = True

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def on_start(self, event) -> None:
        from clipforge.distributed import world_info

        if not world_info().is_main:
            self.enabled = False
            return
        data = event.data
        resumed = f", resumed from {data['resumed_from']}" if data.get("resumed_from") else ""
        for key, (old, new) in (data.get("config_changes") or {}).items():
            self.console.print(f"[yellow]resume:[/] {key} changed from {old!r} to {new!r}", soft_wrap=True)
        self.console.print(f"[bold]training[/] {event.total_steps} steps ({data['steps_per_epoch']}/epoch, "
                           f"global batch {data['global_batch']}) on {data['device']} x{data['world_size']}"
                           f" -> {data['run_dir']}{resumed}", soft_wrap=True)
        scan = data.get("data_scan")
        if scan and scan["usable"] < scan["listed"]:
            kinds = ", ".join(f"{kind} {n}" for kind, n in scan["skipped"].items())
            self.console.print(f"data: {scan['usable']} of {scan['listed']} samples usable, each read once per "
                               f"epoch (skipped: {kinds})", soft_wrap=True)
        if self.show_bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.total_steps, completed=event.step,
                                               epoch=event.epoch, loss="-", speed="-")

    def on_step(self, event) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=event.step, epoch=event.epoch)

    def on_log(self, event) -> None:
        record = event.data
        if self.progress is not None:
            self.progress.update(self.task, loss=f"{record['loss']:.4f}", speed=f"{record['samples_per_s']:.0f}")
        else:
            extras = "".join(f"  {k} {v:.3g}" for k, v in record.items() if k in LOG_LINE_METRICS)
            self.console.print(f"step {event.step}/{event.total_steps}  epoch {event.epoch}  "
                               f"loss {record['loss']:.4f}  lr {record['lr']:.2e}{extras}  "
                               f"{record['samples_per_s']:.0f} samples/s")

    def on_skip(self, event) -> None:
        self.console.print(f"[yellow]skipped[/] a non-finite loss at {event.data['where']}")

    def on_end(self, event) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.console.print(summary_table(event.data))


LOG_LINE_METRICS = ("logit_scale", "logit_bias", "accuracy")  # shown on --no-progress log lines when recorded


def summary_table(summary: dict):
    from rich.table import Table

    table = Table(title=f"run {summary['name']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [
        ("steps", f"{summary['steps']} ({summary['epochs']} epochs, {summary['samples_seen']} samples)"),
        ("train time", f"{summary['train_time_s']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:.0f} samples/s"),
        ("final loss", number(summary["final_loss"], ".4f")),
        ("best loss (at a checkpoint)", number(summary["best_loss"], ".4f")),
    ]
    for name, value in (summary.get("final_metrics") or {}).items():
        if not name.startswith(("lr", "loss/")) and name != "samples_per_s" and isinstance(value, int | float):
            rows.append((name, f"{value:.4g}"))
    rows.append(("skipped steps / samples", f"{summary['skipped_steps']} / {sum(summary['skipped_samples'].values())}"))
    converted = summary.get("converted_samples") or {}
    if converted:
        rows.append(("repaired and kept samples", ", ".join(f"{k} {v}" for k, v in converted.items())))
    rows.append(("checkpoint", str(summary["checkpoint"])))
    for what, value in rows:
        table.add_row(what, value)
    return table


def run(args) -> int:
    config = load_config(args.config, args.overrides)  # config errors answer before the engine's imports

    from clipforge.engine.loop import train

    view = ProgressView(show_bar=config.train.progress and not args.no_progress)
    try:
        result = train(config, resume=args.resume, on_event=view, overwrite=args.overwrite)
    finally:
        if view.progress is not None:
            view.progress.stop()
    if config.eval.at_end and view.enabled:  # rank 0 only (the others disabled their view)
        evaluate_at_end(result.run_dir, config, view.console, show_progress=view.show_bar)
    return 0


def evaluate_at_end(run_dir, config, console, show_progress: bool) -> None:
    """eval.at_end: the run's configured tasks on its evaluation data, results table and report."""
    import warnings

    from clipforge.cli.eval import ProgressView as EvalProgress
    from clipforge.cli.eval import results_table
    from clipforge.engine.precision import resolve_device
    from clipforge.eval.report import write_report
    from clipforge.eval.suite import evaluate_run

    console.rule(f"[bold]evaluation at the end of training[/] ({', '.join(config.eval.tasks)})")
    with EvalProgress(console, show_progress) as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = evaluate_run(run_dir, device=resolve_device(config.train.device, 0), progress=progress)
    for message in dict.fromkeys(str(w.message) for w in caught):
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    console.print(results_table(summary))
    for item in summary["skipped"]:
        console.print(f"[dim]not run: {item['task']} on {item['dataset']} ({item['reason']})[/]", soft_wrap=True)
    console.print(f"report:  {write_report(run_dir)}")
