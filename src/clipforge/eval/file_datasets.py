"""Evaluation datasets read from files: ImageFolder, CSV and webdataset shards.

The files are read with the data pipeline's readers (clipforge.data.readers, clipforge.data.shards), so
evaluation accepts exactly what training accepts:

- ImageFolder: `root/<class>/<image>`; or `root/train/<class>/...` with `root/test/` (or `root/val/`), which
  also gives the linear probe its training set. Class names are folder names with `_` read as spaces, in
  sorted folder order (torchvision's label order); test labels are matched to the training classes by name.
- CSV: one row per (image, caption) (`filepath,caption`), the image path relative to the CSV file; rows of the
  same image become its several captions (retrieval).
- Webdataset shards (img2dataset or CLIP_benchmark layout): `key.{png,jpg,...}` with `key.txt` (captions, one
  per line), `key.json` (`label`, `classname`, `captions`, `regions`) and/or `key.cls` (label). Class names
  come from the shards' manifest, the json `classname` fields or a `classnames.txt` beside the shards. A
  folder with `train/` and `test/` shard folders also gives a training set. Unreadable samples are skipped,
  counted in the dataset's `info["skipped"]` and reported with a warning.

Every image is screened when listed with the guards training applies before decoding
(clipforge.data.samples): a FIFO, device or folder named as an image, a file over the size cap, a header over
the pixel limit or more elongated than MAX_ASPECT_RATIO is skipped, counted in `info["skipped"]` by kind and
reported with a warning, never decoded (a 375-byte 100000x1 PNG would take gigabytes once resized). An image
that fails to decode is still an error: an evaluation does not drop a corrupt image silently.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from clipforge.data.readers import read_csv, read_image_folder
from clipforge.data.samples import IMAGE_EXTENSIONS, SkipCounter, image_file_problem, image_header_problem
from clipforge.data.sources import detect_format, open_source
from clipforge.errors import DataError
from clipforge.eval.datasets import EncodedImages, EvalDataset, ImageFiles
from clipforge.eval.templates import load_classnames

TEST_SPLIT_NAMES = ("test", "val")
# what the listing skips and counts; anything else wrong with an image is an error when it is decoded
SCREENED_KINDS = ("missing_file", "not_a_regular_file", "file_too_large", "image_too_large", "image_too_elongated")


def _screen_images(images: list, names: list[str], counter: SkipCounter) -> list[int]:
    """Indices of the images (paths or encoded bytes) that pass the guards training applies before decoding;
    the others are counted by kind (SCREENED_KINDS)."""
    kept = []
    for index, image in enumerate(images):
        problem = image_file_problem(image) if isinstance(image, Path) else None
        problem = problem or image_header_problem(image)
        if problem in SCREENED_KINDS:
            counter.skip(problem, names[index])
        else:
            kept.append(index)
    return kept


def _warn_skipped(name: str, skipped: dict[str, int], kept: int) -> None:
    if skipped:
        warnings.warn(f"{name}: skipped unreadable samples {skipped}; the results cover the {kept} "
                      f"readable images", stacklevel=4)


# ----------------------------------------------------------------------------------------------------------
# ImageFolder


def _folder_split(root: Path, name: str, classnames: list[str] | None = None) -> EvalDataset:
    """One ImageFolder tree; with `classnames`, its labels are mapped onto that class list by name."""
    table = read_image_folder(root)
    labels = list(table.labels)
    if classnames is not None:
        index = {c: i for i, c in enumerate(classnames)}
        unknown = [c for c in table.classnames if c not in index]
        if unknown:
            raise DataError(f"ImageFolder '{root}': class folder '{unknown[0]}' is not among the training classes")
        labels = [index[table.classnames[label]] for label in labels]
    paths = [Path(p) for p in table.image_paths]
    counter = SkipCounter()
    kept = _screen_images(paths, [str(p) for p in paths], counter)
    paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    _warn_skipped(name, dict(counter), len(paths))
    return EvalDataset(name=name, images=ImageFiles(paths), keys=[str(p.relative_to(root)) for p in paths],
                       labels=labels, classnames=classnames or list(table.classnames),
                       info={"source": "imagefolder", "root": str(root), "skipped": dict(counter)})


def image_folder_dataset(root: str | Path, name: str | None = None) -> EvalDataset:
    """An ImageFolder tree; `root/train` + `root/test|val` gives the test set with its training set attached."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder '{root}' is not a folder")
    name = name or root.name
    train_root = root / "train"
    test_root = next((root / s for s in TEST_SPLIT_NAMES if (root / s).is_dir()), None)
    if train_root.is_dir() and test_root is not None:
        train = _folder_split(train_root, f"{name}-train")
        test = _folder_split(test_root, name, train.classnames)
        test.train = train
        return test
    return _folder_split(root, name)


