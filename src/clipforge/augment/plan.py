"""What a GeNIe run will do, decided before any work: its options, the source's labelled images, the jobs.

A job is one output sample: a source image and the other class it is generated for (its "slot"). GeNIe edits
every source image towards every target class but its own, so class t receives one edit of every image of the
other classes (GeNIe's budget: (N - 1) * K per class in an N-way K-shot episode). The baselines keep that budget:
img2img edits each image of a target class towards its own prompt once per other target class, txt2img draws
from pure noise with the target prompt once per (source image, other class). Jobs are numbered in source order,
then target order, and cut into units of `shard_size` jobs; a unit is one output shard.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipforge.augment.adaptive import DEFAULT_GRID
from clipforge.augment.diffusion import SCHEDULERS
from clipforge.augment.sampler import check_ratio
from clipforge.data.samples import SkipCounter, decode_sample
from clipforge.data.sources import DataSource
from clipforge.data.transforms import sample_seed
from clipforge.errors import ConfigError, DataError

MODES = ("genie", "img2img", "txt2img")
SETTINGS_FORMAT = "clipforge.augment/1"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class GenieOptions:
    """How to generate. `ratio` None means GeNIe's 0.8 (genie) or pure noise, 1.0 (txt2img); img2img needs one."""

    mode: str = "genie"
    ratio: float | None = None
    adaptive: bool = False
    grid: tuple[float, ...] = DEFAULT_GRID
    template: str = "a photo of a {}."
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "dpm"
    seed: int = 0
    shard_size: int = 128
    posterior: str = "mode"  # the VAE posterior's mode (GeNIe) or a sample from it (diffusers' img2img)

    def resolved(self) -> GenieOptions:
        """These options checked (ConfigError, one line) and with the default ratio filled in."""
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        for name in ("steps", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.guidance, int | float) or not self.guidance >= 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULERS)})")
        if self.posterior not in ("mode", "sample"):
            raise ConfigError(f"posterior must be 'mode' or 'sample', got '{self.posterior}'")
        check_template(self.template)
        ratio = self.ratio
        if self.adaptive:
            if self.mode != "genie":
                raise ConfigError("--adaptive (GeNIe-Ada) applies to --mode genie only")
            if ratio is not None:
                raise ConfigError("give either --ratio or --adaptive, not both")
            if len(self.grid) < 2 or len(set(self.grid)) != len(self.grid) or list(self.grid) != sorted(self.grid):
                raise ConfigError(f"the GeNIe-Ada grid must be two or more increasing ratios, got {list(self.grid)}")
            for value in self.grid:
                check_ratio(value, self.steps, "a grid ratio")
            return GenieOptions(**{**asdict(self), "grid": tuple(float(value) for value in self.grid)})
        if self.mode == "txt2img":
            if ratio not in (None, 1, 1.0):
                raise ConfigError(f"txt2img starts from pure noise (r = 1); got --ratio {ratio}")
            ratio = 1.0
        elif ratio is None:
            if self.mode == "img2img":
                raise ConfigError("--mode img2img needs --ratio (GeNIe's baselines use 0.3 and 0.7)")
            ratio = 0.8
        check_ratio(ratio, self.steps)
        return GenieOptions(**{**asdict(self), "ratio": float(ratio), "grid": tuple(self.grid)})


def check_template(template: str) -> None:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(f"the prompt template must hold '{{}}' once, for the class name; got {template!r}")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"the prompt template {template!r} has braces other than one '{{}}'") from None


def check_classes(names: list[str], what: str = "--classes") -> list[str]:
    if not names:
        raise ConfigError(f"{what} is empty")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{what} holds an empty class name")
        if name in seen:
            raise ConfigError(f"class '{name}' is repeated in {what}")
        seen.add(name)
    return list(names)


