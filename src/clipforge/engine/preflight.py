"""Checks that run before the first step: the run folder (writable, not someone else's run, not in use)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from clipforge.errors import ConfigError

LOCK_FILE = ".lock"
# what a run writes into its folder; a fresh run into a folder holding any of these needs --overwrite
RUN_RECORDS = ("checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "tb", "plots")


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


def check_not_a_previous_run(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A fresh start in a folder that holds a run would truncate its history and overwrite its checkpoints
    (and a later resume's pruning would then delete the new ones): refuse unless told to start over."""
    if resume is not None or overwrite or not run_dir.is_dir():
        return
    found = [name for name in RUN_RECORDS if (run_dir / name).exists()]
    if found:
        raise ConfigError(f"output folder '{run_dir}' already holds a run ({found[0]}); continue it with "
                          f"--resume latest, set a new output_dir, or pass --overwrite to start it over")


def clear_previous_run(run_dir: Path) -> None:
    """--overwrite: remove the previous run's records (SynthScenes data generated in data/ is kept)."""
    for name in RUN_RECORDS + ("eval", "eval_suite.json", "report.html"):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class RunLock:
    """An exclusive lock on a run folder for the life of a training (released by the OS if the process dies)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.handle = None

    def acquire(self) -> RunLock:
        try:
            self.handle = open(self.run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until release()
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            raise ConfigError(f"output folder '{self.run_dir}' is in use by another training (pid "
                              f"{_lock_owner(self.run_dir)}); wait for it or set another output_dir") from None
        except OSError as err:
            _not_writable(self.run_dir, err)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def check_not_locked(run_dir: Path) -> None:
    """Fail fast (before building anything) when another training holds the folder."""
    if (run_dir / LOCK_FILE).is_file():
        RunLock(run_dir).acquire().release()


def _lock_owner(run_dir: Path) -> str:
    try:
        return (run_dir / LOCK_FILE).read_text().strip()[:12] or "?"
    except OSError:
        return "?"