# ----------------------------------------------------------------------------------------------------------
# CSV


def csv_dataset(path: str | Path, image_key: str = "filepath", caption_key: str = "caption", separator: str = ",",
                name: str | None = None) -> EvalDataset:
    """Rows (image path, caption); rows sharing an image path become that image's captions."""
    path = Path(path)
    table = read_csv(path, image_key, caption_key, separator)
    order: dict[str, int] = {}
    captions: list[list[str]] = []
    for row, (image, caption) in enumerate(zip(table.image_paths, table.captions), start=2):
        if not image:
            raise DataError(f"{path}: row {row} has an empty '{image_key}'")
        if image not in order:
            order[image] = len(order)
            captions.append([])
        text = caption.decode("utf-8", "replace").strip() if caption is not None else ""
        if text:
            captions[order[image]].append(text)
    if not order:
        raise DataError(f"{path}: no rows")
    paths = [Path(image) for image in order]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{path}: image '{missing[0]}' does not exist ({len(missing)} missing)")
    counter = SkipCounter()
    kept = _screen_images(paths, [str(p) for p in paths], counter)
    paths, captions = [paths[i] for i in kept], [captions[i] for i in kept]
    _warn_skipped(name or path.stem, dict(counter), len(paths))
    return EvalDataset(name=name or path.stem, images=ImageFiles(paths), keys=[p.name for p in paths],
                       captions=captions if any(captions) else None,
                       info={"source": "csv", "path": str(path), "skipped": dict(counter)})


# ----------------------------------------------------------------------------------------------------------
# Webdataset shards


def looks_like_shards(spec: str) -> bool:
    path = Path(spec)
    if path.is_dir() and any((path / s).is_dir() and list((path / s).glob("*.tar"))
                             for s in ("train",) + TEST_SPLIT_NAMES):
        return True
    try:
        return detect_format(spec) == "wds"
    except DataError:
        return False


