"""`clipforge` command line: a thin layer that parses, loads the config and calls the library.

Each subcommand lives in its own module exposing `add_parser(subparsers)`; the handler it registers
returns an exit status. Errors users can cause (`ClipforgeError`) are printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from clipforge import __version__
from clipforge.errors import ClipforgeError

# subcommand modules, in the order `--help` lists them
SUBCOMMANDS = ["data", "augment", "train", "eval", "export", "report", "demo", "reproduce", "tokenize"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="Train, augment and evaluate language-supervised vision models (CLIP, FineCLIP, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'clipforge COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"clipforge.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"clipforge.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except ClipforgeError as err:
        print(f"clipforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
