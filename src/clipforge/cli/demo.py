"""`clipforge demo`: the main job on the embedded SynthScenes data, end to end, in under 15 minutes on a 2-core CPU.

It runs the same commands a user would type, in order: generate and inspect SynthScenes; train a tiny CLIP and
evaluate it; train a tiny FineCLIP with the same model, data and steps and evaluate it (with region
classification); write SynthScenes interleaved documents, train a tiny LCL vision encoder on them and evaluate it
(zero-shot through its <soi> prompt, linear and attentive probes, captioning); train a tiny LG-VQ image tokenizer
and evaluate it (reconstruction, codebook usage, semantic probes from its codes); train a small latent diffusion
model (autoencoder, then a UNet conditioned on the CLIP's text tower), export it as a diffusers folder, run
`clipforge augment genie` with it and evaluate it (GeNIe edits over the noise ratio, judged by the CLIP, and
text-to-image); and write one HTML report with a section per method.
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
    parser.add_argument("--skip-fineclip", action="store_true", help="leave out FineCLIP")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to run (default: all): " + ", ".join(METHODS))
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


METHODS = ("clip", "fineclip", "lcl", "lgvq", "genie")
# LCL: 100 steps of 16 documents (of 600 written, 32 px); LG-VQ: 100 steps of 32 images, discriminator from step 60
LCL_SIZE = ["eval.at_end=false", "train.max_steps=100", "train.warmup_steps=20", "train.save_every_steps=50"]
LGVQ_SIZE = ["eval.at_end=false", "train.max_steps=100", "train.warmup_steps=10", "objective.vq.disc_start=60",
             "data.synth.num_train=1024", "train.save_every_steps=50"]
LCL_TASKS = ["zeroshot", "linear_probe", "attentive_probe", "captioning"]
LGVQ_TASKS = ["reconstruction", "code_semantics"]
# GeNIe: the autoencoder 150 steps, the UNet 300 steps of 32 images (the reproduction trains 1200 / 4000)
GENIE_AE_SIZE = ["train.max_steps=150", "train.warmup_steps=10", "train.save_every_steps=75",
                 "data.synth.num_train=2048"]
GENIE_UNET_SIZE = ["train.max_steps=300", "train.warmup_steps=20", "train.save_every_steps=100",
                   "data.synth.num_train=2048"]
GENIE_TASKS = ["genie_edits", "text_to_image"]
QUICK_METHOD = ["train.max_steps=4", "train.warmup_steps=1", "train.save_every_steps=2"]


def _method_steps(out: Path, configs: Path, methods: list[str], quick: bool) -> list[tuple[str, list[str]]]:
    steps = []
    evaluation = ["--num-eval", "100" if quick else "400"]
    if "lcl" in methods:
        size = [*LCL_SIZE, *(QUICK_METHOD if quick else [])]
        steps += [
            ("write SynthScenes documents", ["data", "synth", "--documents", "--num", "200" if quick else "600",
                                             "--image-size", "32", "--out", str(out / "documents")]),
            ("train LCL", ["train", str(configs / "lcl_synth_tiny.yaml"), f"data.train={out / 'documents'}",
                           f"output_dir={out / 'lcl'}", *size, "--overwrite"]),
            ("evaluate LCL", ["eval", str(out / "lcl"), "--tasks", *LCL_TASKS, *evaluation]),
        ]
    if "lgvq" in methods:
        size = [*LGVQ_SIZE, *(QUICK_METHOD + ["objective.vq.disc_start=2"] if quick else [])]
        steps += [
            ("train LG-VQ", ["train", str(configs / "lgvq_synth_tiny.yaml"), f"output_dir={out / 'lgvq'}", *size,
                             "--overwrite"]),
            ("evaluate LG-VQ", ["eval", str(out / "lgvq"), "--tasks", *LGVQ_TASKS, *evaluation,
                                *(["--set", f"feature_run={out / 'clip'}"] if "clip" in methods else [])]),
        ]
    if "genie" in methods:
        steps += _genie_steps(out, configs, quick, evaluation)
    return steps


def _genie_steps(out: Path, configs: Path, quick: bool, evaluation: list[str]) -> list[tuple[str, list[str]]]:
    quick_size = QUICK_METHOD if quick else []
    diffusers = out / "genie_diffusers"
    return [
        ("train GeNIe's autoencoder", ["train", str(configs / "genie_autoencoder_synth.yaml"),
                                       f"output_dir={out / 'genie_autoencoder'}", *GENIE_AE_SIZE, *quick_size,
                                       "--overwrite"]),
        ("train GeNIe's diffusion model", ["train", str(configs / "genie_diffusion_synth.yaml"),
                                           f"output_dir={out / 'genie'}", f"objective.diffusion.text={out / 'clip'}",
                                           f"objective.diffusion.autoencoder={out / 'genie_autoencoder'}",
                                           *GENIE_UNET_SIZE, *quick_size, "--overwrite"]),
        ("export it as a diffusers folder", ["export", str(out / "genie"), str(diffusers), "--format", "diffusers",
                                             "--overwrite"]),
        ("write 8 source images", ["data", "synth", "--num", "8", "--image-size", "32", "--split", "novel",
                                   "--out", str(out / "genie_source")]),
        ("augment them with GeNIe", ["augment", "genie", "--source", str(out / "genie_source"), "--model",
                                     str(diffusers), "--out", str(out / "genie_augmented"), "--ratio", "0.8",
                                     "--steps", "20", "--guidance", "5", "--targets", "red circle", "blue square"]),
        ("evaluate GeNIe's diffusion model", ["eval", str(out / "genie"), "--tasks", *GENIE_TASKS, *evaluation,
                                              "--set", f"feature_run={out / 'clip'}",
                                              *(["generate_per_class=2", "genie_sources=4"] if quick else [])]),
    ]


def _steps(out: Path, configs: Path, skip_fineclip: bool, quick: bool,
           methods: list[str] | None = None) -> list[tuple[str, list[str]]]:
    methods = list(methods or METHODS)
    if skip_fineclip and "fineclip" in methods:
        methods.remove("fineclip")
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
    if "fineclip" in methods:
        steps += [
            ("train FineCLIP", ["train", str(configs / "fineclip_synth_tiny.yaml"), f"output_dir={out / 'fineclip'}",
                                *size, "--overwrite"]),
            ("evaluate FineCLIP", ["eval", str(out / "fineclip")]),
        ]
    return steps + _method_steps(out, configs, methods, quick)


GENIE_TITLE = "GeNIe: hard negatives from a diffusion model"


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
    methods = [m for m in args.methods if not (args.skip_fineclip and m == "fineclip")]
    steps = _steps(out, configs, args.skip_fineclip, args.quick, methods)
    if "genie" in methods:  # a new model each run: the old edits would be another run's output
        import shutil

        shutil.rmtree(out / "genie_augmented", ignore_errors=True)
    for number, (title, argv) in enumerate(steps, start=1):
        console.rule(f"[bold]{number}/{len(steps)}  {title}[/]   clipforge {' '.join(argv)}")
        status = main(argv)
        if status != 0:
            console.print(f"[red]demo stopped: step '{title}' exited with status {status}[/]")
            return status
    groups = {}
    clip_runs = [out / m for m in ("clip", "fineclip") if m in methods]
    if clip_runs:
        groups["CLIP vs FineCLIP" if len(clip_runs) == 2 else "CLIP"] = clip_runs
    if "lcl" in methods:
        groups["LCL: a vision encoder from interleaved documents"] = [out / "lcl"]
    if "lgvq" in methods:
        groups["LG-VQ: a language-guided image tokenizer"] = [out / "lgvq"]
    if "genie" in methods:
        groups[GENIE_TITLE] = [out / "genie"]
    notes = {GENIE_TITLE: "A 1.7M-parameter latent diffusion model (AutoencoderKL + UNet) trained on SynthScenes "
             "of every class, conditioned on the demo CLIP's frozen text tower, exported as a diffusers folder. "
             "GeNIe edits a source image toward another class's prompt at noise ratio r; the CLIP judges which "
             "class each edit shows. Demo-sized (300 UNet steps); docs/results.md has the reproduction.",
             "LCL: a vision encoder from interleaved documents":
             "Trained from scratch on SynthScenes documents (images among sentences); the language model is thrown "
             "away and the frozen encoder is evaluated: zero-shot through its <soi> prompt, linear and attentive "
             "probes, and captioning from its tokens.",
             "LG-VQ: a language-guided image tokenizer":
             "A VQ tokenizer whose codes are aligned to a frozen MiniLM text prior (L_gsa, L_mtp, L_ras): "
             "reconstruction, codebook usage and semantic probes read from its frozen codes."}
    report = write_comparison_report(groups, out / "report.html", notes=notes,
                                     data_preview=out / "synthscenes" / "contact_sheet.png")
    console.rule("[bold]done")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    console.print(f"open the report: [bold]{report}[/]")
    return 0
