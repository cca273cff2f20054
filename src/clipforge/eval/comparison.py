"""`write_comparison_report(groups, output)`: one self-contained HTML page with a section per method, each putting
its runs side by side.

It is what `clipforge demo` ends with. Each section (a title and its run folders, e.g. "CLIP vs FineCLIP" with
two runs, "LCL" with one) has the headline metrics of its runs in one table (same dataset and task per row), the
training loss of its runs on one plot, the task sections that evaluation tasks register for the report (e.g.
reconstruction pairs and a codebook-usage histogram), and links to each run's full report (`clipforge report
RUN_DIR`). A contact sheet of the training data closes the page. Images are inline base64 PNGs, so the file opens
offline.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from clipforge.errors import DataError
from clipforge.eval import report_plots as plots
from clipforge.eval.report import HEADLINE_METRICS, METRIC_LABELS, REPORT_FILE
from clipforge.eval.results import is_fraction, read_results

# rows of the comparison table: (task, metric) in this order; a task without an entry shows its first metrics
COMPARED = [
    ("zeroshot", "acc1"), ("zeroshot", "mean_per_class_recall"),
    ("retrieval", "image_retrieval_recall@1"), ("retrieval", "text_retrieval_recall@1"),
    ("retrieval", "image_retrieval_recall@5"), ("linear_probe", "lp_acc1"),
    ("fewshot", None), ("robustness", "effective_robustness"), ("regions", None),
]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest is still worth plotting
    return rows


def _metric_names(task: str, metric: str | None, results: list[dict]) -> list[str]:
    if metric is not None:
        return [metric]
    names = []
    for record in results:
        if record.get("clipforge_task") == task:
            names += [k for k in record["metrics"] if "ci95" not in k and "acc" in k]
    return list(dict.fromkeys(names))[:4] or HEADLINE_METRICS.get(task, [])[:1]


def _numeric_metrics(task: str, results: list[dict]) -> list[str]:
    """A task outside COMPARED: its headline metrics, else its first numeric ones."""
    names = []
    for record in results:
        if record.get("clipforge_task") == task:
            names += [k for k, v in record["metrics"].items()
                      if isinstance(v, int | float) and not isinstance(v, bool) and "ci95" not in k]
    names = list(dict.fromkeys(names))
    headline = [n for n in HEADLINE_METRICS.get(task, []) if n in names]
    return headline or names[:6]


def _comparison_rows(runs: dict[str, list[dict]]) -> list[tuple[str, str, str, list[float | None]]]:
    datasets = sorted({r["dataset"] for results in runs.values() for r in results})
    every = [r for results in runs.values() for r in results]
    known = {task for task, _ in COMPARED}
    others = list(dict.fromkeys(r["clipforge_task"] for r in every if r.get("clipforge_task") not in known))
    rows = []
    for task, metric in [*COMPARED, *((task, None) for task in others)]:
        names = _metric_names(task, metric, every) if task in known else _numeric_metrics(task, every)
        for name in names:
            for dataset in datasets:
                values = []
                for results in runs.values():
                    match = [r for r in results if r.get("clipforge_task") == task and r["dataset"] == dataset]
                    values.append(match[0]["metrics"].get(name) if match else None)
                if any(v is not None for v in values):
                    rows.append((dataset, task, METRIC_LABELS.get(name, name), values))
    return rows


def _loss_plot(logs: dict[str, list[dict]]) -> str | None:
    figure = Figure(figsize=(7.5, 3.2), dpi=110)
    ax = figure.add_subplot(1, 1, 1)
    drawn = False
    for index, (name, rows) in enumerate(logs.items()):
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and r.get("event") != "eval"]
        if not points:
            continue
        steps, losses = np.array(points, dtype=float).T
        ax.plot(steps, losses, label=name, linewidth=1.6, marker="o" if len(steps) < 20 else None, markersize=3, color=plots.PALETTE[index % len(plots.PALETTE)])
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (total)")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return plots.to_base64_png(figure)


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2%}" if is_fraction(name, value) else f"{value:.4g}"


def _task_sections(runs: dict[str, list[dict]]) -> list[str]:
    """The report sections evaluation tasks register (e.g. reconstruction pairs), per run; the per-run report's
    own sections (confusion matrices, ...) stay in the linked full reports."""
    from clipforge.eval.report import registered_sections

    parts = []
    for name, results in runs.items():
        for title, fragment in registered_sections(results):
            label = f"{title}: {name}" if len(runs) > 1 else title
            parts.append(f"<h3>{html.escape(label)}</h3>{fragment}")
    return parts


def _group_section(title: str, run_dirs: list[Path], output: Path, note: str | None) -> list[str]:
    runs = {d.name: read_results(d / "eval") for d in run_dirs}
    logs = {d.name: _read_jsonl(d / "metrics.jsonl") for d in run_dirs}
    summaries = {d.name: json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
                 for d in run_dirs}
    head = "".join(f"<th>{html.escape(name)}</th>" for name in runs)
    body_rows = []
    for dataset, task, metric, values in _comparison_rows(runs):
        best = max((v for v in values if v is not None), default=None)
        cells = "".join(f"<td{' class=best' if v is not None and v == best and len(values) > 1 else ''}>"
                        f"{_format(metric, v)}</td>" for v in values)
        body_rows.append(f"<tr><td>{html.escape(dataset)}</td><td>{html.escape(task)}</td>"
                         f"<td>{html.escape(metric)}</td>{cells}</tr>")
    train_rows = []
    for key, label in (("steps", "steps"), ("train_time_s", "train time (s)"), ("samples_per_s", "samples/s"),
                       ("final_loss", "final loss")):
        cells = "".join(f"<td>{_format_number(summaries[name].get(key))}</td>" for name in runs)
        train_rows.append(f"<tr><td colspan=3>{label}</td>{cells}</tr>")
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts += ["<ul>" + "".join(f'<li><a href="{html.escape(_relative(d / REPORT_FILE, output.parent))}">'
                               f"{html.escape(d.name)}: full report</a></li>" for d in run_dirs) + "</ul>",
              f"<table><tr><th>dataset</th><th>task</th><th>metric</th>{head}</tr>{''.join(body_rows)}"
              f"{''.join(train_rows)}</table>"]
    loss = _loss_plot(logs)
    if loss:
        parts += ["<h3>Training loss</h3>", f'<img src="data:image/png;base64,{loss}" alt="training loss">']
    return parts + _task_sections(runs)


def write_comparison_report(groups, output: str | Path, data_preview: str | Path | None = None,
                            title: str = "clipforge demo on SynthScenes",
                            notes: dict[str, str] | None = None) -> Path:
    """Write one HTML page with a section per group: `groups` is {section title: [run folders]} (or a plain list
    of run folders: one section); each run folder holds a training run with eval results. `notes` adds a
    sentence under a section's title."""
    output = Path(output)
    if not isinstance(groups, dict):
        groups = {"Runs": list(groups)}
    groups = {name: [Path(d) for d in dirs] for name, dirs in groups.items()}
    missing = [str(d) for dirs in groups.values() for d in dirs if not d.is_dir()]
    if missing:
        raise DataError(f"run folder(s) not found: {', '.join(missing)}")
    sections = [f"<h1>{html.escape(title)}</h1>",
                "<p>One section per method. Within a section every run trained the same model on the same "
                "SynthScenes data for the same number of steps; accuracies and recalls on held-out images. The best "
                "value of each row is bold. Each run's full report (curves, confusion matrices, retrieval "
                "examples, few-shot and robustness plots) is linked in its section.</p>"]
    for name, dirs in groups.items():
        sections += ["<section>", *_group_section(name, dirs, output, (notes or {}).get(name)), "</section>"]
    if data_preview and Path(data_preview).is_file():
        import base64

        encoded = base64.b64encode(Path(data_preview).read_bytes()).decode()
        sections += ["<h2>Training data (SynthScenes), with region boxes and captions</h2>",
                     f'<img class=sheet src="data:image/png;base64,{encoded}" alt="contact sheet">']
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1f2937}"
             "section{border-top:2px solid #e5e7eb;margin-top:2em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border-bottom:1px solid #e5e7eb;padding:4px 10px;"
             "text-align:left}td.best{font-weight:700}img{max-width:100%}img.sheet{max-width:900px}"
             "img.thumb{width:96px;height:96px;image-rendering:pixelated}.cands{display:flex;gap:8px;flex-wrap:wrap}"
             ".cap{font-size:11px;color:#6b7280}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


def _format_number(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if isinstance(value, int) or abs(value) >= 100 else f"{value:.4g}"


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()
