"""Checks that run before the first step, and the JSON form of the data loader's resume position."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from clipforge.errors import ConfigError


def check_output_dir(run_dir: Path) -> None:
    """The run folder exists or can be created, and accepts files; ConfigError with one line otherwise.

    Nothing is left behind: a config rejected by a later check must not leave a run folder, so a folder that
    does not exist yet is not created here; its nearest existing parent must accept a new folder instead.
    """
    run_dir = Path(run_dir)
    target = run_dir
    while not target.exists() and target.parent != target:
        target = target.parent
    try:
        if not target.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        # a probe folder, not os.access: root passes os.access everywhere, even where mkdir fails (/proc)
        shutil.rmtree(tempfile.mkdtemp(prefix=".write-test-", dir=target))
    except OSError as err:
        _not_writable(run_dir, err)


def make_output_dir(run_dir: Path) -> None:
    """Create the run folder (once every preflight check passed); ConfigError with one line on failure."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _not_writable(run_dir, err)


def _not_writable(run_dir: Path, err: OSError):
    reason = err.strerror or type(err).__name__
    raise ConfigError(f"output folder '{run_dir}' is not writable ({reason}); set output_dir to another "
                      f"folder") from None


def data_position_to_json(position):
    """The loader's DataPosition as plain JSON values (it is a dataclass or already a mapping)."""
    if position is None:
        return None
    if hasattr(position, "to_dict"):
        return position.to_dict()
    if dataclasses.is_dataclass(position):
        return dataclasses.asdict(position)
    return position


def data_position_from_json(payload):
    """The inverse of data_position_to_json, using the pipeline's DataPosition type."""
    if payload is None:
        return None
    from clipforge.data.pipeline import DataPosition

    if hasattr(DataPosition, "from_dict"):
        return DataPosition.from_dict(payload)
    if dataclasses.is_dataclass(DataPosition) and isinstance(payload, dict):
        return DataPosition(**payload)
    return payload
