"""Evaluation datasets: one in-memory description that every task reads, whatever the source.

An `EvalDataset` is a list of images with whatever annotations the source has: class labels and names
(classification, linear probe, few-shot), several captions per image (retrieval), captioned boxes (region
tasks), a paired labelled training set (linear probe, robustness baseline), shifted renderings of the same
items (robustness) and SynthScenes' scene annotations: objects and relations (code probes). Tasks ask for
what they need; the suite skips a task whose needs a dataset lacks.

Sources: SynthScenes (generated in memory, every variant, base and novel classes; see `synth_eval_datasets`),
ImageFolder, CSV and webdataset shards (clipforge.eval.file_datasets). `load_eval_datasets(spec)` picks one.
Images are decoded lazily, one at a time, by the feature pass.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clipforge.data.samples import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, image_size_problem, to_rgb
from clipforge.errors import DataError
from clipforge.eval.templates import check_classnames

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def open_rgb(source, name: str) -> Image.Image:
    """Decode one image (a path or a file object) to RGB the way training does (clipforge.data.samples:
    transparency over white, 16-bit grey scaled). A corrupt file or a decompression bomb is a DataError: an
    evaluation never drops an image silently."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # reads the header only
                too_big = image_size_problem(image.width, image.height)  # the guard training uses
                if too_big is not None:
                    raise DataError(f"image {name} is {image.width}x{image.height} pixels ({too_big}: at most "
                                    f"{DEFAULT_MAX_PIXELS} pixels and {MAX_ASPECT_RATIO}:1)")
                image.load()
                rgb, problem = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {name} is too large to decode safely (decompression bomb)") from None
    except DataError:
        raise
    except Exception as err:  # Pillow plugins raise many types for corrupt files
        raise DataError(f"image {name} could not be decoded ({type(err).__name__})") from None
    if rgb is None:
        raise DataError(f"image {name} has an unsupported mode ({problem})")
    return rgb


class EncodedImages(Sequence):
    """Images kept as encoded bytes (PNG/JPEG), decoded to RGB PIL images on access."""

    def __init__(self, blobs: list[bytes], names: list[str] | None = None):
        self.blobs = blobs
        self.names = names

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> Image.Image:
        return open_rgb(io.BytesIO(self.blobs[index]), self.names[index] if self.names else f"#{index}")