def _image_extension(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def _shard_split(spec: str, name: str, classnames_file: Path | None) -> EvalDataset:
    source = open_source(spec, format="wds")
    counter = SkipCounter(strict=False)
    blobs, keys, labels, captions, regions, names_by_label = [], [], [], [], [], {}
    for sample in source.records(counter):
        extension = _image_extension(sample)
        if extension is None:
            counter.skip("no_image", sample["__key__"])
            continue
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            text_captions = sample["txt"].decode("utf-8").splitlines() if "txt" in sample else []
            label = meta.get("label")
            if label is None and "cls" in sample:
                label = int(sample["cls"].decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            counter.skip("bad_annotation", sample["__key__"])
            continue
        if not _screen_images([sample[extension]], [sample["__key__"]], counter):
            continue
        blobs.append(sample[extension])
        keys.append(sample["__key__"])
        captions.append([c.strip() for c in (meta.get("captions") or text_captions) if c.strip()])
        regions.append(list(meta.get("regions") or []))
        labels.append(label)
        if label is not None and meta.get("classname"):
            names_by_label.setdefault(int(label), meta["classname"])
    if not blobs:
        raise DataError(f"shards '{spec}' hold no images")
    skipped = dict(counter)
    if skipped:
        warnings.warn(f"{name}: skipped unreadable samples {skipped}; the results cover the {len(blobs)} "
                      f"readable images", stacklevel=3)
    has_labels = all(label is not None for label in labels)
    classnames = None
    if classnames_file is not None and classnames_file.is_file():
        classnames = load_classnames(classnames_file)
    elif source.classnames:
        classnames = list(source.classnames)
    elif has_labels and names_by_label and len(names_by_label) == max(names_by_label) + 1:
        classnames = [names_by_label[i] for i in range(len(names_by_label))]
    return EvalDataset(
        name=name, images=EncodedImages(blobs, keys), keys=keys,
        labels=labels if has_labels else None, classnames=classnames,
        captions=captions if any(captions) else None,
        regions=regions if any(regions) else None,
        info={"source": "webdataset", "shards": spec, "skipped": skipped},
    )


def webdataset_dataset(spec: str, name: str | None = None) -> EvalDataset:
    """Shards as an EvalDataset. A folder holding `train/` and `test/` (or `val/`) shard folders gives the test
    split with the training split attached (CLIP_benchmark's layout); `classnames.txt` there names the labels."""
    path = Path(spec)
    name = name or (path.name if path.is_dir() else path.stem.split("{")[0].rstrip("-_") or "shards")
    root = path if path.is_dir() else path.parent
    classnames_file = root / "classnames.txt"
    test_dir = next((path / s for s in TEST_SPLIT_NAMES if path.is_dir() and list((path / s).glob("*.tar"))),
                    None)
    if test_dir is not None:
        test = _shard_split(str(test_dir), name, classnames_file)
        if (path / "train").is_dir() and list((path / "train").glob("*.tar")):
            test.train = _shard_split(str(path / "train"), f"{name}-train", classnames_file)
        return test
    return _shard_split(spec, name, classnames_file)


# ----------------------------------------------------------------------------------------------------------


def _name_key(name: str) -> str:
    """How two spellings of one class name compare: case, `_` and runs of spaces do not matter."""
    return " ".join(name.replace("_", " ").lower().split())


def match_classnames(names: list[str], own: list[str], source: str, dataset_name: str) -> list[str]:
    """`names` (from a file, meant in label order) checked against a dataset's own class names `own` (e.g. its
    folder names, in label order). A permutation of `own` is put in label order by name (listing the folders
    in another order would otherwise give chance-level zero-shot with no word); a list that names some of the
    dataset's classes at other labels than theirs is refused; a list of new names (e.g. words for WordNet ids)
    is taken in label order."""
    if len(names) != len(own):
        raise DataError(f"{source}: {len(names)} class names but dataset '{dataset_name}' has {len(own)} classes")
    own_keys = [_name_key(name) for name in own]
    given = {_name_key(name): name for name in names}
    if set(given) == set(own_keys):
        if list(given) != own_keys:
            warnings.warn(f"{source}: the class names are the dataset's own in another order; they are matched to "
                          f"'{dataset_name}''s labels by name", stacklevel=3)
        return [given[key] for key in own_keys]
    for position, name in enumerate(names):
        key = _name_key(name)
        if key in own_keys and own_keys.index(key) != position:
            raise DataError(f"{source}: name {position + 1} {name!r} is class {own_keys.index(key) + 1} of dataset "
                            f"'{dataset_name}' (its label order); list the names in label order, or exactly the "
                            f"dataset's own names in any order")
    return names


def apply_classnames_file(dataset: EvalDataset, path: str | Path) -> None:
    """Name a dataset's classes from a file (one per line, in label order), checking the count matches; a
    dataset that names its classes (ImageFolder folders, shard manifests) has them matched by name
    (`match_classnames`)."""
    if dataset.labels is None:
        raise DataError(f"--classnames given but dataset '{dataset.name}' has no labels")
    names = load_classnames(path)
    if dataset.classnames is not None:
        names = match_classnames(names, dataset.classnames, str(path), dataset.name)
    needed = max(dataset.labels) + 1
    if dataset.train is not None and dataset.train.labels:
        needed = max(needed, max(dataset.train.labels) + 1)
    if len(names) < needed:
        raise DataError(f"{path}: {len(names)} class names but dataset '{dataset.name}' has label {needed - 1}")
    for part in [dataset, dataset.train, *dataset.variants.values()]:
        if part is not None:
            part.classnames = names
