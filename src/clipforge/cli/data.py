"""`clipforge data`: generate SynthScenes shards, inspect any dataset, and convert interleaved documents."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.errors import DataError

SYNTH_HELP = """\
Generate SynthScenes (procedural scenes of coloured shapes with captions, boxes, region captions and class
labels) as webdataset shards in the img2dataset layout: key.png, key.txt, key.json, plus manifest.json and
sizes.json. The same seed gives byte-identical shards; re-running with the same settings is a no-op.

examples:
  clipforge data synth --out data/synth_train --num 4096
  clipforge data synth --out data/synth_novel --num 1000 --split novel
  clipforge data synth --out data/synth_outline --num 1000 --split val --variant outline
  clipforge data synth --out data/synth_docs --num 500 --documents
"""

INSPECT_HELP = """\
Read a dataset exactly as training reads it (every sample decoded and validated), print sample counts,
bad-input counts by kind, a class histogram and caption examples, and write a contact-sheet PNG of samples
with their boxes and region captions drawn.

DATA can be a shard folder, a glob or brace pattern (data/shard-{000000..000009}.tar), a .csv file
(filepath,caption) or an ImageFolder root (one folder per class).

examples:
  clipforge data inspect data/synth_train
  clipforge data inspect 'data/shard-{000000..000003}.tar' --out sheet.png --limit 2000
"""


DOCUMENTS_HELP = """\
Convert interleaved image-text documents, one JSON object per line, with their images in a local folder, into
document shards (key.<i>.<ext> + key.json with an ordered "items" list) that LCL trains on. Accepted layouts:
OBELICS (parallel "texts" and "images" lists), MMC4 ("text_list" and "image_info" with image_name and
matched_text_index; each image goes right before or after its matched sentence, even odds, seeded) and
clipforge's own ("items" with image file names). Images are looked up in DIR by file name (the last part of a
URL); missing or unreadable images are dropped and counted, documents left without an image or text skipped.

