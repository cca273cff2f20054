"""Parity of exported folders with the open_clip model they came from: the measurement behind the figures in
docs/results.md (benchmarks/hf_parity.py prints them) and the assertions of tests/test_hf_interop.py.

The open_clip side is measured here; the exported folders are read in a separate process with plain
transformers / open_clip (tests/helpers/transformers_side.py), on the same inputs:
- pixels: SynthScenes images through open_clip's eval transform, and token ids from open_clip's tokenizer:
  the image and text embeddings of the two models on identical input (max |diff|);
- captions: token ids of transformers' CLIPTokenizer against open_clip's (equal where attention_mask is 1, the
  padding being the only difference), and the embeddings of each side's own tokens;
- the PNG images through each side's own preprocessing (max |diff| of pixel values; transformers' default
  torchvision backend and its PIL backend), then zero-shot classification on SynthScenes base classes with the
  synthscenes templates, each side with its own preprocessing and tokenizer: each image's predicted class.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIDE_SCRIPT = Path(__file__).with_name("transformers_side.py")

CAPTIONS = [
    "A Photo of a CAT.",
    "Hello,   world!! What?! (yes) -- no... [ok] {fine} #1 @home 50% a+b=c",
    "a big red circle; a small blue square, left of it: 'quoted' \"double\"",
    "café naïve résumé Straße ÉCOLE",
    "日本語のテキスト and 한국어 and русский текст",
    "emoji 🎉🐱 time",
    "don't I'll we've they're she's",
    "tab\tand\nnewline   and    spaces",
    "numbers 3.14 and 1,000,000 and 42nd",
    "a " * 60 + "caption far longer than the context length",
    "large green striped star above a small yellow dotted triangle " * 4,
]


def trained_model(objective: str = "clip", name: str = "clipforge-vit-micro"):
    """A clipforge CLIP bundle after a few optimiser steps, so its weights differ from any initialisation."""
    from clipforge.config import load_config
    from clipforge.data.batches import ImageTextBatch
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    config = load_config(overrides=[f"model.name={name}", f"objective.name={objective}"])
    torch.manual_seed(3)
    bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    loss = build_objective(config, bundle.model)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=1e-2)
    size = bundle.model.visual.image_size
    batch = ImageTextBatch(images=torch.randn(3, 3, *size), texts=bundle.tokenizer(CAPTIONS[:3]),
                           labels=torch.full((3,), -1), keys=["a", "b", "c"])
    for _ in range(3):
        loss(bundle.model, batch).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return bundle


def save(bundle, root: Path) -> Path:
    """`bundle` as a clipforge checkpoint folder (model.safetensors + model.json) under `root`."""
    from clipforge.engine.checkpointing import TrainingState, save_checkpoint

    optimizer = torch.optim.AdamW(bundle.model.parameters())
    return save_checkpoint(root, bundle, {"main": optimizer}, None, TrainingState(step=3), [], {}, keep_last=1,
                           is_best=False)


def random_transformers_folder(folder: Path) -> Path:
    """A tiny random transformers CLIPModel built from a config, as transformers' own tests build them: its
    defaults (quick_gelu, eos_token_id 49407), a vision layer-norm eps of 1e-6 and a preprocessor with mean and
    std 0.5 exercise the conversions clipforge's own models do not."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20),
        vision_config=dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, layer_norm_eps=1e-6),
        projection_dim=24)
    model = CLIPModel(config)
    with torch.no_grad():  # not the init's unit norms and zero biases: every weight must land in its place
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(3.1)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(folder)
    return folder


@dataclass
class Case:
    name: str
    model: torch.nn.Module  # the open_clip model the folders were exported from (eval mode)
    preprocess: object  # its eval transform
    tokenizer: object  # open_clip's tokenizer
    transformers_folder: Path | None = None
    open_clip_folder: Path | None = None
    original_folder: Path | None = None  # a transformers folder the model was imported from


def synth_zeroshot_data(num_eval: int = 96):
    """SynthScenes base classes: (PIL images, labels, classnames, templates)."""
    from clipforge.eval.datasets import synth_eval_datasets
    from clipforge.eval.templates import load_templates

    (dataset,) = synth_eval_datasets(num_eval=num_eval, num_train=1, image_size=64, variants=[], groups=("base",))
    return [dataset.images[i] for i in range(len(dataset))], dataset.labels, dataset.classnames, \
        load_templates("synthscenes")


@torch.no_grad()
def _open_clip_side(case: Case, work: Path, images, classnames, templates) -> dict:
    from clipforge.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits, zeroshot_prompts

    work.mkdir(parents=True, exist_ok=True)
    pixels = torch.stack([case.preprocess(image) for image in images])  # [N, 3, H, W]
    tokens = case.tokenizer(CAPTIONS)  # [C, L]
    np.save(work / "pixels.npy", pixels.numpy())
    np.save(work / "tokens.npy", tokens.numpy())
    (work / "captions.json").write_text(json.dumps(CAPTIONS), encoding="utf-8")
    (work / "images").mkdir(exist_ok=True)
    for index, image in enumerate(images):
        image.save(work / "images" / f"{index:05d}.png")
    (work / "prompts.json").write_text(json.dumps({"prompts": zeroshot_prompts(classnames, templates),
                                                   "num_classes": len(classnames)}), encoding="utf-8")
    classifier = build_zeroshot_classifier(case.model, case.tokenizer, classnames, templates)  # clipforge's harness
    image_features = case.model.encode_image(pixels)
    return {"pixels": pixels.numpy(), "tokens": tokens.numpy(), "image_features": image_features.numpy(),
            "text_features": case.model.encode_text(tokens).numpy(),
            "zeroshot_logits": zeroshot_logits(F.normalize(image_features, dim=-1), classifier).numpy(),
            "logit_scale": case.model.logit_scale.detach().numpy(),
            "logit_bias": None if getattr(case.model, "logit_bias", None) is None else
            case.model.logit_bias.detach().numpy()}


