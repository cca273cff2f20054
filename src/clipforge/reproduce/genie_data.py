"""The cached inputs of `clipforge reproduce genie`: the three trained models, the real images, every edit and
every embedding. Each part is made once and skipped on a re-run (runs through `train_once`, edits through
`augment_genie`'s own resumable output folders, embeddings in files keyed by what they embed).

    out/clip          the CLIP (configs/clip_synth_tiny.yaml): base classes only; the few-shot backbone and the
                      diffusion model's text tower
    out/autoencoder   configs/genie_autoencoder_synth.yaml       out/diffusion   configs/genie_diffusion_synth.yaml
    out/diffusers     the diffusion run exported as a Stable-Diffusion-layout folder (what augment genie loads)
    out/seed<S>/real/<pool>/      real 32 px SynthScenes images of the 16 novel classes (webdataset shards)
    out/seed<S>/edits/<name>/     augment_genie output folders, e.g. fewshot_genie_0.8, longtail_txt2img
    out/seed<S>/features/<name>.safetensors   frozen-backbone embeddings of a folder's images, with their keys
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from clipforge.config import load_config
from clipforge.reproduce.common import ProgressFn, train_once

IMAGE_SIZE = 32
REAL_SEED_BASE = 7000  # SynthScenes seed of the real images of reproduction seed S: REAL_SEED_BASE + S


@dataclass(frozen=True)
class Sizes:
    """What a reproduction generates and evaluates (recorded with its results)."""

    support_pool: int = 5  # few-shot support candidates per novel class
    query_pool: int = 20  # few-shot query candidates per novel class (16 drawn per episode)
    oracle_train: int = 40  # real images per class that train the label-check classifier
    longtail_largest: int = 40  # long tail: the head class's training images (Zipf down to 1)
    longtail_target: int = 20  # long tail: classes under this count are filled up to it; "many" from this count
    longtail_few: int = 5  # long tail: classes with at most this many training images are "few"
    longtail_sources: int = 24  # long tail: head-class images that GeNIe edits toward the tail classes
    longtail_test: int = 20  # long tail: balanced test images per class
    steps: int = 20  # denoising steps at r = 1 (DPM-Solver++ 2)
    guidance: float = 3.0
    batch_size: int = 64


# ---- the models ------------------------------------------------------------------------------------------------

def model_configs(out: Path, config_dir: Path, overrides: Sequence[str] = ()) -> dict:
    common = ["eval.at_end=false"]  # the engine's own progress bar: these are the long trainings (10-25 min each)
    clip = load_config(config_dir / "clip_synth_tiny.yaml", [*common, f"output_dir={out / 'clip'}", "name=clip"])
    autoencoder = load_config(config_dir / "genie_autoencoder_synth.yaml",
                              [*common, f"output_dir={out / 'autoencoder'}", "name=autoencoder"])
    diffusion = load_config(config_dir / "genie_diffusion_synth.yaml", [
        *common, f"output_dir={out / 'diffusion'}", "name=diffusion", f"objective.diffusion.text={out / 'clip'}",
        f"objective.diffusion.autoencoder={out / 'autoencoder'}", *overrides])
    return {"clip": clip, "autoencoder": autoencoder, "diffusion": diffusion}


def prepare_models(out: Path, config_dir: Path, progress: ProgressFn, overrides: Sequence[str] = ()) -> Path:
    """Train the CLIP, the autoencoder and the diffusion model (each once) and export the diffusers folder."""
    from clipforge.models.diffusers_export import export_diffusers

    configs = model_configs(out, config_dir, overrides)
    for name in ("clip", "autoencoder", "diffusion"):
        train_once(configs[name], progress)
    folder = out / "diffusers"
    source = json.loads((folder / "clipforge.json").read_text())["source"] if (folder / "clipforge.json").is_file() \
        else None
    from clipforge.models.factory import find_model_weights

    latest = str(find_model_weights(out / "diffusion").parent.resolve())
    if source != latest:
        progress("exporting the diffusion model as a diffusers folder")
        export_diffusers(out / "diffusion", folder, overwrite=True)
    return folder


# ---- real images -------------------------------------------------------------------------------------------------

def real_pools(seed: int, sizes: Sizes) -> dict[str, dict[int, list[int]]]:
    """{pool: {novel label: SynthScenes indices}}: disjoint pools of the "novel" split (seed REAL_SEED_BASE + seed),
    filled in index order, so they depend on the seed and the sizes only."""
    from clipforge.data.synth import NOVEL_CLASSES, SynthScenes

    generator = SynthScenes(image_size=IMAGE_SIZE, seed=REAL_SEED_BASE + seed, split="novel")
    wanted = {"support": sizes.support_pool, "query": sizes.query_pool, "oracle": sizes.oracle_train,
              "longtail": sizes.longtail_largest, "longtail_test": sizes.longtail_test}
    pools = {name: {c: [] for c in NOVEL_CLASSES} for name in wanted}
    index = 0
    while any(len(pools[name][c]) < count for name, count in wanted.items() for c in NOVEL_CLASSES):
        label = generator.scene(index).label
        for name, count in wanted.items():
            if len(pools[name][label]) < count:
                pools[name][label].append(index)
                break
        index += 1
    return pools


def write_real(folder: Path, seed: int, indices: Sequence[int]) -> Path:
    """The SynthScenes records `indices` as shards in `folder` (skipped when already complete)."""
    from clipforge.data.shards import manifest_is_complete, write_shards
    from clipforge.data.synth import CLASSNAMES, SynthScenes

    meta = {"generator": "SynthScenes", "split": "novel", "seed": REAL_SEED_BASE + seed, "image_size": IMAGE_SIZE,
            "indices": list(indices), "classnames": list(CLASSNAMES)}
    if not manifest_is_complete(folder, meta):
        generator = SynthScenes(image_size=IMAGE_SIZE, seed=REAL_SEED_BASE + seed, split="novel")
        write_shards((generator.record(i) for i in indices), folder, shard_size=1024, prefix="real", meta=meta)
    return folder


def real_keys(seed: int, indices: Sequence[int]) -> list[str]:
    """The record keys of reproduction seed `seed`'s real images `indices`."""
    from clipforge.data.synth import SynthScenes

    generator = SynthScenes(image_size=IMAGE_SIZE, seed=REAL_SEED_BASE + seed, split="novel")
    return [generator.key(i) for i in indices]


