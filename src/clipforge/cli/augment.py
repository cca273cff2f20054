"""`clipforge augment genie`: GeNIe / GeNIe-Ada hard negatives (and the img2img / txt2img baselines) as shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.errors import ConfigError

GENIE_HELP = """\
Edit every labelled source image towards the prompt of every other class with a text-to-image diffusion model
(GeNIe, arXiv 2312.02548): the source is noised to ratio r of the schedule and denoised with the target prompt,
so the result keeps the source's layout and background but carries the target class, and is labelled with it.
--adaptive (GeNIe-Ada) sweeps a grid of ratios and keeps, per image, the edit just after the largest jump of a
frozen classifier's embedding towards the target class. --mode img2img (the image's own prompt) and --mode
txt2img (pure noise, r = 1) are the baselines, with the same number of samples per class.

SOURCE: webdataset shards (label / classname in key.json, or key.cls) or an ImageFolder root.
MODEL: a diffusers folder in the Stable Diffusion layout (model_index.json; unet, scheduler, text_encoder,
tokenizer, optional vae: without one the UNet works in pixel space), or a hub id when online.
The output folder is resumable: re-run the same command after a crash and finished shards are kept. Under
torchrun every rank takes its share of the shards.

examples:
  clipforge augment genie --source data/fewshot --model sd-v1-5/ --out data/fewshot_genie --ratio 0.8
  clipforge augment genie --source data/fewshot --model sd-v1-5/ --out data/fewshot_ada --adaptive \\
      --embedder runs/backbone
  clipforge augment genie --source data/fewshot --model sd-v1-5/ --out data/fewshot_img2img --mode img2img \\
      --ratio 0.7
  torchrun --nproc_per_node=8 -m clipforge augment genie --source data/lt --model sd-v1-5/ --out data/lt_genie \\
      --classes classes.txt --targets tail_classes.txt
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("augment", help="augment labelled images with diffusion (GeNIe, GeNIe-Ada)",
                                   description="Augment labelled images with a diffusion model.")
    commands = parser.add_subparsers(dest="augment_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    genie = commands.add_parser("genie", help="GeNIe hard negatives: edit images towards other classes' prompts",
                                description=GENIE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    genie.add_argument("--source", required=True, metavar="SHARDS|IMAGEFOLDER", help="labelled source images")
    genie.add_argument("--model", required=True, metavar="DIFFUSERS_DIR", help="diffusers folder or hub id")
    genie.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    genie.add_argument("--mode", default="genie", choices=["genie", "img2img", "txt2img"],
                       help="genie: towards other classes (default); img2img: own class; txt2img: pure noise")
    ratio = genie.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", type=float, default=None, metavar="R",
                       help="noise ratio in (0, 1]: the share of the schedule re-run (default 0.8; txt2img 1)")
    ratio.add_argument("--adaptive", action="store_true", help="GeNIe-Ada: choose r per image from --grid")
    genie.add_argument("--grid", default="0.5,0.6,0.7,0.8,0.9", metavar="R,R,...",
                       help="GeNIe-Ada's ratios (default 0.5,0.6,0.7,0.8,0.9)")
    genie.add_argument("--embedder", default=None, metavar="RUN_DIR",
                       help="GeNIe-Ada: clipforge run or checkpoint folder whose encode_image embeds the images")
    genie.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                       help="class names in label order, or one file with a name a line (default: the source's)")
    genie.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                       help="only these target classes, or one file with a name a line (default: every class)")
    genie.add_argument("--template", default="a photo of a {}.", metavar="TEXT",
                       help="prompt template with {} for the class name (default 'a photo of a {}.')")
    genie.add_argument("--steps", type=int, default=50, metavar="N", help="scheduler steps for r = 1 (default 50)")
    genie.add_argument("--guidance", type=float, default=7.5, metavar="W", help="classifier-free guidance (7.5)")
    genie.add_argument("--scheduler", default="dpm", choices=["dpm", "ddim", "euler", "unipc"],
                       help="solver (default dpm: DPM-Solver++ order 2)")
    genie.add_argument("--seed", type=int, default=0, metavar="S", help="global seed; each sample derives its own")
    genie.add_argument("--batch-size", type=int, default=8, metavar="B", help="diffusion samples per call (8)")
    genie.add_argument("--shard-size", type=int, default=128, metavar="K", help="samples per shard (default 128)")
    genie.add_argument("--device", default="auto", metavar="DEV", help="cpu, cuda, cuda:1 (default: the rank's GPU)")
    genie.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="weights and activations (default fp16 on GPU, fp32 on CPU)")
    genie.add_argument("--no-progress", action="store_true", help="no progress bar")
    genie.set_defaults(handler=run_genie)


def _names(values: list[str] | None) -> list[str] | None:
    from clipforge.augment.plan import read_class_file

    if values is None:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        return read_class_file(values[0])
    return values


def _grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--grid must be ratios separated by commas, got '{text}'") from None


def _device_and_dtype(args):
    import torch

    from clipforge.distributed import read_env

    device = args.device
    if device == "auto":
        device = f"cuda:{read_env().local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device '{args.device}' is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device '{args.device}': no CUDA device is available")
    precision = args.precision if args.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def run_genie(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from clipforge.augment.genie import augment_genie
    from clipforge.augment.plan import GenieOptions
    from clipforge.distributed import read_env

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} img/s" if task.speed else "-.-- img/s")

    options = GenieOptions(mode=args.mode, ratio=args.ratio, adaptive=args.adaptive, grid=_grid(args.grid),
                           template=args.template, steps=args.steps, guidance=args.guidance,
                           scheduler=args.scheduler, seed=args.seed, shard_size=args.shard_size).resolved()
    device, dtype = _device_and_dtype(args)
    env = read_env()
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=args.no_progress or not env.is_main) as bar:
        task = None

        def progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:  # the first report holds what a resumed run already had: not part of the rate
                task = bar.add_task(f"GeNIe {args.mode}" + (" (Ada)" if args.adaptive else ""),
                                    total=total, completed=done)
            else:
                bar.update(task, completed=done)

        result = augment_genie(args.source, args.model, args.out, classes=_names(args.classes),
                               targets=_names(args.targets), options=options, embedder=args.embedder,
                               device=device, dtype=dtype, batch_size=args.batch_size, rank=env.rank,
                               world_size=env.world_size, progress=progress)
    skipped = ", ".join(f"{kind} {count}" for kind, count in sorted(result.skipped.items()))
    note = f" (skipped: {skipped})" if skipped else ""
    if not result.complete:
        console.print(f"rank {env.rank}: wrote {result.generated} samples under {args.out}; other ranks' shards "
                      f"are still missing{note}")
    elif result.generated == 0 and env.is_main:
        console.print(f"up to date: {result.num_samples} samples under {args.out}{note}")
    elif env.is_main:
        console.print(f"wrote {result.generated} samples; {result.num_samples} in all under {args.out}{note}")
    return 0
