"""`clipforge demo`: the main job on the embedded SynthScenes data, end to end, in under 10 minutes on a 2-core CPU.

It runs the same commands a user would type, in order: generate and inspect SynthScenes, train a tiny CLIP,
evaluate it, train a tiny FineCLIP with the same model, data and steps, evaluate it (with region
classification), and write one HTML report comparing both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipforge.errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: SynthScenes -> tiny CLIP and FineCLIP -> evaluation -> HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--configs", default="configs", help="folder holding the experiment YAMLs (default configs)")
    parser.add_argument("--skip-fineclip", action="store_true", help="train and evaluate the CLIP model only")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke-sized run (8 steps, small evaluation) to check the set-up quickly")
    parser.set_defaults(handler=run)


# The demo trains both models for the same number of steps, fewer than the full configs (320 steps), so that
# the whole job, two trainings and two evaluations, stays under 10 minutes on a 2-core CPU.
# eval.at_end=false: the demo evaluates in its own step, with the command a user would type
DEMO_SIZE = ["eval.at_end=false", "train.max_steps=100", "train.warmup_steps=20", "eval.num_eval=400", "eval.fewshot_episodes=50",
             "eval.tasks=[zeroshot,retrieval,linear_probe,fewshot,robustness,regions]"]
QUICK_SIZE = ["eval.at_end=false", "train.max_steps=8", "train.warmup_steps=2", "data.synth.num_train=512", "data.synth.num_val=128",
              "data.batch_size=64", "eval.num_eval=200", "eval.fewshot_episodes=10",
              "eval.tasks=[zeroshot,retrieval,linear_probe,fewshot,robustness,regions]"]


def _steps(out: Path, configs: Path, skip_fineclip: bool, quick: bool) -> list[tuple[str, list[str]]]:
    size = QUICK_SIZE if quick else DEMO_SIZE
    steps = [
        ("generate SynthScenes", ["data", "synth", "--out", str(out / "synthscenes"), "--num", "512",
                                  "--shard-size", "256"]),
        ("inspect SynthScenes", ["data", "inspect", str(out / "synthscenes"),
                                 "--out", str(out / "synthscenes" / "contact_sheet.png")]),
        # --overwrite: running the demo again starts its runs over (a run folder is otherwise kept safe)
        ("train CLIP", ["train", str(configs / "clip_synth_tiny.yaml"), f"output_dir={out / 'clip'}", *size,
                        "--overwrite"]),
        ("evaluate CLIP", ["eval", str(out / "clip")]),
    ]
    if not skip_fineclip:
        steps += [
            ("train FineCLIP", ["train", str(configs / "fineclip_synth_tiny.yaml"), f"output_dir={out / 'fineclip'}",
                                *size, "--overwrite"]),
            ("evaluate FineCLIP", ["eval", str(out / "fineclip")]),
        ]
    return steps


def run(args) -> int:
    from rich.console import Console

    from clipforge.cli import main
    from clipforge.eval.comparison import write_comparison_report

    console = Console(stderr=True)
    out, configs = Path(args.out), Path(args.configs)
    if not (configs / "clip_synth_tiny.yaml").is_file():
        raise ConfigError(f"'{configs}/clip_synth_tiny.yaml' not found: run the demo from the repository root "
                          f"or pass --configs DIR")
    started = time.perf_counter()
    steps = _steps(out, configs, args.skip_fineclip, args.quick)
    for number, (title, argv) in enumerate(steps, start=1):
        console.rule(f"[bold]{number}/{len(steps)}  {title}[/]   clipforge {' '.join(argv)}")
        status = main(argv)
        if status != 0:
            console.print(f"[red]demo stopped: step '{title}' exited with status {status}[/]")
            return status
    runs = [out / "clip"] + ([] if args.skip_fineclip else [out / "fineclip"])
    report = write_comparison_report(runs, out / "report.html", data_preview=out / "synthscenes" / "contact_sheet.png")
    console.rule("[bold]done")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    console.print(f"open the report: [bold]{report}[/]")
    return 0