def read_class_file(path: str | Path) -> list[str]:
    """One class name a line (blank lines and '#' comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the class file '{path}': {type(err).__name__}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class SourceImage:
    key: str
    label: int  # index into the run's classes
    unit: int  # where the DataSource keeps it: a shard (or an ImageFolder row) ...
    index: int  # ... and the record's index in it


@dataclass
class SourceScan:
    images: list[SourceImage]
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        body = json.dumps([[image.key, self.classes[image.label]] for image in self.images])
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


def read_record(raw: dict, counter: SkipCounter):
    """A source record decoded and validated (a Sample), or None after counting why. No caption is needed."""
    record = {**raw, "txt": b"-"}  # decode_sample insists on a caption; GeNIe reads only the image and the class
    return decode_sample(record, counter, with_regions=False)


def scan_source(source: DataSource, classes: list[str] | None) -> SourceScan:
    """Every usable labelled image of `source`, in storage order (images decoded once to find the corrupt ones).

    A record whose class name is not among `classes` is an error naming its key; so is a label with no name.
    Unreadable images, records without a label and repeated keys are skipped and counted.
    """
    if classes is None:
        if not source.classnames:
            raise ConfigError(f"--classes is needed: '{source.spec}' does not name its classes")
        classes = check_classes(list(source.classnames), f"the class names of '{source.spec}'")
    index_of = {name: i for i, name in enumerate(classes)}
    counter = SkipCounter()
    images: list[SourceImage] = []
    seen: set[str] = set()
    for unit, size in enumerate(source.unit_sizes()):
        for raw in source.read_unit(unit, 0, int(size), counter):
            sample = read_record(raw, counter)
            if sample is None:
                continue
            where = f"source image '{sample.key}' ({raw.get('__path__') or raw.get('__url__')})"
            if sample.classname is not None:
                if sample.classname not in index_of:
                    raise DataError(f"{where} is of class '{sample.classname}', which the class list does not hold")
                label = index_of[sample.classname]
            elif sample.label is not None:
                names = source.classnames or classes
                if not 0 <= sample.label < len(names) or names[sample.label] not in index_of:
                    raise DataError(f"{where} has label {sample.label}, which names no class of the class list")
                label = index_of[names[sample.label]]
            else:
                counter.skip("missing_label", where)
                continue
            if sample.key in seen:
                counter.skip("duplicate_key", where)
                continue
            seen.add(sample.key)
            images.append(SourceImage(sample.key, label, unit, int(raw.get("__index__", 0))))
    if not images:
        raise DataError(f"'{source.spec}' holds no usable labelled image")
    return SourceScan(images, list(classes), dict(counter))


@dataclass(frozen=True)
class Job:
    number: int  # position in the run's job list
    source: SourceImage
    slot: int  # the other class this sample is made for
    label: int  # the output's class (the slot, or the source's own class for img2img)

    def key(self) -> str:
        base = self.source.key if _KEY_OK.match(self.source.key) else \
            "src" + hashlib.blake2b(self.source.key.encode("utf-8"), digest_size=8).hexdigest()
        return f"{base}_to{self.slot}"


def resolve_targets(targets: list[str] | None, classes: list[str]) -> list[int]:
    if targets is None:
        return list(range(len(classes)))
    check_classes(targets, "--targets")
    unknown = [name for name in targets if name not in classes]
    if unknown:
        raise ConfigError(f"target class '{unknown[0]}' is not in the class list")
    return sorted(classes.index(name) for name in targets)


def plan_jobs(images: list[SourceImage], targets: list[int], mode: str) -> list[Job]:
    jobs: list[Job] = []
    for image in images:
        if mode == "img2img" and image.label not in targets:
            continue
        for slot in targets:
            if slot != image.label:
                jobs.append(Job(len(jobs), image, slot, image.label if mode == "img2img" else slot))
    return jobs


def job_seed(seed: int, job: Job, classes: list[str], ratio: float | None) -> int:
    """The sample's own seed, from (global seed, source key, target class, r); GeNIe-Ada passes r = None so the
    whole grid of one (source, target) shares its noise. Independent of batch size and of the number of ranks."""
    return sample_seed("genie", seed, job.source.key, classes[job.slot], "grid" if ratio is None else repr(ratio))


def units_of(jobs: list[Job], shard_size: int) -> list[list[Job]]:
    return [jobs[first:first + shard_size] for first in range(0, len(jobs), shard_size)]


def run_settings(options: GenieOptions, scan: SourceScan, targets: list[int], *, model_fingerprint: str,
                 dtype: str, embedder_id: str | None) -> dict:
    """What an output folder records and what a re-run must match (batch size and ranks are not in it)."""
    return {
        "mode": options.mode,
        "ratio": options.ratio,
        "adaptive": options.adaptive,
        "grid": list(options.grid) if options.adaptive else None,
        "embedder": embedder_id if options.adaptive else None,
        "classes": scan.classes,
        "targets": [scan.classes[t] for t in targets],
        "template": options.template,
        "steps": options.steps,
        "guidance": float(options.guidance),
        "scheduler": options.scheduler,
        "seed": options.seed,
        "shard_size": options.shard_size,
        "posterior": options.posterior,
        "dtype": dtype,
        "model": model_fingerprint,
        "source": {"num_images": len(scan.images), "fingerprint": scan.fingerprint()},
    }
