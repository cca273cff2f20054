"""Result files: one JSON per (model, dataset, task), in CLIP_benchmark's schema plus our fields.

`<run_dir>/eval/<model>__<dataset>__<task>.json`:
```
{"dataset": "synthscenes-base", "model": "clipforge-vit-tiny", "pretrained": "<checkpoint or ''>",
 "task": "zeroshot_classification",            # CLIP_benchmark's task name where one exists
 "clipforge_task": "zeroshot",                 # our task name (EvalConfig.tasks)
 "language": "en",
 "metrics": {"acc1": 0.61, "acc5": 0.93, "mean_per_class_recall": 0.60},
 "classnames": [...], "templates": [...],      # when the task used them
 "settings": {...}, "data": {...},              # every knob that changes the numbers; the data's provenance
 "details": {...},                              # confusion matrix, sweep, per-shot table... (for the report)
 "clipforge_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00"}
```
NaN (e.g. acc5 with fewer than 5 classes) is written as `null` so the files are strict JSON; `read_results`
turns metric nulls back into NaN. `clip_benchmark build <run_dir>/eval` reads these files as they are.
Large report-only extras (retrieval thumbnails) go to `eval/examples/` so the result files stay small.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import os
import re
from pathlib import Path

from PIL import Image

from clipforge import __version__

EXAMPLES_DIR = "examples"


def safe_name(text: str) -> str:
    """A file-name-safe form: a model path becomes its stem; odd characters become '-'."""
    text = str(text)
    if "/" in text or "\\" in text:
        text = Path(text).stem or text.replace("/", "-")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "unnamed"


def result_filename(model: str, dataset: str, task: str) -> str:
    return f"{safe_name(model)}__{safe_name(dataset)}__{safe_name(task)}.json"


def _nan_to_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v) for v in value]
    return value


def make_record(*, model: str, pretrained: str | None, dataset: str, task: str, benchmark_task: str,
                metrics: dict, settings: dict, data: dict, details: dict | None = None,
                classnames: list[str] | None = None, templates: list[str] | None = None) -> dict:
    record = {
        "dataset": dataset, "model": model, "pretrained": pretrained or "", "task": benchmark_task,
        "clipforge_task": task, "language": "en", "metrics": dict(metrics),
    }
    if classnames is not None:
        record["classnames"] = list(classnames)
    if templates is not None:
        record["templates"] = list(templates)
    record.update({
        "settings": settings, "data": data, "details": details or {}, "clipforge_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })
    return record


def write_json(payload: dict, path: Path) -> Path:
    """Atomic write (temp file + rename), strict JSON (NaN -> null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(_nan_to_null(payload), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temp, path)
    return path


# metrics that are numbers in their own unit, never a fraction shown in percent (even when they fall in [0, 1])
_UNIT_METRICS = ("psnr", "ssim", "frechet", "fid", "mse", "l1", "perplexity", "bleu", "cider", "loss", "entropy",
                 "flip_point")  # flip_point: a noise ratio r, not a share


def is_fraction(name: str, value) -> bool:
    """Whether a metric is a fraction to show in percent (accuracies, recalls): a float in [0, 1] whose name is
    not one of the unit metrics (PSNR, SSIM, Fréchet distance, MSE, BLEU, CIDEr, ...), a time or C."""
    if not isinstance(value, float) or not 0.0 <= value <= 1.0 or name == "C" or name.endswith("_s"):
        return False
    lowered = name.lower()
    return not any(unit in lowered for unit in _UNIT_METRICS)


def write_result(record: dict, eval_dir: str | Path) -> Path:
    name = result_filename(record["model"], record["dataset"], record["clipforge_task"])
    return write_json(record, Path(eval_dir) / name)


def write_examples(examples: dict, record: dict, eval_dir: str | Path) -> Path:
    name = result_filename(record["model"], record["dataset"], record["clipforge_task"])
    return write_json(examples, Path(eval_dir) / EXAMPLES_DIR / name)


def remove_stale_results(eval_dir: str | Path, model: str, pretrained: str | None) -> list[str]:
    """Delete the result files (and their examples) of `model` that other weights than `pretrained` wrote, so
    a folder never shows one checkpoint's numbers under another's name. Returns the removed file names."""
    eval_dir = Path(eval_dir)
    removed = []
    for path in sorted(eval_dir.glob(f"{safe_name(model)}__*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a result file of ours: leave it
        if not isinstance(record, dict) or record.get("model") != model:
            continue
        if (record.get("pretrained") or "") != (pretrained or ""):
            path.unlink()
            (eval_dir / EXAMPLES_DIR / path.name).unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def read_results(eval_dir: str | Path) -> list[dict]:
    """Every result file in `eval_dir` (sorted by name); metric nulls become NaN."""
    records = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a foreign or half-written file is not a result
        if not isinstance(record, dict) or "metrics" not in record:
            continue
        record["metrics"] = {k: (math.nan if v is None else v) for k, v in record["metrics"].items()}
        record["_file"] = path.name
        examples = Path(eval_dir) / EXAMPLES_DIR / path.name
        if examples.is_file():
            try:
                record["_examples"] = json.loads(examples.read_text(encoding="utf-8"))
            except ValueError:
                pass
        records.append(record)
    return records


def thumbnail_png_base64(image: Image.Image, max_size: int = 128) -> str:
    """An RGB image as base64 PNG, downscaled (bicubic) when larger than `max_size` px; small synthetic images
    stay at their own resolution (the page scales them up with crisp pixels)."""
    image = image.convert("RGB")
    if max(image.size) > max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
