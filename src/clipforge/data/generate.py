"""SynthScenes written to shards, idempotently: the manifest records the generation settings, and a
folder that already holds a complete set made with the same settings is left as it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipforge import __version__
from clipforge.data.shards import ShardInfo, ShardManifest, manifest_is_complete, read_manifest, write_shards


def synth_meta(*, num: int, split: str, variant: str, seed: int, image_size: int, shard_size: int,
               omit_fraction: float, long_tail: float, documents: bool) -> dict:
    """What the manifest records about generated SynthScenes shards (and what idempotence compares)."""
    from clipforge.data.synth import CLASSNAMES

    return {
        "generator": "SynthScenes",
        "clipforge_version": __version__,
        "num": int(num),
        "split": split,
        "variant": variant,
        "seed": int(seed),
        "image_size": int(image_size),
        "shard_size": int(shard_size),
        "omit_fraction": float(omit_fraction),
        "long_tail": float(long_tail),
        "documents": bool(documents),
        "classnames": list(CLASSNAMES),
    }


def generate_synth_shards(
    out_dir: str | Path,
    *,
    num: int,
    split: str = "train",
    variant: str = "original",
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 1024,
    omit_fraction: float = 0.3,
    long_tail: float = 0.0,
    documents: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[ShardManifest, bool]:
    """Write `num` SynthScenes samples (or interleaved documents) as shards into `out_dir`.

    Returns (manifest, generated): generated is False when an identical set was already there.
    Shards are named `<split>-000000.tar` (`doc-...` for documents).
    """
    from clipforge.data.synth import SynthScenes

    meta = synth_meta(num=num, split=split, variant=variant, seed=seed, image_size=image_size,
                      shard_size=shard_size, omit_fraction=omit_fraction, long_tail=long_tail,
                      documents=documents)
    out = Path(out_dir)
    if manifest_is_complete(out, meta):
        body = read_manifest(out)
        shards = [ShardInfo(str(out / s["name"]), int(s["num_samples"])) for s in body["shards"]]
        return ShardManifest(shards, meta), False
    generator = SynthScenes(image_size=image_size, seed=seed, split=split, omit_fraction=omit_fraction,
                            long_tail=long_tail)
    if documents:
        records = generator.documents(0, num)
        prefix = "doc"
    else:
        records = generator.records(0, num, variant=variant)
        prefix = split if variant == "original" else f"{split}-{variant}"
    manifest = write_shards(records, out, shard_size, prefix=prefix, progress=progress, meta=meta)
    return manifest, True
