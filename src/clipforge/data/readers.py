"""CSV and ImageFolder readers: index-addressable tables whose rows become raw records.

Both produce the same raw-record shape as shards ({"__key__", "__url__", ...}) so one validation path
(`samples.decode_sample`) handles every source. The image file itself is not read here: the record
carries `__path__` and the decoder reads it, so replaying a stream on resume costs no I/O.

- CSV: a header row naming at least the image column (`data.csv_image_key`, default `filepath`) and the
  caption column (`data.csv_caption_key`, default `caption`), separated by `data.csv_separator`.
  Relative image paths are resolved against the CSV file's folder. Captions that are not valid UTF-8
  are passed on as their raw bytes, so the decoder counts them as `caption_not_utf8`.
- ImageFolder: `root/<class name>/<image>`; classes sorted by folder name give the labels 0..C-1; the
  classname is the folder name with '_' read as a space, and it also serves as the caption. Images in
  subfolders of a class folder belong to it, and symlinked folders are followed, as torchvision's ImageFolder
  does; each real folder is entered once per class, so a symlink loop ends. Every entry with an image
  extension is listed, so a FIFO or a dangling link named `x.png` is counted when read
  (`not_a_regular_file`, `missing_file`), not dropped silently.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.samples import IMAGE_EXTENSIONS
from clipforge.errors import DataError


def _safe_key_part(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text)[:limit].strip("_") or "x"


@dataclass
class CsvTable:
    """Rows of a `filepath,caption` CSV. `record(i)` -> raw record."""

    path: str
    image_paths: list[str]
    captions: list[bytes | None]  # None = the row has no caption cell

    def __len__(self) -> int:
        return len(self.image_paths)

    def record(self, index: int) -> dict:
        image_path = self.image_paths[index]
        raw = {
            "__key__": f"row-{index:09d}-{_safe_key_part(Path(image_path).stem)}",
            "__url__": self.path,
            "__path__": image_path,
        }
        if self.captions[index] is not None:
            raw["txt"] = self.captions[index]
        return raw


def read_csv(path: str | Path, image_key: str = "filepath", caption_key: str = "caption",
             separator: str = ",") -> CsvTable:
    path = Path(path)
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"CSV file '{path}' {problem}")
    if separator in ("\\t", "tab"):  # accept the spellings people type on a command line
        separator = "\t"
    # surrogateescape keeps undecodable bytes so that one bad caption is counted, not fatal for the file
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=separator)
        header = next(reader, None)
        if header is None:
            raise DataError(f"CSV file '{path}' is empty")
        header = [h.strip().lstrip("\ufeff") for h in header]
        for needed in (image_key, caption_key):
            if needed not in header:
                raise DataError(f"CSV file '{path}' has no column '{needed}' (columns: {', '.join(header)}; "
                                f"separator {separator!r}, see data.csv_image_key/csv_caption_key/csv_separator)")
        image_col, caption_col = header.index(image_key), header.index(caption_key)
        image_paths, captions = [], []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            image_cell = row[image_col].strip() if image_col < len(row) else ""
            image_path = Path(image_cell)
            if image_cell and not image_path.is_absolute():
                image_path = path.parent / image_path
            image_paths.append(str(image_path) if image_cell else "")
            caption = row[caption_col] if caption_col < len(row) else None
            captions.append(caption.encode("utf-8", "surrogateescape") if caption is not None else None)
    return CsvTable(str(path), image_paths, captions)


@dataclass
class ImageFolderTable:
    """Images under `root/<class>/`. `record(i)` -> raw record with label and classname."""

    root: str
    classnames: list[str]
    image_paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.image_paths)

    def record(self, index: int) -> dict:
        label = self.labels[index]
        classname = self.classnames[label]
        return {
            "__key__": f"img-{index:09d}-{_safe_key_part(Path(self.image_paths[index]).stem)}",
            "__url__": self.root,
            "__path__": self.image_paths[index],
            "cls": str(label).encode("ascii"),
            "classname": classname,
            "txt": classname.encode("utf-8"),
        }


def image_files_under(folder: str | Path) -> Iterator[Path]:
    """Entries with an image extension under `folder`, at any depth, following symlinked folders; each real
    folder (device, inode) is entered once, so a symlink loop ends. In no particular order (sort them)."""
    suffixes = {f".{ext}" for ext in IMAGE_EXTENSIONS}
    entered: set[tuple[int, int]] = set()
    pending = [Path(folder)]
    while pending:
        directory = pending.pop()
        try:
            info = directory.stat()
            if (info.st_dev, info.st_ino) in entered:
                continue
            entered.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(directory))
        except OSError:  # unreadable, or gone since it was listed
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(directory / entry.name)
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                yield directory / entry.name


def read_image_folder(root: str | Path) -> ImageFolderTable:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder root '{root}' does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"ImageFolder root '{root}' has no class folders")
    classnames, image_paths, labels = [], [], []
    for label, class_dir in enumerate(class_dirs):
        classnames.append(class_dir.name.replace("_", " "))
        for file in sorted(image_files_under(class_dir)):
            image_paths.append(str(file))
            labels.append(label)
    if not image_paths:
        raise DataError(f"ImageFolder root '{root}' has class folders but no images")
    return ImageFolderTable(str(root), classnames, image_paths, labels)
