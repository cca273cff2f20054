"""webdataset tar shards: an atomic writer, a safe streaming reader, and shard-URL resolution.

Layout (what img2dataset writes): one sample = the tar members that share a key, written contiguously,
e.g. `train-000000123.png`, `train-000000123.txt`, `train-000000123.json`. Interleaved documents put their
images beside the JSON as `doc-000000007.0.png`, `doc-000000007.1.png`. The key is everything before
the first dot of the member's basename (webdataset's rule), so keys never contain dots.

Beside the shards the writer puts `manifest.json` (shard names, sample counts, the settings that
produced them) and open_clip's `sizes.json` ({shard name: count}), so readers know the dataset size
without scanning.

The reader uses only the standard library's `tarfile`. It never extracts to disk, refuses member names
that are absolute or contain `..`, and treats a truncated or unreadable shard as a counted problem
(`shard_truncated`, `shard_unreadable`), not a crash. webdataset's own reader is not used because its
tar grouping changed behaviour across versions (webdataset's tar grouping; open_clip#935).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clipforge.errors import DataError

MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"  # open_clip's name for {shard basename: sample count}
MANIFEST_FORMAT = "clipforge.shards/1"
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a single member larger than this is refused (memory safety)

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file and how many samples it holds."""

    url: str
    num_samples: int
    unreadable: bool = False  # could not be opened when listed (it still gets one place in the stream)


@dataclass
class ShardManifest:
    shards: list[ShardInfo]
    meta: dict

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


# ----------------------------------------------------------------------------------------------------------
# Writing


