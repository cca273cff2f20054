"""Parity of `clipforge export` with the open_clip model exported: the table in docs/results.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hf_parity.py

Cases (each exported with clipforge.models.hf, read back in a separate process by plain transformers or plain
open_clip with nothing of clipforge imported; tests/helpers/hf_parity.py measures, tests/test_hf_interop.py
asserts the same figures):
- clipforge-vit-micro and clipforge-vit-tiny after 3 AdamW steps (CLIP loss), exported to both formats;
- clipforge-vit-micro trained on SynthScenes (configs/clip_synth_tiny.yaml with model.name=clipforge-vit-micro,
  2048 scenes, 4 epochs = 64 steps), so that zero-shot predicts many classes above chance (about 2.5 minutes);
- a tiny random transformers CLIPModel built from a config (quick_gelu, eos_token_id 49407, vision eps 1e-6,
  mean/std 0.5), imported as `model.name`, saved as a clipforge checkpoint and exported again ("original" =
  the first folder against the imported model);
- clipforge-vit-micro trained with SigLIP: open_clip's format only (transformers' CLIPModel has no logit_bias).

Columns: max |diff| of image and text embeddings on identical inputs; captions whose token ids are equal
(transformers' ids wherever attention_mask is 1); max |diff| of the text embeddings from each side's own tokens,
of CLIPTextModelWithProjection's, and of pixel values from each side's own preprocessing (transformers' default
torchvision backend, and backend="pil"); zero-shot on 96 SynthScenes base-class images (48 classes, synthscenes
templates, each side with its own preprocessing and tokenizer): top-1 of open_clip and of the export (default
backend / PIL backend), predictions that agree, classes open_clip predicts, max |diff| of the logits (100 x
cosine; default / PIL backend) and the smallest top-1 - top-2 logit margin.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.hf_parity import (  # noqa: E402 - the helpers live beside the tests that assert on them
    CAPTIONS,
    Case,
    measure,
    random_transformers_folder,
    save,
    trained_model,
)

from clipforge.config import ModelConfig  # noqa: E402
from clipforge.models import create_model, load_model  # noqa: E402
from clipforge.models.hf import export_open_clip, export_transformers  # noqa: E402

EMBEDDING_COLUMNS = [
    ("image_max_diff", "image |d|"), ("text_max_diff", "text |d|"), ("captions_with_equal_tokens", "tokens ="),
    ("own_tokens_text_max_diff", "own tokens |d|"), ("text_model_with_projection_max_diff", "TextWithProj |d|"),
    ("own_preprocessing_pixel_max_diff", "pixels |d| tv"), ("pil_backend_pixel_max_diff", "pixels |d| pil"),
    ("logit_scale_equal", "T ="), ("logit_bias_equal", "bias =")]
ZEROSHOT_COLUMNS = [
    ("zeroshot_acc1_open_clip", "top-1 open_clip"), ("zeroshot_acc1_exported", "top-1 tv"),
    ("zeroshot_acc1_exported_pil", "top-1 pil"), ("zeroshot_same_predictions", "same preds tv"),
    ("zeroshot_same_predictions_pil", "same preds pil"), ("zeroshot_classes_predicted", "classes predicted"),
    ("zeroshot_logits_max_diff", "logits |d| tv"), ("zeroshot_logits_max_diff_pil", "logits |d| pil"),
    ("zeroshot_min_top2_margin", "min top-2 margin")]
READERS = {"transformers": "transformers", "original": "transformers (source folder)",
           "open_clip": "open_clip local-dir:"}


def synth_trained_micro(root: Path) -> Path:
    """clipforge-vit-micro trained with `clipforge train`'s loop on SynthScenes; its run folder."""
    from clipforge.config import load_config
    from clipforge.engine.loop import train

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "clip_synth_tiny.yaml", [
        "model.name=clipforge-vit-micro", f"output_dir={root / 'synth-run'}", "data.synth.num_train=2048",
        "train.epochs=4", "train.warmup_steps=10", "eval.at_end=false", "train.progress=false",
        "train.tensorboard=false"])
    return train(config).run_dir


def cell(key: str, value) -> str:
    if key.startswith("zeroshot_acc1"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return "0" if value == 0.0 else f"{value:.1e}"
    return str(value)


def main() -> None:
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="hf-parity-"))
    cases = []
    for name in ("clipforge-vit-micro", "clipforge-vit-tiny"):
        checkpoint = save(trained_model("clip", name), root / name)
        export_transformers(checkpoint, root / f"{name}-hf")
        export_open_clip(checkpoint, root / f"{name}-oc")
        cases.append(Case(name, *load_model(None, checkpoint=checkpoint), root / f"{name}-hf", root / f"{name}-oc"))
    run = synth_trained_micro(root)
    export_transformers(run, root / "synth-hf")
    export_open_clip(run, root / "synth-oc")
    cases.append(Case("clipforge-vit-micro, 64 steps on SynthScenes", *load_model(None, checkpoint=run),
                      root / "synth-hf", root / "synth-oc"))
    original = random_transformers_folder(root / "tiny-random-clip")
    checkpoint = save(create_model(ModelConfig(name=str(original))), root / "imported")
    export_transformers(checkpoint, root / "random-hf")
    export_open_clip(checkpoint, root / "random-oc")
    cases.append(Case("transformers tiny random", *load_model(None, checkpoint=checkpoint), root / "random-hf",
                      root / "random-oc", original_folder=original))
    checkpoint = save(trained_model("siglip"), root / "siglip")
    export_open_clip(checkpoint, root / "siglip-oc")
    cases.append(Case("clipforge-vit-micro SigLIP", *load_model(None, checkpoint=checkpoint),
                      open_clip_folder=root / "siglip-oc"))
    results = measure(cases, root / "work")
    clean = not results["modules"]["after_transformers"] and not [
        m for m in results["modules"]["after_open_clip"] if m.startswith("clipforge")]

    import open_clip
    import transformers

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"open_clip {open_clip.__version__}")
    print(f"captions: {len(CAPTIONS)}; reader process imported no clipforge module: {clean}")
    for columns in (EMBEDDING_COLUMNS, ZEROSHOT_COLUMNS):
        print()
        print("| case | read by | " + " | ".join(label for _, label in columns) + " |")
        print("|" + " --- |" * (len(columns) + 2))
        for case in cases:
            for kind, figures in results[case.name].items():
                if columns is ZEROSHOT_COLUMNS and "zeroshot_acc1_exported" not in figures:
                    continue
                row = [cell(key, figures[key]) if key in figures else "" for key, _ in columns]
                print(f"| {case.name} | {READERS[kind]} | " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