# ---- edits -------------------------------------------------------------------------------------------------------

def make_edits(source: Path, model, out: Path, *, mode: str, ratio: float, seed: int, classes: list[str],
               targets: list[str] | None, sizes: Sizes, progress: ProgressFn) -> Path:
    """One augment_genie output folder (resumable: done units are skipped; a finished folder is read as it is)."""
    from clipforge.augment.genie import augment_genie
    from clipforge.augment.plan import GenieOptions

    options = GenieOptions(mode=mode, ratio=None if mode == "txt2img" else ratio, steps=sizes.steps,
                           guidance=sizes.guidance, seed=seed, shard_size=256)
    shown = {"last": -1}

    def report(done: int, total: int) -> None:
        if done == total or done - shown["last"] >= max(total // 4, 1):
            shown["last"] = done
            progress(f"  {out.name}: {done}/{total} edits")

    augment_genie(str(source), model, out, classes=classes, targets=targets, options=options,
                  batch_size=sizes.batch_size, progress=report)
    return out


def read_images(folder: Path) -> list[tuple[dict, Image.Image]]:
    """(key.json as a dict, with "__key__"; the RGB image) of every record of a shard folder, in storage order."""
    from clipforge.data.samples import SkipCounter
    from clipforge.data.sources import open_source

    source = open_source(str(folder), "wds")
    counter = SkipCounter()
    found = []
    for unit, size in enumerate(source.unit_sizes()):
        for raw in source.read_unit(unit, 0, int(size), counter):
            meta = json.loads(raw["json"]) if "json" in raw else {}
            image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
            found.append(({**meta, "__key__": raw["__key__"]}, image))
    return found


# ---- embeddings ----------------------------------------------------------------------------------------------

class Backbone:
    """The frozen few-shot backbone: a CLIP run's image tower, L2-normalised features (float32, on the CPU)."""

    def __init__(self, run: Path):
        from clipforge.models import load_model
        from clipforge.models.factory import find_model_weights
        from clipforge.models.text_prior import file_sha256

        self.model, self.preprocess, _ = load_model(None, checkpoint=run)
        self.identity = file_sha256(find_model_weights(run))

    @torch.no_grad()
    def embed_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, D], through the same preprocess as PIL images (resize, normalise)."""
        images = [Image.fromarray((p.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))
                  for p in pixels]
        return self.embed(images)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        parts = []
        for first in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(image) for image in images[first:first + batch_size]])
            parts.append(torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1))
        return torch.cat(parts) if parts else torch.empty(0, 0)


def folder_features(folder: Path, backbone: Backbone, cache: Path) -> tuple[list[dict], torch.Tensor]:
    """(records' metadata, [N, D] features) of a shard folder; the features are kept in `cache` (safetensors)
    with the folder's manifest digest and the backbone's weights, and recomputed when either differs."""
    import hashlib

    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    meta_file = cache.with_suffix(".json")
    if cache.is_file() and meta_file.is_file():
        saved = json.loads(meta_file.read_text())
        if saved.get("manifest") == digest and saved.get("backbone") == backbone.identity:
            return saved["records"], load_file(str(cache))["features"]
    records = read_images(folder)
    metas = [meta for meta, _ in records]
    features = backbone.embed([image for _, image in records])
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous()}, str(cache))
    meta_file.write_text(json.dumps({"manifest": digest, "backbone": backbone.identity, "records": metas}))
    return metas, features


def pixels_of(folder: Path) -> dict[str, torch.Tensor]:
    """{key: [3, H, W] in [0, 1]} of a folder of real images (what MixUp / CutMix mix)."""
    from torchvision.transforms.functional import to_tensor

    return {meta["__key__"]: to_tensor(image) for meta, image in read_images(folder)}
