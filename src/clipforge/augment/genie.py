"""`augment_genie`: labelled images in, GeNIe-augmented labelled shards out (Koohpayegani et al., arXiv 2312.02548).

Shard -> shard, resumable and idempotent:

- The job list (plan.py) depends only on the source, the classes and the options, and is cut into units of
  `shard_size` jobs. Unit u becomes the shard `genie-<u>.tar`; rank `u % world_size` makes it (torchrun's RANK
  and WORLD_SIZE), so a run needs no process group and its shards do not depend on the number of ranks.
- A unit is written by clipforge's shard writer into a hidden staging folder, renamed into place, and then marked
  done in `.genie-units/`; a killed run loses at most the units in flight, and a re-run skips what is done.
- `augment.json` records the run's settings; a re-run with other settings into the same folder is refused.
  The manifest (`manifest.json`, `sizes.json`, clipforge's shard format) is written once every unit is done, by
  whichever rank finishes last; with it the folder reads as any shard set (`--data OUT`).
- Every sample draws its noise from its own seed (plan.job_seed), so a sample does not depend on which rank made
  it or what else was in its batch, up to float rounding: a batch of another size rounds differently in the last
  bits (batched kernels), which can move a pixel by one grey level. Equal batch sizes give equal bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from clipforge.augment import adaptive
from clipforge.augment.diffusion import (
    DiffusionComponents,
    folder_fingerprint,
    load_diffusion,
    read_model_index,
    resolve_model_folder,
)
from clipforge.augment.plan import (
    SETTINGS_FORMAT,
    GenieOptions,
    Job,
    SourceImage,
    check_classes,
    job_seed,
    plan_jobs,
    read_record,
    resolve_targets,
    run_settings,
    scan_source,
    units_of,
)
from clipforge.augment.sampler import encode_prompts, generate, to_model_input, to_pil
from clipforge.data.samples import SkipCounter, add_counts
from clipforge.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, SIZES_NAME, read_manifest, write_shards
from clipforge.data.sources import DataSource, open_source
from clipforge.distributed import read_env
from clipforge.errors import DataError
from clipforge.models.checkpoint import write_json_atomic

SETTINGS_NAME = "augment.json"
UNITS_DIR = ".genie-units"
PREFIX = "genie"

ProgressFn = Callable[[int, int], None]  # (samples done by this rank, samples this rank has to do)


@dataclass
class GenieResult:
    out: Path
    num_samples: int  # in the finished set; 0 while other ranks' units are still missing
    generated: int  # samples written by this call
    complete: bool  # the manifest is written
    skipped: dict[str, int] = field(default_factory=dict)  # bad source input, by kind (this call's view)


def _first_difference(old: dict, new: dict) -> str:
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            return f"{name}: {json.dumps(old.get(name))[:60]} there, {json.dumps(new.get(name))[:60]} now"
    return "same"


def check_out_folder(out: Path, settings: dict) -> None:
    """DataError unless `out` is absent, empty, or holds a run with exactly these settings."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' exists and is not a folder")
    if not out.is_dir():
        return
    settings_file = out / SETTINGS_NAME
    if settings_file.is_file():
        try:
            body = json.loads(settings_file.read_text(encoding="utf-8"))
            old = body["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"'{settings_file}' is unreadable; use a new --out") from None
        if old != settings:
            raise DataError(f"'{out}' holds another run's output ({_first_difference(old, settings)}); use a new --out")
    # another rank may be writing augment.json at this moment: its own files do not count
    elif any(not (p.name == UNITS_DIR or p.name.startswith(f".{SETTINGS_NAME}.")) for p in out.iterdir()):
        raise DataError(f"--out '{out}' is not empty and holds no {SETTINGS_NAME}; use a new or empty folder")


def _finished(out: Path, settings: dict) -> dict | None:
    """The manifest of a complete set made with these settings, else None."""
    body = read_manifest(out)
    if body is None or body.get("meta", {}).get("settings") != settings:
        return None
    for shard in body.get("shards", []):
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            return None
    return body


def _unit_marker(out: Path, unit: int) -> Path:
    return out / UNITS_DIR / f"unit-{unit:06d}.json"


def _unit_done(out: Path, unit: int) -> dict | None:
    try:
        marker = json.loads(_unit_marker(out, unit).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    shard = marker.get("shard")
    if shard is not None and (not (out / shard).is_file() or (out / shard).stat().st_size != marker.get("bytes")):
        return None
    return marker


@dataclass
class _Run:
    """What every unit needs: the model, the source, the prompts' text states, GeNIe-Ada's embeddings."""

    components: DiffusionComponents
    source: DataSource
    classes: list[str]
    options: GenieOptions
    batch_size: int
    prompt_embeds: torch.Tensor  # [C, L, D], one per class
    negative_embeds: torch.Tensor  # [1, L, D], the empty prompt
    embedder: adaptive.Embedder | None = None
    source_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [D]
    prototypes: dict[int, torch.Tensor] = field(default_factory=dict)  # class -> [D]
    grid_batching: bool = True


def load_images(source: DataSource, images: list[SourceImage], counter: SkipCounter) -> dict[str, Image.Image]:
    """{key: RGB image} for `images`, each storage unit read once over the span it needs."""
    by_unit: dict[int, list[SourceImage]] = {}
    for image in images:
        by_unit.setdefault(image.unit, []).append(image)
    found: dict[str, Image.Image] = {}
    for unit, wanted in sorted(by_unit.items()):
        keys = {image.key for image in wanted}
        first, stop = min(i.index for i in wanted), max(i.index for i in wanted) + 1
        for raw in source.read_unit(unit, first, stop, counter):
            if raw.get("__key__") in keys:
                sample = read_record(raw, counter)
                if sample is not None:
                    found[sample.key] = sample.image
    return found


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record(run: _Run, job: Job, image: Image.Image, ratio: float, seed: int, extra: dict | None = None) -> dict:
    classes, options = run.classes, run.options
    prompt_class = job.source.label if options.mode == "img2img" else job.slot
    meta = {
        "label": job.label,
        "classname": classes[job.label],
        "caption": options.template.format(classes[prompt_class]),
        "mode": options.mode,
        "source_key": job.source.key,
        "source_class": classes[job.source.label],
        "target_class": classes[job.label],
        "ratio": ratio,
        "seed": seed,
        "scheduler": options.scheduler,
        "steps": options.steps,
        "guidance": float(options.guidance),
        "model": run.components.fingerprint,
    }
    if options.mode == "img2img":
        meta["copy_for_class"] = classes[job.slot]
    meta.update(extra or {})
    return {"__key__": job.key(), "png": _encode_png(image), "txt": meta["caption"], "cls": job.label, "json": meta}


def _generate(run: _Run, jobs: list[Job], ratios: list[float], seeds: list[int], images: dict[str, Image.Image]):
    options = run.options
    size = run.components.image_size
    prompt_classes = [job.source.label if options.mode == "img2img" else job.slot for job in jobs]
    pixels = None
    if any(r < 1.0 for r in ratios):
        pixels = torch.stack([to_model_input(images[job.source.key], size) for job in jobs])
    out = generate(run.components, images=pixels, prompt_embeds=run.prompt_embeds[prompt_classes],
                   negative_embeds=run.negative_embeds, ratios=ratios, seeds=seeds, steps=options.steps,
                   guidance=options.guidance, posterior=options.posterior)
    return to_pil(out)


def _fixed_ratio_batches(run: _Run, jobs: list[Job], images: dict[str, Image.Image]):
    ratio = run.options.ratio
    for first in range(0, len(jobs), run.batch_size):
        batch = jobs[first:first + run.batch_size]
        seeds = [job_seed(run.options.seed, job, run.classes, ratio) for job in batch]
        outputs = _generate(run, batch, [ratio] * len(batch), seeds, images)
        yield [_record(run, job, image, ratio, seed) for job, image, seed in zip(batch, outputs, seeds)]


def adaptive_edits(run: _Run, jobs: list[Job], images: dict[str, Image.Image]) -> list[list[Image.Image]]:
    """Every grid ratio's edit of each job, [job][grid index]; the grid of one job shares its seed (its noise).
    Grid-batched, a job's whole grid goes through one denoise call; otherwise one call per ratio."""
    grid = list(run.options.grid)
    seeds = [job_seed(run.options.seed, job, run.classes, None) for job in jobs]
    if run.grid_batching:
        flat_jobs = [job for job in jobs for _ in grid]
        flat = _generate(run, flat_jobs, grid * len(jobs), [s for s in seeds for _ in grid], images)
        return [flat[i * len(grid):(i + 1) * len(grid)] for i in range(len(jobs))]
    per_ratio = [_generate(run, jobs, [ratio] * len(jobs), seeds, images) for ratio in grid]
    return [[per_ratio[k][i] for k in range(len(grid))] for i in range(len(jobs))]


def choose_edits(run: _Run, jobs: list[Job], edits: list[list[Image.Image]]) -> list[tuple[int, list[float]]]:
    """(chosen grid index, projection scores) per job, from the embeddings of its edits (adaptive.py)."""
    grid = run.options.grid
    flat = [image for job_edits in edits for image in job_edits]
    embeddings = adaptive.embed_images(run.embedder, flat, max(run.batch_size, len(grid)))
    choices = []
    for i, job in enumerate(jobs):
        scores = adaptive.projection_scores(run.source_embeddings[job.source.key], run.prototypes[job.slot],
                                            embeddings[i * len(grid):(i + 1) * len(grid)])
        choices.append((adaptive.select_ratio(scores), [round(float(s), 6) for s in scores]))
    return choices


def _adaptive_batches(run: _Run, jobs: list[Job], images: dict[str, Image.Image]):
    grid = list(run.options.grid)
    per_call = max(1, run.batch_size // len(grid)) if run.grid_batching else run.batch_size
    for first in range(0, len(jobs), per_call):
        batch = jobs[first:first + per_call]
        edits = adaptive_edits(run, batch, images)
        records = []
        for job, job_edits, (chosen, scores) in zip(batch, edits, choose_edits(run, batch, edits)):
            seed = job_seed(run.options.seed, job, run.classes, None)
            extra = {"adaptive": {"grid": grid, "scores": scores, "selected": grid[chosen]}}
            records.append(_record(run, job, job_edits[chosen], grid[chosen], seed, extra))
        yield records


def _unit_records(run: _Run, jobs: list[Job], counter: SkipCounter, on_sample: Callable[[], None]):
    needed = list({job.source.key: job.source for job in jobs}.values())
    images = load_images(run.source, needed, counter) if run.options.mode != "txt2img" else {}
    missing = {image.key for image in needed} - set(images)
    for key in sorted(missing):  # decoded at the scan, unreadable now (changed on disk since)
        counter.skip("unreadable_since_scan", key)
    usable = [job for job in jobs if job.source.key in images or run.options.mode == "txt2img"]
    batches = _adaptive_batches if run.options.adaptive else _fixed_ratio_batches
    for records in batches(run, usable, images):
        for record in records:
            yield record
            on_sample()


def _write_unit(run: _Run, out: Path, unit: int, jobs: list[Job], on_sample: Callable[[], None]) -> dict:
    staging = out / UNITS_DIR / f"staging-{unit:06d}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    counter = SkipCounter()
    write_shards(_unit_records(run, jobs, counter, on_sample), staging, shard_size=len(jobs) + 1, prefix=PREFIX)
    name, num_samples, size = None, 0, 0
    written = staging / f"{PREFIX}-000000.tar"
    if written.is_file():
        name = f"{PREFIX}-{unit:06d}.tar"
        written.replace(out / name)  # atomic: a shard of an earlier, killed attempt is overwritten whole
        num_samples = read_manifest(staging)["num_samples"]
        size = (out / name).stat().st_size
    shutil.rmtree(staging, ignore_errors=True)
    marker = {"shard": name, "num_samples": num_samples, "bytes": size, "skipped": dict(counter)}
    write_json_atomic(_unit_marker(out, unit), marker, indent=1)
    return marker


def _publish_json(path: Path, payload: dict, rank: int, **dump) -> None:
    """write_json_atomic through a name of this rank's own: several ranks may publish the same file at once."""
    private = path.with_name(f".{path.name}.rank{rank}.{os.getpid()}")
    write_json_atomic(private, payload, **dump)
    os.replace(private, path)


def _finalize(out: Path, num_units: int, settings: dict, scan_skipped: dict, classes: list[str],
              rank: int) -> dict | None:
    """Write the manifest once every unit is done; None while some are missing."""
    markers = [_unit_done(out, unit) for unit in range(num_units)]
    if any(marker is None for marker in markers):
        return None
    skipped = dict(scan_skipped)
    for marker in markers:
        add_counts(skipped, marker.get("skipped", {}))
    shards = [{"name": m["shard"], "num_samples": m["num_samples"], "bytes": m["bytes"]} for m in markers if m["shard"]]
    body = {
        "format": MANIFEST_FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "meta": {"generator": "clipforge augment genie", "settings": settings, "classnames": classes,
                 "skipped": skipped},
    }
    _publish_json(out / SIZES_NAME, {s["name"]: s["num_samples"] for s in shards}, rank, indent=1)
    _publish_json(out / MANIFEST_NAME, body, rank, indent=1, sort_keys=True)
    return body


def augment_genie(
    source: str | DataSource,
    model: str | Path | DiffusionComponents,
    out: str | Path,
    *,
    classes: list[str] | None = None,
    targets: list[str] | None = None,
    options: GenieOptions | None = None,
    embedder: adaptive.Embedder | str | Path | None = None,
    embedder_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    grid_batching: bool = True,
    progress: ProgressFn | None = None,
) -> GenieResult:
    """Generate GeNIe samples (or a baseline's) from the labelled images of `source` into shards under `out`.

    Everything a user can get wrong is checked before any output exists (ConfigError / DataError / CheckpointError,
    one line). `embedder` (GeNIe-Ada): a callable on PIL images -> [N, D], or a clipforge run/checkpoint folder
    whose `encode_image` is used; `embedder_id` names a callable in the settings. `rank` / `world_size` default to
    torchrun's RANK / WORLD_SIZE: rank r makes the units u with u % world_size == r.
    """
    options = (options or GenieOptions()).resolved()
    env = read_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if classes is not None:
        check_classes(classes)
    if options.adaptive and embedder is None:
        raise DataError("GeNIe-Ada (--adaptive) needs a classifier to embed with (--embedder RUN_DIR)")
    if isinstance(model, DiffusionComponents):
        fingerprint = model.fingerprint
    else:
        folder = resolve_model_folder(model)
        read_model_index(folder)
        fingerprint = folder_fingerprint(folder)
    data = source if isinstance(source, DataSource) else open_source(str(source))
    scan = scan_source(data, classes)
    target_labels = resolve_targets(targets, scan.classes)
    if isinstance(embedder, str | Path):
        embedder, embedder_id = adaptive.load_embedder(embedder, device)
    elif embedder is not None and embedder_id is None:
        embedder_id = getattr(embedder, "__qualname__", type(embedder).__name__)
    settings = run_settings(options, scan, target_labels, model_fingerprint=fingerprint,
                            dtype=str(dtype).removeprefix("torch."), embedder_id=embedder_id)
    jobs = plan_jobs(scan.images, target_labels, options.mode)
    if not jobs:
        raise DataError("nothing to generate: every source image is of the only target class")
    if options.adaptive:
        present = {image.label for image in scan.images}
        empty = [scan.classes[t] for t in target_labels if t not in present]
        if empty:
            raise DataError(f"GeNIe-Ada needs real images of every target class for its prototype; "
                            f"'{empty[0]}' has none")
    out = Path(out)
    check_out_folder(out, settings)
    if (done := _finished(out, settings)) is not None:
        return GenieResult(out, int(done["num_samples"]), 0, True, dict(done["meta"].get("skipped", {})))

    components = model if isinstance(model, DiffusionComponents) else load_diffusion(
        folder, device=device, dtype=dtype, scheduler=options.scheduler, fingerprint=fingerprint)
    if components.scheduler_name != options.scheduler:
        raise DataError(f"the loaded model uses scheduler '{components.scheduler_name}', not '{options.scheduler}'")
    prompts = [options.template.format(name) for name in scan.classes]
    run = _Run(components, data, scan.classes, options, batch_size, encode_prompts(components, prompts),
               encode_prompts(components, [""]), grid_batching=grid_batching)
    skipped = dict(scan.skipped)
    if options.adaptive:
        add_counts(skipped, _embed_real_images(run, embedder, scan.images, target_labels))

    out.mkdir(parents=True, exist_ok=True)
    if not (out / SETTINGS_NAME).is_file():  # every rank: whichever starts first, the folder says what it holds
        _publish_json(out / SETTINGS_NAME, {"format": SETTINGS_FORMAT, "settings": settings}, rank, indent=1)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    units = units_of(jobs, options.shard_size)
    generated = _run_units(run, out, units, [u for u in range(len(units)) if u % world_size == rank], skipped,
                           progress)
    body = _finalize(out, len(units), settings, scan.skipped, scan.classes, rank)
    if body is None:
        return GenieResult(out, 0, generated, False, skipped)
    return GenieResult(out, int(body["num_samples"]), generated, True, dict(body["meta"]["skipped"]))


def _embed_real_images(run: _Run, embedder, images: list[SourceImage], targets: list[int]) -> dict[str, int]:
    """GeNIe-Ada: every real image's embedding (the sources') and the target prototypes; the counts of images
    unreadable since the scan."""
    counter = SkipCounter()
    loaded = load_images(run.source, images, counter)
    kept = [image for image in images if image.key in loaded]
    embeddings = adaptive.embed_images(embedder, [loaded[image.key] for image in kept], run.batch_size)
    run.embedder = embedder
    run.source_embeddings = {image.key: embeddings[i] for i, image in enumerate(kept)}
    run.prototypes = adaptive.class_prototypes(embeddings, [image.label for image in kept], targets)
    return dict(counter)


def _run_units(run: _Run, out: Path, units: list[list[Job]], mine: list[int], skipped: dict[str, int],
               progress: ProgressFn | None) -> int:
    """Make this rank's units that are not done yet; the number of samples written."""
    total = sum(len(units[u]) for u in mine)
    todo = [u for u in mine if _unit_done(out, u) is None]
    done = total - sum(len(units[u]) for u in todo)
    generated = 0
    if progress is not None:
        progress(done, total)

    def on_sample() -> None:
        nonlocal done, generated
        done, generated = done + 1, generated + 1
        if progress is not None:
            progress(done, total)

    for unit in todo:
        marker = _write_unit(run, out, unit, units[unit], on_sample)
        add_counts(skipped, marker["skipped"])
        done += len(units[unit]) - marker["num_samples"]  # jobs of sources unreadable since the scan
        if progress is not None:
            progress(done, total)
    return generated