def _member_bytes(ext: str, value) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict | list):  # a JSON member given as an object
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):  # e.g. a .cls label
        return str(value).encode("ascii")
    raise TypeError(f"member '{ext}' has unsupported type {type(value).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata so the same records give byte-identical shards
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shards(
    records: Iterable[dict],
    out_dir: str | Path,
    shard_size: int,
    prefix: str = "shard",
    progress: Callable[[int], None] | None = None,
    meta: dict | None = None,
) -> ShardManifest:
    """Write records ({"__key__": str, ext: bytes|str|dict, ...}) into `prefix-000000.tar`, ... .

    Each shard is written under a temporary name and renamed into place (atomic); the manifest is
    written last, so its presence means the set is complete. Shards of an earlier, larger write with the
    same prefix are removed. `progress(samples_written)` is called after every sample.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"cannot write shards into '{out}': it exists and is not a folder") from None
    except OSError as err:  # a parent that is a file, no permission, a read-only disk
        raise DataError(f"cannot write shards into '{out}': {err.strerror or type(err).__name__}") from None
    shards: list[ShardInfo] = []
    names: list[str] = []
    tar = tmp_path = None
    in_shard = written = 0

    def close_shard() -> None:
        tar.close()
        final = out / names[-1]
        os.replace(tmp_path, final)
        shards.append(ShardInfo(str(final), in_shard))

    try:
        for record in records:
            key = record.get("__key__")
            if not isinstance(key, str) or not _KEY_OK.match(key):
                raise DataError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots or slashes)")
            if tar is None:
                names.append(f"{prefix}-{len(names):06d}.tar")
                tmp_path = out / f".{names[-1]}.{os.getpid()}.tmp"
                try:
                    tar = tarfile.open(tmp_path, "w", format=tarfile.PAX_FORMAT)
                except OSError as err:  # e.g. a read-only folder
                    raise DataError(f"cannot write shards into '{out}': {err.strerror or type(err).__name__}") from None
                in_shard = 0
            for ext in sorted(k for k in record if not k.startswith("__")):
                _add_member(tar, f"{key}.{ext}", _member_bytes(ext, record[ext]))
            in_shard += 1
            written += 1
            if progress is not None:
                progress(written)
            if in_shard == shard_size:
                close_shard()
                tar = None
        if tar is not None:
            close_shard()
            tar = None
    finally:
        if tar is not None:  # an exception mid-shard: leave no half-written file behind
            tar.close()
            tmp_path.unlink(missing_ok=True)

    keep = set(names)
    for stale in out.glob(f"{prefix}-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    manifest = ShardManifest(shards, dict(meta or {}))
    body = {
        "format": MANIFEST_FORMAT,
        "num_samples": manifest.num_samples,
        "shards": [
            {"name": Path(s.url).name, "num_samples": s.num_samples, "bytes": Path(s.url).stat().st_size}
            for s in shards
        ],
        "meta": manifest.meta,
    }
    _atomic_write_text(out / SIZES_NAME, json.dumps({Path(s.url).name: s.num_samples for s in shards}, indent=1))
    _atomic_write_text(out / MANIFEST_NAME, json.dumps(body, indent=1, sort_keys=True))
    return manifest


def _is_regular_file(path: str | Path) -> bool:
    """Only regular files are opened: a FIFO named `x.tar` or `manifest.json` would block the reader forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a shard folder, or None if there is none or it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    if not _is_regular_file(path):
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        return None
    return body


def manifest_is_complete(folder: str | Path, meta: dict) -> bool:
    """True if `folder` holds a finished shard set written with exactly these settings (`meta`)."""
    body = read_manifest(folder)
    if body is None or body.get("meta") != meta:
        return False
    for shard in body.get("shards", []):
        path = Path(folder) / shard["name"]
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Reading


def split_member_name(name: str) -> tuple[str, str] | None:
    """'dir/key.0.png' -> ('dir/key', '0.png'); None for a name without an extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


def _unsafe_name(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or ":" in name.split("/")[0]


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """True if the archive ends with the zero block a complete tar has (a cut file usually does not)."""
    try:
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, tarfile.TarError):
        return False
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def iter_tar_samples(url: str, counter, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Yield the samples of one shard as {"__key__", "__url__", ext: bytes} (samples start..stop-1).

    Samples before `start` are walked over by their headers only (their data is not read), which is
    how a resumed or split stream skips ahead cheaply. Problems are reported to `counter.skip(kind,
    where)`: `shard_unreadable`, `shard_truncated` (the partial sample at the break is dropped),
    `unsafe_member`, `member_no_extension`, `member_too_large`, `duplicate_key`, `duplicate_member`.

    A problem is reported only by the reader whose range [start, stop) holds the sample it belongs to (a
    stray member belongs to the sample before it; what comes before the first sample, and an archive that
    cannot be opened, to the reader that starts at 0). A shard split over several workers or ranks thus
    reports each problem once, not once per reader that walks past it.
    """
    index = -1  # index of the sample being read
    current_key = None
    current: dict | None = None
    seen: set[str] = set()
    duplicate = False

    def in_range() -> bool:  # does the sample being read (index) belong to this reader?
        return max(index, 0) >= start

    if not _is_regular_file(url):  # missing, a folder, a FIFO, a device: never opened
        if in_range():
            counter.skip("shard_unreadable", f"{url}: not a regular file")
        return
    try:
        tar = tarfile.open(url, mode="r:*")
    except (OSError, tarfile.TarError, EOFError) as err:
        if in_range():
            counter.skip("shard_unreadable", f"{url}: {type(err).__name__}")
        return
    try:
        with tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError) as err:
                    if in_range():
                        counter.skip("shard_truncated", f"{url} after sample {index}: {type(err).__name__}")
                    return
                if member is None:
                    if not _ends_cleanly(tar):  # tarfile takes a cut at a header for the end: we do not
                        if in_range():
                            counter.skip("shard_truncated", f"{url}: no end-of-archive marker after sample {index}")
                        return
                    break
                if member.isdir():
                    continue
                if _unsafe_name(member.name) or not member.isfile():
                    if in_range():
                        counter.skip("unsafe_member", f"{url}: {member.name!r}")
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    if in_range():
                        counter.skip("member_no_extension", f"{url}: {member.name!r}")
                    continue
                key, ext = parts
                if key != current_key:
                    if current is not None and not duplicate:
                        yield current
                    index += 1
                    current_key, current, duplicate = key, None, key in seen
                    seen.add(key)
                    if stop is not None and index >= stop:
                        return
                    if duplicate:
                        if in_range():
                            counter.skip("duplicate_key", f"{url}: {key!r} appears twice")
                    elif index >= start:
                        current = {"__key__": key, "__url__": url, "__index__": index}
                if current is None:  # skipping ahead, or a duplicate: headers only
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    counter.skip("member_too_large", f"{url}: {member.name!r} is {member.size} bytes")
                    continue
                try:
                    data = tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError) as err:
                    counter.skip("shard_truncated", f"{url} in {member.name!r}: {type(err).__name__}")
                    return
                if ext in current:  # a second member with the same name: keep the first
                    counter.skip("duplicate_member", f"{url}: {member.name!r}")
                    continue
                current[ext] = data
            if current is not None and not duplicate:
                yield current
    except (tarfile.TarError, EOFError, OSError) as err:  # pragma: no cover - defensive
        if in_range():
            counter.skip("shard_truncated", f"{url}: {type(err).__name__}")


