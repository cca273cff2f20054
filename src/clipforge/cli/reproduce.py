"""`clipforge reproduce METHOD`: train a method and its baseline with equal steps and data over several seeds,
evaluate them, and write the table to docs/results.md."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="reproduce a method's claim in miniature (baseline vs method, several seeds, mean +- std)",
        description="Train a method and its baseline on SynthScenes with equal steps and data, over several "
                    "seeds, evaluate both and write the table to docs/results.md.",
    )
    methods = parser.add_subparsers(dest="method", metavar="METHOD")
    fineclip = methods.add_parser(
        "fineclip",
        help="CLIP vs FineCLIP plus one ablation arm per loss term",
        description="Arms: clip, global (FineCLIP's global term only), distill (+ self-distillation), region "
                    "(+ regional contrast), fineclip (all terms). Each arm trains the tiny config of "
                    "configs/ with the same data, steps and optimiser; runs are resumable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  clipforge reproduce fineclip\n"
               "  clipforge reproduce fineclip --seeds 0 --arms clip fineclip --set train.epochs=1\n",
    )
    fineclip.add_argument("--out", default="runs/reproduce_fineclip", help="folder for the runs and results.json")
    fineclip.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    fineclip.add_argument("--arms", nargs="+", default=None, help="subset of arms (default: all)")
    fineclip.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                          help="config overrides applied to every run alike (e.g. train.epochs=2)")
    fineclip.add_argument("--num-eval", type=int, default=500, help="held-out scenes per evaluation split")
    fineclip.add_argument("--configs", default="configs", help="folder with clip_/fineclip_synth_tiny.yaml")
    fineclip.add_argument("--results", default="docs/results.md",
                          help="markdown file whose FineCLIP section is (re)written; '' to skip")
    fineclip.set_defaults(handler=run_fineclip)
    lcl = methods.add_parser(
        "lcl",
        help="LCL vs CLIP on the mined pairs, generation-only, contrastive-only and a w_con sweep",
        description="Arms: lcl (w_con 0.1), clip (CLIP on the pairs mined from the same documents, as many images "
                    "seen), gen_only (w_con 0), con_only (w_gen 0), wcon_0.3, wcon_1. Each trains from scratch on "
                    "the same 2000 SynthScenes documents with the same 32 px ViT; every frozen encoder is then "
                    "evaluated by zero-shot (base, novel), linear probe, attentive probe, LiT retrieval and "
                    "captioning. Training and evaluation resume: finished parts are skipped on a re-run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  clipforge reproduce lcl\n"
               "  clipforge reproduce lcl --seeds 0 --arms lcl clip gen_only\n"
               "  clipforge reproduce lcl --train-only        # train now, evaluate in a later call\n",
    )
    _add_arguments(lcl, "lcl", "LCL", configs="lcl_/lcl_clip_baseline_synth_tiny.yaml",
                   num_eval="held-out scenes per evaluation split (and train split of the probes)")
    lcl.set_defaults(handler=run_lcl)
    lgvq = methods.add_parser(
        "lgvq",
        help="VQ vs LG-VQ, the paper's loss ablation, and FSQ with and without the language terms",
        description="Arms: vq, gsa, mtp, mtp_ras, lgvq (the loss ablation), fsq, fsq_lg. Each trains the tiny "
                    "tokenizer of configs/lgvq_synth_tiny.yaml with the same data, steps and optimiser; a judge "
                    "CLIP (configs/lgvq_judge_clip_synth_tiny.yaml) is trained once as the Fréchet feature "
                    "extractor. Every tokenizer is evaluated by reconstruction, codebook usage and semantic probes "
                    "read from its frozen codes. Training and evaluation resume: finished parts are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  clipforge reproduce lgvq\n"
               "  clipforge reproduce lgvq --seeds 0 --arms vq lgvq\n"
               "  clipforge reproduce lgvq --train-only       # train now, evaluate in a later call\n",
    )
    _add_arguments(lgvq, "lgvq", "LG-VQ", configs="lgvq_synth_tiny.yaml and the judge's config",
                   num_eval="held-out scenes (and probe training scenes)")
    lgvq.set_defaults(handler=run_lgvq)
    genie = methods.add_parser(
        "genie",
        help="GeNIe and GeNIe-Ada vs no augmentation, MixUp, CutMix, Img2Img and Txt2Img: few-shot and long tail",
        description="Trains once (cached) a CLIP on the base classes (the frozen few-shot backbone and the text "
                    "tower) and the embedded latent diffusion model (configs/genie_autoencoder_synth.yaml, "
                    "configs/genie_diffusion_synth.yaml), exported as a diffusers folder. Per seed it renders real "
                    "32 px images of the 16 novel classes, makes every edit with `clipforge augment genie` "
                    "(resumable folders keyed by source, target, r and seed), and scores each arm: 5-way 1-/5-shot "
                    "episodes (16 queries, support and query disjoint, logistic regression C=1 on frozen features, "
                    "mean and 95%% CI), the long tail (Zipf 40..1, many/medium/few) and the label check (the "
                    "semantic-flip curve). Arms: none, mixup, cutmix, img2img_0.3, img2img_0.7, txt2img, genie "
                    "(r=0.8), genie_ada. Finished parts are skipped on a re-run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  clipforge reproduce genie\n"
               "  clipforge reproduce genie --seeds 0 --episodes 20 --arms none genie genie_ada\n"
               "  clipforge reproduce genie --train-only          # train the models now, the protocols later\n",
    )
    genie.add_argument("--out", default="runs/reproduce_genie", help="folder for the models, edits and results")
    genie.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    genie.add_argument("--arms", nargs="+", default=None, help="subset of arms (default: all)")
    genie.add_argument("--episodes", type=int, default=100, help="few-shot episodes per seed and shot count")
    genie.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K of the K-shot episodes")
    genie.add_argument("--steps", type=int, default=20, help="denoising steps at r = 1 (DPM-Solver++)")
    genie.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of every edit")
    genie.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                       help="overrides of the diffusion model's training config (e.g. train.max_steps=2000)")
    genie.add_argument("--configs", default="configs", help="folder with the clip_/genie_*_synth.yaml configs")
    genie.add_argument("--train-only", action="store_true", help="train and export the models, evaluate nothing")
    genie.add_argument("--results", default="docs/results.md",
                       help="markdown file whose GeNIe section is (re)written; '' to skip")
    genie.set_defaults(handler=run_genie)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def _add_arguments(parser, method: str, label: str, configs: str, num_eval: str) -> None:
    """The options every `reproduce METHOD` built on reproduce/common.py takes."""
    parser.add_argument("--out", default=f"runs/reproduce_{method}", help="folder for the data, runs and results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help="subset of arms (default: all)")
    parser.add_argument("--arm-seeds", nargs="+", default=None, metavar="ARM=S[,S]",
                        help="arms that run other seeds than --seeds (e.g. an ablation arm on seed 0 only: gsa=0)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides applied to every arm's run alike")
    parser.add_argument("--num-eval", type=int, default=500, help=num_eval)
    parser.add_argument("--configs", default="configs", help=f"folder with {configs}")
    parser.add_argument("--train-only", action="store_true", help="train the runs, evaluate nothing")
    parser.add_argument("--results", default="docs/results.md",
                        help=f"markdown file whose {label} section is (re)written; '' to skip")


def _progress():
    from rich.console import Console

    console = Console(stderr=True)
    started = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[{time.perf_counter() - started:7.0f} s] {message}")

    return console, progress


def _command(method: str) -> str:
    import shlex
    import sys

    return f"clipforge reproduce {method} " + shlex.join(sys.argv[3:]) if len(sys.argv) > 3 else \
        f"clipforge reproduce {method}"


def run_fineclip(args) -> int:
    from pathlib import Path

    from clipforge.reproduce.fineclip import reproduce_fineclip, write_results_section

    console, progress = _progress()
    payload = reproduce_fineclip(args.out, seeds=args.seeds, arms=args.arms, overrides=args.overrides,
                                 num_eval=args.num_eval, config_dir=args.configs, progress=progress)
    print(payload["table"])
    if args.results:
        section = (f"### FineCLIP vs CLIP on SynthScenes\n\nProduced by `{_command('fineclip')}` "
                   f"(seeds {', '.join(map(str, args.seeds))}; per-run numbers in {args.out}/results.json).\n\n"
                   f"{payload['table']}\n")
        write_results_section(Path(args.results), section)
        console.print(f"table written to {args.results}")
    return 0


def _run_method(args, method: str, title: str, sizes, training_note: str) -> int:
    """Run `clipforge reproduce METHOD` (lcl, lgvq: reproduce/<method>.py) and write its results section: the
    title, the command, `sizes(payload)` (what ran), the table, and the end-of-training table."""
    import importlib
    from pathlib import Path

    from clipforge.reproduce.common import parse_arm_seeds

    module = importlib.import_module(f"clipforge.reproduce.{method}")
    console, progress = _progress()
    payload = getattr(module, f"reproduce_{method}")(
        args.out, seeds=args.seeds, arms=args.arms, overrides=args.overrides, num_eval=args.num_eval,
        config_dir=args.configs, train_only=args.train_only, arm_seeds=parse_arm_seeds(args.arm_seeds, module.ARMS),
        progress=progress)
    if args.train_only:
        console.print("trained; run again without --train-only to evaluate")
        return 0
    print(payload["table"])
    if args.results:
        section = (f"### {title}\n\nProduced by `{_command(method)}` (seeds {', '.join(map(str, args.seeds))} "
                   f"unless --arm-seeds says otherwise; {sizes(payload)}per-run numbers in {args.out}/results.json)."
                   f"\n\n{payload['table']}\n\nHow far each term had trained (the runs' metrics.jsonl, mean of the "
                   f"last 3 records; {training_note}):\n\n{payload['training_table']}\n")
        module.write_results_section(Path(args.results), section)
        console.print(f"table written to {args.results}")
    return 0


def _lcl_sizes(payload: dict) -> str:
    budget = payload["budget"]
    return (f"LCL arms {budget['lcl_steps']} steps of {budget['documents_per_step']} documents, "
            f"{budget['images_seen']:.0f} images seen; CLIP {budget['clip_steps']} steps of {budget['clip_batch']} "
            f"pairs; the describing sentence comes after its image for "
            f"{100 * budget['sentence_after_image']:.1f}% of the documents' images; ")


def run_lcl(args) -> int:
    return _run_method(args, "lcl", "LCL vs CLIP on SynthScenes documents", _lcl_sizes, "in-batch accuracy in %")


def run_lgvq(args) -> int:
    return _run_method(args, "lgvq", "LG-VQ vs VQ on SynthScenes", lambda payload: "", "accuracies in %")


def run_genie(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from clipforge.errors import ConfigError
    from clipforge.reproduce.genie import reproduce_genie, write_results_section
    from clipforge.reproduce.genie_data import Sizes

    if args.episodes < 1 or args.steps < 1 or args.guidance < 0 or any(k < 1 for k in args.shots):
        raise ConfigError("--episodes, --steps and --shots must be >= 1 and --guidance >= 0")
    console, progress = _progress()
    sizes = replace(Sizes(), steps=args.steps, guidance=args.guidance)
    payload = reproduce_genie(args.out, seeds=args.seeds, arms=args.arms, episodes=args.episodes,
                              shots=args.shots, sizes=sizes, overrides=args.overrides, config_dir=args.configs,
                              train_only=args.train_only, progress=progress)
    if args.train_only:
        console.print("trained; run again without --train-only to evaluate")
        return 0
    print(payload["fewshot_table"], payload["longtail_table"], payload["flip_table"], sep="\n\n")
    if args.results:
        from clipforge.reproduce.genie_report import results_section

        write_results_section(Path(args.results), results_section(payload, _command("genie"), args.out))
        console.print(f"tables written to {args.results}")
    return 0