def _jobs(case: Case, work: Path) -> list[dict]:
    inputs = {"pixels": str(work / "pixels.npy"), "tokens": str(work / "tokens.npy")}
    full = {**inputs, "captions": str(work / "captions.json"), "images": str(work / "images"),
            "prompts": str(work / "prompts.json")}
    jobs = []
    if case.transformers_folder is not None:
        jobs.append({"kind": "transformers", "folder": str(case.transformers_folder), **full,
                     "output": str(work / "transformers.npz")})
    if case.original_folder is not None:
        jobs.append({"kind": "transformers", "folder": str(case.original_folder), **inputs,
                     "output": str(work / "original.npz")})
    if case.open_clip_folder is not None:
        jobs.append({"kind": "open_clip", "folder": str(case.open_clip_folder), **full,
                     "output": str(work / "open_clip.npz")})
    return jobs


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _figures(reference: dict, outputs: dict, labels) -> dict:
    figures = {"image_max_diff": _max_diff(reference["image_features"], outputs["image_features"]),
               "text_max_diff": _max_diff(reference["text_features"], outputs["text_features"]),
               "logit_scale_equal": bool(np.array_equal(reference["logit_scale"].reshape(()),
                                                        outputs["logit_scale"].reshape(())))}
    if "token_ids" in outputs:
        ids = outputs["token_ids"]
        if "attention_mask" in outputs:  # transformers pads with <|endoftext|>, open_clip with 0
            ids = np.where(outputs["attention_mask"] == 1, ids, 0)
        same = (ids == reference["tokens"]).all(axis=1)
        figures["captions_with_equal_tokens"] = f"{int(same.sum())}/{len(same)}"
    if "caption_features" in outputs:
        figures["own_tokens_text_max_diff"] = _max_diff(reference["text_features"], outputs["caption_features"])
        figures["text_model_with_projection_max_diff"] = _max_diff(reference["text_features"],
                                                                   outputs["text_with_projection"])
    if "own_pixels" in outputs:
        figures["own_preprocessing_pixel_max_diff"] = _max_diff(reference["pixels"], outputs["own_pixels"])
    if "pil_pixels" in outputs:
        figures["pil_backend_pixel_max_diff"] = _max_diff(reference["pixels"], outputs["pil_pixels"])
    if "zeroshot_logits" in outputs:
        labels = np.asarray(labels)
        ours = reference["zeroshot_logits"].argmax(1)
        top2 = np.sort(reference["zeroshot_logits"], axis=1)[:, -2:]
        figures["zeroshot_acc1_open_clip"] = float((ours == labels).mean())
        figures["zeroshot_classes_predicted"] = len(set(ours.tolist()))
        figures["zeroshot_min_top2_margin"] = float((top2[:, 1] - top2[:, 0]).min())
        for backend, key in (("", "zeroshot_logits"), ("_pil", "zeroshot_logits_pil")):
            theirs = outputs[key].argmax(1)
            figures[f"zeroshot_acc1_exported{backend}"] = float((theirs == labels).mean())
            figures[f"zeroshot_same_predictions{backend}"] = f"{int((ours == theirs).sum())}/{len(labels)}"
            figures[f"zeroshot_logits_max_diff{backend}"] = _max_diff(reference["zeroshot_logits"], outputs[key])
    if "logit_bias" in outputs:
        figures["logit_bias_equal"] = reference["logit_bias"] is not None and bool(
            np.array_equal(reference["logit_bias"], outputs["logit_bias"]))
    return figures


def measure(cases: list[Case], work: Path, num_eval: int = 96) -> dict:
    """{case name: {"transformers"|"original"|"open_clip": figures}, "modules": the other process's imports}."""
    images, labels, classnames, templates = synth_zeroshot_data(num_eval)
    references, jobs = {}, []
    for case in cases:
        references[case.name] = _open_clip_side(case, work / case.name, images, classnames, templates)
        jobs += _jobs(case, work / case.name)
    jobs_file = work / "jobs.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    done = subprocess.run([sys.executable, str(SIDE_SCRIPT), str(jobs_file)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the transformers side failed:\n{done.stderr[-4000:]}")
    results: dict = {"modules": json.loads(jobs_file.with_suffix(".modules.json").read_text(encoding="utf-8"))}
    for case in cases:
        results[case.name] = {}
        for kind in ("transformers", "original", "open_clip"):
            path = work / case.name / f"{kind}.npz"
            if path.is_file():
                results[case.name][kind] = _figures(references[case.name], dict(np.load(path)), labels)
    return results