def count_tar_samples(url: str) -> int | None:
    """Number of samples (key groups) in a shard, from its headers; None if it cannot be opened at all.
    A shard broken part-way counts what is readable."""
    count, last = 0, None
    if not _is_regular_file(url):
        return None
    try:
        tar = tarfile.open(url, mode="r:*")
    except (OSError, tarfile.TarError, EOFError):
        return None
    try:
        with tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                parts = split_member_name(member.name) if member.isfile() else None
                if parts and parts[0] != last:
                    count, last = count + 1, parts[0]
    except (OSError, tarfile.TarError, EOFError):
        pass
    return count


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; also '{x,y}' lists; nests left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _folder_counts(folder: Path) -> dict[str, int]:
    body = read_manifest(folder)
    if body is not None:
        return {s["name"]: int(s["num_samples"]) for s in body.get("shards", [])}
    if not _is_regular_file(folder / SIZES_NAME):
        return {}
    try:
        sizes = json.loads((folder / SIZES_NAME).read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in sizes.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def resolve_shards(spec: str) -> list[ShardInfo]:
    """Shards named by a folder, a glob, a brace pattern (`data/shard-{000000..000009}.tar`) or a .tar
    path; several specs may be joined with '::'. Sample counts come from the folder's manifest.json or
    sizes.json when present, otherwise from the tar headers. Raises DataError if nothing matches."""
    shards: list[ShardInfo] = []
    for part in spec.split("::"):
        paths: list[Path]
        folder = Path(part)
        if folder.is_dir():
            body = read_manifest(folder)
            if body is not None:
                paths = [folder / s["name"] for s in body.get("shards", [])]
            else:
                paths = sorted(p for p in folder.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        elif any(c in part for c in "{}"):
            paths = [Path(p) for p in expand_braces(part)]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"shard '{missing[0]}' of '{part}' does not exist ({len(missing)} missing)")
        elif any(c in part for c in "*?["):
            paths = sorted(Path(p) for p in glob.glob(part))
            if not paths:
                raise DataError(f"no shard matches '{part}'")
        elif folder.is_file():
            paths = [folder]
        else:
            raise DataError(f"data path '{part}' does not exist")
        counts_by_folder: dict[Path, dict[str, int]] = {}
        for path in paths:
            counts = counts_by_folder.setdefault(path.parent, _folder_counts(path.parent))
            count = counts.get(path.name)
            if count is not None:
                shards.append(ShardInfo(str(path), count))
                continue
            count = count_tar_samples(str(path))
            # a shard that cannot be opened keeps one place in the stream, so the reader meets it and
            # reports it (shard_unreadable) every epoch instead of it vanishing silently
            shards.append(ShardInfo(str(path), 1, unreadable=True) if count is None else ShardInfo(str(path), count))
    return shards
