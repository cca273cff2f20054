"""`clipforge report RUN_DIR [--output FILE]`: write the run's self-contained HTML report."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run (metrics, curves, examples)",
        description="Write RUN_DIR/report.html: evaluation metrics (eval/*.json), training curves "
                    "(metrics.jsonl), zero-shot confusion matrices, retrieval examples, few-shot accuracy vs "
                    "shots, the linear probe's C sweep and robustness per shift. Images are inline; the page "
                    "works offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  clipforge report runs/clip_synth_tiny\n"
               "  clipforge report runs/eval-clipforge-vit-tiny --output /tmp/report.html",
    )
    parser.add_argument("run_dir", help="a run folder, or an output folder of 'clipforge eval'")
    parser.add_argument("--output", default=None, help="where to write the page (default RUN_DIR/report.html)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from clipforge.eval.report import write_report

    print(write_report(args.run_dir, args.output))
    return 0
