"""The other side of the interop checks, run as its own process with nothing of clipforge imported.

    python tests/helpers/transformers_side.py JOBS.json

Each job names an exported folder and the inputs clipforge measured open_clip on (pixels, token ids, captions,
PNG images and zero-shot prompts, as .npy/.json files). For a "transformers" job the folder is read with plain
transformers (CLIPModel, CLIPTokenizer, CLIPProcessor, CLIPTextModelWithProjection); for an "open_clip" job with
plain open_clip (local-dir:). Outputs go to each job's .npz; JOBS.modules.json lists the clipforge and open_clip
modules imported after the transformers jobs and after the open_clip ones, so the caller can check that none of
clipforge was (nor open_clip, for transformers). Driven by tests/helpers/hf_parity.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def zeroshot_logits(image_features, prompt_features, num_classes) -> np.ndarray:
    """[N, C] 100 * cosine logits; class weights = the mean of unit prompt features per class, re-normalised
    (CLIP's prompt ensemble)."""
    classifier = normalize(normalize(prompt_features).reshape(num_classes, -1, prompt_features.shape[-1]).mean(1))
    return (100 * normalize(image_features) @ classifier.T).numpy()


@torch.no_grad()
def transformers_job(job: dict) -> dict:
    from transformers import (
        CLIPModel,
        CLIPProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = job["folder"]
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    pixels = torch.from_numpy(np.load(job["pixels"]))
    tokens = torch.from_numpy(np.load(job["tokens"]))
    features = {"image_features": model.get_image_features(pixel_values=pixels).pooler_output.numpy(),
                "text_features": model.get_text_features(input_ids=tokens).pooler_output.numpy(),
                "logit_scale": model.logit_scale.numpy()}
    if "captions" not in job:  # a model folder without tokenizer or processor files
        return features
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPProcessor.from_pretrained(folder)
    captions = json.loads(Path(job["captions"]).read_text(encoding="utf-8"))
    encoded = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    images = [Image.open(p).convert("RGB") for p in sorted(Path(job["images"]).glob("*.png"))]
    own_pixels = processor(images=images, return_tensors="pt").pixel_values  # the default (torchvision) backend
    pil_pixels = CLIPProcessor.from_pretrained(folder, backend="pil")(images=images, return_tensors="pt").pixel_values
    prompts = json.loads(Path(job["prompts"]).read_text(encoding="utf-8"))
    prompt_tokens = tokenizer(prompts["prompts"], padding="max_length", truncation=True, return_tensors="pt")
    prompt_features = model.get_text_features(**prompt_tokens).pooler_output
    text_model = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    return {
        **features,
        "text_with_projection": text_model(input_ids=tokens).text_embeds.numpy(),
        "token_ids": encoded.input_ids.numpy(),
        "attention_mask": encoded.attention_mask.numpy(),
        "caption_features": model.get_text_features(**encoded).pooler_output.numpy(),
        "own_pixels": own_pixels.numpy(),
        "pil_pixels": pil_pixels.numpy(),
        "zeroshot_logits": zeroshot_logits(model.get_image_features(pixel_values=own_pixels).pooler_output,
                                           prompt_features, prompts["num_classes"]),
        "zeroshot_logits_pil": zeroshot_logits(model.get_image_features(pixel_values=pil_pixels).pooler_output,
                                               prompt_features, prompts["num_classes"]),
    }


@torch.no_grad()
def open_clip_job(job: dict) -> dict:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{job['folder']}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{job['folder']}")
    captions = json.loads(Path(job["captions"]).read_text(encoding="utf-8"))
    out = {
        "image_features": model.encode_image(torch.from_numpy(np.load(job["pixels"]))).numpy(),
        "text_features": model.encode_text(torch.from_numpy(np.load(job["tokens"]))).numpy(),
        "token_ids": tokenizer(captions).numpy(),
        "logit_scale": model.logit_scale.numpy(),
    }
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias.numpy()
    if "images" in job:
        images = [Image.open(p).convert("RGB") for p in sorted(Path(job["images"]).glob("*.png"))]
        out["own_pixels"] = torch.stack([preprocess(image) for image in images]).numpy()
    return out


def main(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
    modules = {}
    for kind, run in (("transformers", transformers_job), ("open_clip", open_clip_job)):  # transformers first
        for job in (j for j in jobs if j["kind"] == kind):
            np.savez(job["output"], **run(job))
        modules[f"after_{kind}"] = sorted(m for m in sys.modules if m.split(".")[0] in ("clipforge", "open_clip"))
    Path(jobs_file).with_suffix(".modules.json").write_text(json.dumps(modules), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
