"""What a run leaves behind: metrics.jsonl, TensorBoard events, PNG plots and summary.json.

Only rank 0 writes. On resume, records after the resumed step are dropped (from metrics.jsonl, and from
TensorBoard with `purge_step`) so that the history reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# record keys that are not curves; every other number a run recorded gets a plot
NOT_PLOTTED = ("step", "epoch", "time", "event")


def split_sample_counts(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(skipped, repaired-and-kept) sample counts: a converted CMYK image was not skipped."""
    from clipforge.data.samples import REPAIR_KINDS_PREFIX

    skipped = {k: v for k, v in counts.items() if not k.startswith(REPAIR_KINDS_PREFIX)}
    repaired = {k: v for k, v in counts.items() if k.startswith(REPAIR_KINDS_PREFIX)}
    return skipped, repaired


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class RunRecorder:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.metrics_path.is_file():
            kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            temporary = self.metrics_path.with_name("metrics.jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(temporary, self.metrics_path)
        elif resume_step is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run in an old folder starts a fresh history
        self.handle = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            prefix = "eval/" if record.get("event") == "eval" else "train/"
            for key, value in record.items():
                if key not in ("step", "event", "epoch") and isinstance(value, int | float):
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_plots(run_dir: Path, records: list[dict]) -> list[Path]:
    """One PNG per numeric key the training records hold (loss, lr, every objective metric); returns the files."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files
    import matplotlib.pyplot as plt

    train_records = [r for r in records if r.get("event") is None]
    keys = dict.fromkeys(k for r in train_records for k, v in r.items()
                         if k not in NOT_PLOTTED and isinstance(v, int | float) and not isinstance(v, bool))
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        points = [(r["step"], r[key]) for r in train_records if isinstance(r.get(key), int | float)]
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
        axis.plot([s for s, _ in points], [v for _, v in points], linewidth=1.5)
        axis.set_xlabel("optimiser step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
        if key.startswith("loss") and all(v > 0 for _, v in points):
            axis.set_yscale("log")
        figure.tight_layout()
        path = plot_dir / f"{key.replace('/', '_')}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def write_summary(run_dir: Path, summary: dict) -> None:
    path = run_dir / "summary.json"
    temporary = path.with_name("summary.json.tmp")
    temporary.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2), encoding="utf-8")
    os.replace(temporary, path)
