"""`clipforge tokenize encode|decode`: images -> code shards with a trained image tokenizer, and back to PNGs.

The library does the work (clipforge.models.tokenize); this module parses, draws the progress bar and prints
the summary."""

from __future__ import annotations

import argparse

ENCODE_HELP = """\
Encode images into code grids with a trained image tokenizer (a `vq`-family run: `clipforge train
configs/lgvq_synth_tiny.yaml`), written as webdataset shards (codes-000000.tar: key.npy holds the [h, w] code
grid, key.json the source key, caption and label when the image had them, and the tokenizer's identity; the
manifest holds the tokenizer's fingerprint: its model.json and the sha256 of its weights).

SOURCE is a shard folder, glob or brace pattern, an ImageFolder root (one folder per class), a .csv
(filepath,caption), a folder of image files, or image files. Images of another size are resized by the
tokenizer's preprocess; corrupt or unreadable images are skipped and counted by kind. Running it again with the
same tokenizer and source leaves a complete output folder as it is.

examples:
  clipforge tokenize encode --model runs/lgvq_synth_tiny --source data/synth_train --out data/synth_codes
  clipforge tokenize encode --model runs/vq_tiny --source photos/ --out codes/photos --batch-size 128
  clipforge tokenize encode --model runs/vq_tiny --source a.png b.jpg c.png --out codes/three
"""

DECODE_HELP = """\
Decode the code shards that `clipforge tokenize encode` wrote back into images (one PNG per record, named by
its key) with the same tokenizer. Codes made by a different tokenizer (other weights or another config) are
refused with one line naming both tokenizers.

examples:
  clipforge tokenize decode --model runs/lgvq_synth_tiny --codes data/synth_codes --out decoded/synth
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tokenize", help="encode images to code shards with an image tokenizer, decode back",
                                   description="Encode images to code shards with a trained image tokenizer (vq "
                                               "family), and decode code shards back to images.")
    commands = parser.add_subparsers(dest="tokenize_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    encode = commands.add_parser("encode", help="images -> code shards", description=ENCODE_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    encode.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="the tokenizer: a vq run folder (its latest checkpoint) or a checkpoint folder")
    encode.add_argument("--source", required=True, nargs="+", metavar="SOURCE",
                        help="a shard folder/glob/pattern, an ImageFolder root, a .csv, a folder of images, or "
                             "image files")
    encode.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the code shards")
    encode.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward (default 64)")
    encode.add_argument("--shard-size", type=int, default=1000, metavar="K", help="records per shard (default 1000)")
    _common(encode)
    encode.set_defaults(handler=run_encode)

    decode = commands.add_parser("decode", help="code shards -> PNG images", description=DECODE_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    decode.add_argument("--model", required=True, metavar="RUN_DIR", help="the tokenizer that made the codes")
    decode.add_argument("--codes", required=True, metavar="CODES_DIR", help="a folder 'tokenize encode' wrote")
    decode.add_argument("--out", required=True, metavar="IMAGES_DIR", help="folder for the PNGs")
    decode.add_argument("--batch-size", type=int, default=64, metavar="B", help="grids per forward (default 64)")
    _common(decode)
    decode.set_defaults(handler=run_decode)


def _common(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _ProgressBar:
    """A rich bar with images/s; `update(done, skipped)` is the library's progress callback."""

    def __init__(self, console, description: str, total: int | None, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[skipped]}"),
                                 TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
        self.task = self.progress.add_task(description, total=total, rate="", skipped="")

    def update(self, done: int, skipped: int) -> None:
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, completed=done, rate=f"{speed:.1f} images/s" if speed else "",
                             skipped=f"{skipped} skipped" if skipped else "")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in skipped.items()) or "none"


def run_encode(args) -> int:
    from rich.console import Console

    from clipforge.cli.eval import _resolve_device
    from clipforge.models.tokenize import encode_images, load_image_tokenizer, open_image_source

    console = Console(stderr=True)
    tokenizer = load_image_tokenizer(args.model, device=_resolve_device(args.device))
    total = open_image_source(args.source).total
    with _ProgressBar(console, f"encode with {tokenizer.fingerprint['name']}", total, not args.no_progress) as bar:
        report = encode_images(tokenizer, args.source, args.out, batch_size=args.batch_size,
                               shard_size=args.shard_size, progress=bar.update)
        if not report.written:
            bar.update(total, 0)
    if not report.written:
        console.print(f"up to date: {report.images} code grids in {report.shards} shard(s) under {report.out_dir} "
                      f"(made by this tokenizer from this source)", soft_wrap=True)
        return 0
    rate = report.images / report.seconds if report.seconds else float("nan")
    console.print(f"wrote {report.images} code grids in {report.shards} shard(s) under {report.out_dir} "
                  f"({rate:.1f} images/s); skipped or repaired: {_counts(report.skipped)}", soft_wrap=True)
    return 0


def run_decode(args) -> int:
    from rich.console import Console

    from clipforge.cli.eval import _resolve_device
    from clipforge.data.shards import read_manifest
    from clipforge.models.tokenize import decode_code_shards, load_image_tokenizer

    console = Console(stderr=True)
    tokenizer = load_image_tokenizer(args.model, device=_resolve_device(args.device))
    total = (read_manifest(args.codes) or {}).get("num_samples")
    with _ProgressBar(console, f"decode with {tokenizer.fingerprint['name']}", total, not args.no_progress) as bar:
        report = decode_code_shards(tokenizer, args.codes, args.out, batch_size=args.batch_size,
                                    progress=bar.update)
    rate = report.images / report.seconds if report.seconds else float("nan")
    console.print(f"wrote {report.images} PNGs under {report.out_dir} ({rate:.1f} images/s); skipped: "
                  f"{_counts(report.skipped)}", soft_wrap=True)
    return 0
