"""`clipforge export [RUN|CHECKPOINT] OUT --format transformers|open_clip|diffusers [--model NAME]`: write a CLIP
model in transformers' or open_clip's own layout (clipforge.models.hf.export), or a diffusion-family run as a
Stable-Diffusion-layout diffusers folder (clipforge.models.diffusers_export), then say how to load it."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  clipforge export runs/clip_synth_tiny exports/tiny-hf --format transformers
  clipforge export runs/clip_synth_tiny/checkpoints/step_00000320 exports/tiny-oc --format open_clip
  clipforge export open_clip_model.safetensors exports/b32-hf --format transformers --model ViT-B-32-quickgelu
  clipforge export exports/tiny-oc2 --format open_clip --model path/to/transformers-clip-folder
  clipforge export runs/reproduce_genie/diffusion exports/synth-ldm --format diffusers

then, with nothing of clipforge installed:
  transformers: CLIPModel.from_pretrained(OUT), CLIPProcessor.from_pretrained(OUT), CLIPTokenizer, CLIPTextModel,
                CLIPTextModelWithProjection, CLIPVisionModelWithProjection (e.g. as a diffusers text encoder)
  open_clip:    open_clip.create_model_and_transforms("local-dir:OUT"), open_clip.get_tokenizer("local-dir:OUT")
  diffusers:    StableDiffusionImg2ImgPipeline.from_pretrained(OUT), clipforge augment genie --model OUT

transformers' CLIPModel holds ViT CLIPs with open_clip's standard text tower; a part it cannot hold (a SigLIP
logit_bias, an attentional pooler, a timm or ResNet tower, layer scale, a non-BPE tokenizer, ...) is refused with
one line, never dropped. The exported tokenizer pads with <|endoftext|> (open_clip pads with 0) and does not run
ftfy; see the README section "Hugging Face transformers"."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a CLIP checkpoint as a transformers or open_clip folder, or a diffusion run as a diffusers one",
        description="Export a trained CLIP (a run folder's latest checkpoint, a checkpoint folder, or a weight "
                    "file with --model naming its architecture) as a transformers CLIPModel folder (config.json, "
                    "model.safetensors, CLIPTokenizer and CLIPImageProcessor files, the temperature carried over) "
                    "or as a plain open_clip folder (open_clip_model.safetensors + open_clip_config.json). With "
                    "--model and no checkpoint, a transformers CLIP folder is converted to open_clip's format. "
                    "A diffusion-family run (model.family diffusion) exports as a Stable-Diffusion-layout diffusers "
                    "folder (--format diffusers).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("source", nargs="?", default=None, metavar="RUN|CHECKPOINT",
                        help="a run folder (its latest checkpoint), a checkpoint folder or a weight file")
    parser.add_argument("out", metavar="OUT", help="the folder to write (must be empty or new)")
    parser.add_argument("--format", required=True, choices=["transformers", "open_clip", "diffusers"],
                        help="transformers: a CLIPModel folder; open_clip: open_clip's local-dir:/hf-hub layout; "
                             "diffusers: a diffusion run as a Stable Diffusion pipeline folder")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the architecture of a bare weight file (an open_clip name or model-config file), or "
                             "a transformers CLIP folder to convert when no checkpoint is given")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow reading pickled (.pt/.bin) weights, which can run code")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console

    from clipforge.models.hf import export_open_clip, export_transformers

    console = Console(stderr=True)
    if args.format == "diffusers":
        from clipforge.errors import ConfigError
        from clipforge.models.diffusers_export import export_diffusers

        if args.source is None or args.model is not None:
            raise ConfigError("--format diffusers exports a diffusion run folder or checkpoint (no --model)")
        out = export_diffusers(args.source, args.out, overwrite=args.overwrite)
        files = sorted(p.name for p in out.iterdir())
        console.print(f"[bold]exported[/] {args.source} -> {out} (diffusers: {', '.join(files)})", soft_wrap=True)
        console.print(f"load:  diffusers.StableDiffusionImg2ImgPipeline.from_pretrained('{out}'), "
                      f"clipforge augment genie --model {out}", soft_wrap=True)
        return 0
    export = export_transformers if args.format == "transformers" else export_open_clip
    result = export(args.source, args.out, model_name=args.model, trust_pickle=args.trust_pickle,
                    overwrite=args.overwrite)
    console.print(f"[bold]exported[/] {result.name} ({result.parameters / 1e6:.1f}M parameters) from "
                  f"{args.source or args.model} -> {result.out_dir} ({result.format})", soft_wrap=True)
    console.print(f"files: {', '.join(result.files)}", soft_wrap=True)
    if result.format == "transformers":
        console.print(f"load:  transformers.CLIPModel.from_pretrained('{result.out_dir}'), "
                      f"CLIPProcessor.from_pretrained('{result.out_dir}')", soft_wrap=True)
    else:
        console.print(f"load:  open_clip.create_model_and_transforms('local-dir:{result.out_dir}')", soft_wrap=True)
    return 0