examples:
  clipforge data documents --jsonl mmc4_shard_0.jsonl --images mmc4_images/ --out data/mmc4_docs \\
      --min-similarity 0.24
  clipforge data documents --jsonl obelics.jsonl --images obelics_images/ --out data/obelics_docs
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="generate SynthScenes shards and inspect datasets",
                                   description="Generate SynthScenes shards and inspect datasets.")
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    synth = commands.add_parser("synth", help="write SynthScenes webdataset shards", description=SYNTH_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    synth.add_argument("--num", required=True, type=int, metavar="N", help="number of samples (or documents)")
    synth.add_argument("--shard-size", type=int, default=1024, metavar="K", help="samples per shard (default 1024)")
    synth.add_argument("--variant", default="original", metavar="NAME",
                       help="rendering: original, background, outline, noise, blur, scale (default original)")
    synth.add_argument("--split", default="train", choices=["train", "val", "novel", "all"],
                       help="class split: train/val use base classes only, novel the held-out colour x shape "
                            "combinations, all any class (default train)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="generator seed (default 0)")
    synth.add_argument("--image-size", type=int, default=64, metavar="PX", help="image side in pixels (default 64)")
    synth.add_argument("--omit-fraction", type=float, default=0.3, metavar="F",
                       help="chance a secondary object is left out of the global caption (default 0.3)")
    synth.add_argument("--long-tail", type=float, default=0.0, metavar="A",
                       help="Zipf exponent of class frequencies; 0 = balanced (default 0)")
    synth.add_argument("--documents", action="store_true",
                       help="write interleaved image-text documents (key.0.png, key.1.png, key.json) instead")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(handler=run_synth)

    inspect = commands.add_parser("inspect", help="counts, class histogram, captions and a contact sheet",
                                  description=INSPECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("data", metavar="DATA", help="shard folder, glob, brace pattern, .csv or ImageFolder root")
    inspect.add_argument("--out", metavar="PNG", default=None,
                         help="contact sheet path (default DATA/contact_sheet.png, or beside a file pattern)")
    inspect.add_argument("--format", default="auto", choices=["auto", "wds", "csv", "imagefolder"],
                         help="how to read DATA (default auto: by extension / folder contents)")
    inspect.add_argument("--limit", type=int, default=None, metavar="N", help="read at most N samples")
    inspect.add_argument("--examples", type=int, default=8, metavar="K", help="caption examples to print (default 8)")
    inspect.add_argument("--sheet", type=int, default=16, metavar="K", help="samples on the contact sheet (default 16)")
    inspect.add_argument("--classes", type=int, default=20, metavar="K", help="histogram rows to print (default 20)")
    inspect.set_defaults(handler=run_inspect)

    documents = commands.add_parser("documents", help="convert an MMC4/OBELICS-style jsonl into document shards",
                                    description=DOCUMENTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    documents.add_argument("--jsonl", required=True, metavar="FILE", help="one document per line")
    documents.add_argument("--images", required=True, metavar="DIR", help="folder holding the documents' images")
    documents.add_argument("--out", required=True, metavar="SHARDS", help="output folder for the shards")
    documents.add_argument("--shard-size", type=int, default=1000, metavar="K",
                           help="documents per shard (default 1000)")
    documents.add_argument("--min-similarity", type=float, default=None, metavar="S",
                           help="MMC4: drop images whose matched_sim is below S (LCL used 0.24; default keep all)")
    documents.add_argument("--seed", type=int, default=0, metavar="S",
                           help="MMC4: seed of the before/after placement of images (default 0)")
    documents.add_argument("--strict", action="store_true", help="stop at the first bad document or image")
    documents.add_argument("--no-progress", action="store_true", help="no progress bar")
    documents.set_defaults(handler=run_documents)


def run_synth(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from clipforge.data.generate import generate_synth_shards
    from clipforge.data.synth import VARIANTS

    if args.num < 1:
        raise DataError(f"--num must be >= 1, got {args.num}")
    if args.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.variant not in VARIANTS:
        raise DataError(f"--variant must be one of {', '.join(VARIANTS)}, got '{args.variant}'")
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=False) as progress:
        task = progress.add_task(f"SynthScenes {args.split}/{args.variant}", total=args.num)
        manifest, generated = generate_synth_shards(
            args.out, num=args.num, split=args.split, variant=args.variant, seed=args.seed,
            image_size=args.image_size, shard_size=args.shard_size, omit_fraction=args.omit_fraction,
            long_tail=args.long_tail, documents=args.documents,
            progress=lambda done: progress.update(task, completed=done),
        )
        progress.update(task, completed=args.num)
    what = "documents" if args.documents else "samples"
    state = "wrote" if generated else "up to date:"
    console.print(f"{state} {manifest.num_samples} {what} in {len(manifest.shards)} shard(s) under {args.out}")
    return 0


def _sheet_path(args) -> Path:
    if args.out:
        return Path(args.out)
    data = Path(args.data)
    if data.is_dir():
        return data / "contact_sheet.png"
    return Path(args.data.split("::")[0]).parent / "contact_sheet.png"


def run_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from clipforge.data.inspect import contact_sheet, inspect_data

    console = Console()
    report = inspect_data(args.data, args.format, limit=args.limit, num_examples=args.examples,
                          num_sheet=args.sheet)
    summary = Table(title=f"{args.data} ({report.kind})", show_header=False)
    summary.add_row("samples listed", str(report.num_listed))
    summary.add_row("samples read", str(report.num_read))
    summary.add_row("valid samples", str(report.num_valid))
    if report.num_documents:
        summary.add_row("documents", str(report.num_documents))
    summary.add_row("regions", str(report.num_regions))
    summary.add_row("image sizes", ", ".join(f"{k} ({v})" for k, v in list(report.image_sizes.items())[:4]))
    console.print(summary)

    skipped = Table(title="bad input (skipped or repaired)")
    skipped.add_column("kind")
    skipped.add_column("count", justify="right")
    for kind, count in report.skipped.items():
        skipped.add_row(kind, str(count))
    if not report.skipped:
        skipped.add_row("none", "0")
    console.print(skipped)

    if report.classes:
        histogram = Table(title=f"classes ({len(report.classes)})")
        histogram.add_column("class")
        histogram.add_column("count", justify="right")
        histogram.add_column("")
        top = max(report.classes.values())
        for name, count in list(report.classes.items())[: args.classes]:
            histogram.add_row(name, str(count), "#" * max(1, round(30 * count / top)))
        if len(report.classes) > args.classes:
            histogram.add_row(f"... {len(report.classes) - args.classes} more", "", "")
        console.print(histogram)

    examples = Table(title="caption examples")
    examples.add_column("key")
    examples.add_column("caption")
    for key, caption in report.examples:
        examples.add_row(key, caption)
    console.print(examples)

    if report.samples:
        path = contact_sheet(report.samples, _sheet_path(args))
        console.print(f"contact sheet: {path}")
    else:
        console.print("no valid sample: no contact sheet written")
    return 0


def run_documents(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from clipforge.data.documents import convert_jsonl_documents

    jsonl = Path(args.jsonl)
    if not jsonl.is_file():
        raise DataError(f"jsonl file '{jsonl}' does not exist")
    with jsonl.open("rb") as lines:
        total = sum(1 for _ in lines)
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=False) as progress:
        task = progress.add_task(f"documents from {jsonl.name}", total=total)
        report = convert_jsonl_documents(
            jsonl, args.images, args.out, shard_size=args.shard_size, min_similarity=args.min_similarity,
            seed=args.seed, strict=args.strict, progress=lambda done: progress.update(task, completed=done),
        )
    skipped = ", ".join(f"{kind} {n}" for kind, n in report.skipped.items()) or "none"
    console.print(f"wrote {report.documents} documents ({report.images} images) in {len(report.shards)} shard(s) "
                  f"under {args.out} from {report.lines} lines; skipped: {skipped}")
    return 0