class ImageFiles(Sequence):
    """Images on disk, opened on access."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return open_rgb(self.paths[index], f"'{self.paths[index]}'")


@dataclass(eq=False)  # identity semantics: features are cached per dataset object
class EvalDataset:
    """Images plus the annotations a source provides. `labels[i]` indexes `classnames`."""

    name: str
    images: Sequence  # [N] PIL images (or a lazy sequence of them)
    keys: list[str] | None = None  # [N] sample ids (default: index as text)
    labels: list[int] | None = None  # [N]
    classnames: list[str] | None = None  # [C]
    captions: list[list[str]] | None = None  # [N] several captions per image
    regions: list[list[dict]] | None = None  # [N] [{"box": [x0, y0, x1, y1], "caption": str}, ...]
    train: EvalDataset | None = None  # labelled training images of the same classes
    variants: dict[str, EvalDataset] = field(default_factory=dict)  # same items, shifted rendering
    info: dict = field(default_factory=dict)  # provenance (source, split, seed, variant, ...)
    scenes: list[dict] | None = None  # [N] SynthScenes annotations {"objects": [...], "relations": [...]}

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise DataError(f"dataset '{self.name}' has no images")
        if self.keys is None:
            self.keys = [str(i) for i in range(n)]
        for what in ("keys", "labels", "captions", "regions", "scenes"):
            values = getattr(self, what)
            if values is not None and len(values) != n:
                raise DataError(f"dataset '{self.name}': {len(values)} {what} for {n} images")
        if self.classnames is not None:
            self.classnames = check_classnames(list(self.classnames), source=f"dataset '{self.name}'")
        if self.labels is not None:
            self.labels = [int(label) for label in self.labels]
            bad = [label for label in self.labels if label < 0]
            if bad:
                raise DataError(f"dataset '{self.name}': negative label {bad[0]}")
            if self.classnames is not None and max(self.labels) >= len(self.classnames):
                raise DataError(f"dataset '{self.name}': label {max(self.labels)} but only "
                                f"{len(self.classnames)} class names")
        for variant_name, variant in self.variants.items():
            if len(variant) != n:
                raise DataError(f"dataset '{self.name}': variant '{variant_name}' has {len(variant)} images, "
                                f"expected {n}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        if self.classnames is not None:
            return len(self.classnames)
        return max(self.labels) + 1 if self.labels else 0

    def describe(self) -> dict:
        """What a result file records about the data."""
        return {
            "name": self.name,
            "num_images": len(self),
            "num_classes": self.num_classes if self.labels is not None else None,
            "num_captions": sum(len(c) for c in self.captions) if self.captions is not None else None,
            "num_train": len(self.train) if self.train is not None else None,
            "variants": sorted(self.variants),
            **self.info,
        }


# ----------------------------------------------------------------------------------------------------------
# SynthScenes


def _records_to_dataset(
    name: str, records: list[dict], label_map: dict[int, int] | None, classnames: list[str], info: dict
) -> EvalDataset:
    """Records (webdataset dicts from SynthScenes) -> EvalDataset; `label_map` maps global -> local labels."""
    blobs, keys, labels, captions, regions, scenes = [], [], [], [], [], []
    for record in records:
        meta = json.loads(record["json"])
        blobs.append(record["png"])
        keys.append(record["__key__"])
        label = int(meta["label"])
        if label_map is not None:
            if label not in label_map:
                raise DataError(f"{name}: sample {record['__key__']} has label {label} outside this split")
            label = label_map[label]
        labels.append(label)
        captions.append(list(meta.get("captions") or [meta["caption"]]))
        regions.append(list(meta.get("regions") or []))
        scenes.append({"objects": meta.get("objects") or [], "relations": meta.get("relations") or []})
    return EvalDataset(name=name, images=EncodedImages(blobs, keys), keys=keys, labels=labels,
                       classnames=classnames, captions=captions, regions=regions, info=info, scenes=scenes)


def _generate(generator, start: int, stop: int, variant: str, stage: str, progress: ProgressFn | None) -> list:
    records = []
    total = stop - start
    for record in generator.records(start, stop, variant=variant):
        records.append(record)
        if progress is not None and (len(records) % 64 == 0 or len(records) == total):
            progress(stage, len(records), total)
    return records


def synth_eval_datasets(
    num_eval: int = 1000,
    num_train: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    omit_fraction: float = 0.3,
    variants: Sequence[str] | None = None,
    groups: Sequence[str] = ("base", "novel"),
    progress: ProgressFn | None = None,
) -> list[EvalDataset]:
    """SynthScenes evaluation sets, generated in memory (same arguments, same images).

    - `synthscenes-base`: `num_eval` held-out scenes (split "val") of the 48 base classes, with captions and
      regions; its `train` is the first `num_train` scenes of split "train" (what a run with this seed trains
      on); its `variants` are the same scenes rendered with each shift (background, outline, noise, blur, scale).
    - `synthscenes-novel`: `num_eval` scenes whose main object is one of the 16 novel colour+shape classes never
      named in training captions; its `train` is a disjoint block of the novel split (for the linear probe).
    Labels index the dataset's own class list (base or novel names, in label order). `groups` picks which of
    the two sets to build; `variants` which shifts (default: all).
    """
    from clipforge.data import synth

    num_train = num_eval if num_train is None else num_train
    if num_eval < 1 or num_train < 1:
        raise DataError(f"SynthScenes evaluation needs num_eval >= 1 and num_train >= 1, got {num_eval}, "
                        f"{num_train}")
    variants = [v for v in (synth.VARIANTS if variants is None else variants) if v != "original"]
    unknown = [v for v in variants if v not in synth.VARIANTS]
    if unknown:
        raise DataError(f"unknown SynthScenes variant '{unknown[0]}' (known: {', '.join(synth.VARIANTS)})")

    def make(split: str):
        return synth.SynthScenes(image_size=image_size, seed=seed, split=split, omit_fraction=omit_fraction)

    def info(split: str, start: int, stop: int, variant: str = "original") -> dict:
        return {"source": "synthscenes", "split": split, "indices": [start, stop], "variant": variant,
                "seed": seed, "image_size": image_size, "omit_fraction": omit_fraction}

    known_groups = {"base": ("val", synth.BASE_CLASSES), "novel": ("novel", synth.NOVEL_CLASSES)}
    unknown = [g for g in groups if g not in known_groups]
    if unknown:
        raise DataError(f"unknown SynthScenes evaluation group '{unknown[0]}' (known: base, novel)")
    datasets = []
    for group in groups:
        split, class_ids = known_groups[group]
        label_map = {label: i for i, label in enumerate(class_ids)}
        classnames = [synth.CLASSNAMES[label] for label in class_ids]
        name = f"synthscenes-{group}"
        generator = make(split)
        records = _generate(generator, 0, num_eval, "original", f"generate {name}", progress)
        dataset = _records_to_dataset(name, records, label_map, classnames, info(split, 0, num_eval))
        # the training set: what a run trains on (base), or a disjoint block of the novel split
        train_split, start = ("train", 0) if group == "base" else (split, num_eval)
        train_records = _generate(make(train_split), start, start + num_train, "original",
                                  f"generate {name} train", progress)
        dataset.train = _records_to_dataset(f"{name}-train", train_records, label_map, classnames,
                                            info(train_split, start, start + num_train))
        if group == "base":
            for variant in variants:
                shifted = _generate(generator, 0, num_eval, variant, f"generate {name} {variant}", progress)
                dataset.variants[variant] = _records_to_dataset(
                    f"{name}-{variant}", shifted, label_map, classnames, info(split, 0, num_eval, variant)
                )
        datasets.append(dataset)
    return datasets


# ----------------------------------------------------------------------------------------------------------
# Picking a source


def load_eval_datasets(
    spec: str | Sequence[str],
    *,
    classnames_file: str | Path | None = None,
    num_eval: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    omit_fraction: float = 0.3,
    csv_image_key: str = "filepath",
    csv_caption_key: str = "caption",
    csv_separator: str | None = None,
    progress: ProgressFn | None = None,
) -> list[EvalDataset]:
    """`synth` -> the SynthScenes sets; a `.csv` / `.tsv` file; a folder of `.tar` shards, a `.tar` file or a
    brace/glob pattern of shards; or an ImageFolder root (class subfolders, optionally under train/ and test/).

    A list of specs gives all their datasets, each once, with names that are unique: two that would share a
    name (e.g. `a/val.csv` and `b/val.csv`) are prefixed with their parent folder's name (`a-val`, `b-val`).
    `csv_separator` None means `,` for .csv and a tab for .tsv.
    """
    specs = [spec] if isinstance(spec, str) else list(dict.fromkeys(spec))  # a spec given twice counts once
    if not specs:
        raise DataError("no evaluation dataset given")
    loaded = [(item, _load_one(item, classnames_file=classnames_file, num_eval=num_eval, image_size=image_size,
                               seed=seed, omit_fraction=omit_fraction, csv_image_key=csv_image_key,
                               csv_caption_key=csv_caption_key, csv_separator=csv_separator, progress=progress))
              for item in specs]
    return _unique_names(loaded)


def _load_one(spec: str, *, classnames_file, num_eval, image_size, seed, omit_fraction, csv_image_key,
              csv_caption_key, csv_separator, progress) -> list[EvalDataset]:
    from clipforge.eval import file_datasets

    if spec == "synth":
        if classnames_file is not None:
            raise DataError("--classnames cannot be used with the SynthScenes dataset (it names its classes)")
        return synth_eval_datasets(num_eval=num_eval, image_size=image_size, seed=seed,
                                   omit_fraction=omit_fraction, progress=progress)
    path = Path(spec)
    if spec.lower().endswith((".csv", ".tsv")):
        separator = csv_separator or ("\t" if spec.lower().endswith(".tsv") else ",")
        dataset = file_datasets.csv_dataset(path, image_key=csv_image_key, caption_key=csv_caption_key,
                                            separator=separator)
    elif file_datasets.looks_like_shards(spec):
        dataset = file_datasets.webdataset_dataset(spec)
    elif path.is_dir():
        dataset = file_datasets.image_folder_dataset(path)
    else:
        raise DataError(f"dataset '{spec}' does not exist (expected 'synth', a .csv or .tsv file, shards or a "
                        f"folder)")
    if classnames_file is not None:
        file_datasets.apply_classnames_file(dataset, classnames_file)
    return [dataset]


def rename_dataset(dataset: EvalDataset, name: str) -> None:
    """Give `dataset` a new name; its training set and variants, named after it, follow."""
    old = dataset.name
    for part in [dataset.train, *dataset.variants.values()]:
        if part is not None and part.name.startswith(old):
            part.name = name + part.name[len(old):]
    dataset.name = name


def _unique_names(loaded: list[tuple[str, list[EvalDataset]]]) -> list[EvalDataset]:
    """The datasets of every spec, renamed where two specs give one name; DataError when that is not enough."""
    from clipforge.eval.results import safe_name

    owners: dict[str, set[str]] = {}
    for spec, datasets in loaded:
        for dataset in datasets:
            owners.setdefault(safe_name(dataset.name), set()).add(spec)
    for spec, datasets in loaded:
        for dataset in datasets:
            if len(owners[safe_name(dataset.name)]) > 1:
                parent = Path(spec).resolve().parent.name or "root"
                rename_dataset(dataset, f"{parent}-{dataset.name}")
    seen: dict[str, str] = {}
    for spec, datasets in loaded:
        for dataset in datasets:
            key = safe_name(dataset.name)
            if key in seen and seen[key] != spec:
                raise DataError(f"datasets '{seen[key]}' and '{spec}' would both be named '{dataset.name}' (their "
                                f"results would overwrite each other); rename one")
            seen[key] = spec
    return [dataset for _, datasets in loaded for dataset in datasets]
