"""`write_report(run_dir)`: one self-contained HTML page about a run (or an evaluation folder).

It reads what the run folder holds, whichever parts exist: `config.yaml`, `summary.json`, `metrics.jsonl`
(training curves, evaluations during training), `eval/*.json` (results of `run_suite`), `eval/examples/`
(retrieval thumbnails) and `eval_suite.json` (timing). The page has a metrics table per task, training curves,
confusion matrices, retrieval examples (a caption with its top-5 images, correct ones marked), few-shot
accuracy against shots, the linear probe's C sweep and robustness per shift. Every image is an inline base64
PNG and the CSS is inline: the file opens offline, by itself.

A task the page has no section for (e.g. a newly registered one) still appears in the metrics table; a module
can add a section with `register_report_section(task_name, render)` where render(results) -> HTML | None.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from collections.abc import Callable
from pathlib import Path

import yaml

from clipforge import __version__
from clipforge.errors import DataError
from clipforge.eval import report_plots as plots
from clipforge.eval.results import is_fraction, read_results

REPORT_FILE = "report.html"

TASK_TITLES = {
    "zeroshot": "Zero-shot classification", "retrieval": "Retrieval", "linear_probe": "Linear probe",
    "fewshot": "Few-shot classification", "robustness": "Robustness to distribution shift",
    "reconstruction": "Reconstruction and codebook usage", "text_to_image": "Text-to-image samples",
    "genie_edits": "GeNIe edits over the noise ratio",
    "captioning": "Captioning examples",
}
HEADLINE_METRICS = {
    "zeroshot": ["acc1", "acc5", "mean_per_class_recall"],
    "retrieval": ["image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
                  "text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10"],
    "linear_probe": ["lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_val_acc1", "C"],
    "robustness": ["acc1@original", "baseline_acc1@original", "effective_robustness"],
}
METRIC_LABELS = {
    "image_retrieval_recall@1": "T→I R@1", "image_retrieval_recall@5": "T→I R@5",
    "image_retrieval_recall@10": "T→I R@10", "text_retrieval_recall@1": "I→T R@1",
    "text_retrieval_recall@5": "I→T R@5", "text_retrieval_recall@10": "I→T R@10",
    "mean_per_class_recall": "mean per-class recall", "lp_mean_per_class_recall": "mean per-class recall",
    "acc1@original": "zero-shot acc1", "baseline_acc1@original": "baseline acc1",
    "effective_robustness": "effective robustness (mean)", "lp_val_acc1": "val acc1 (chosen C)",
}

SUMMARY_KEYS = ("steps", "epochs", "samples_seen", "train_time_s", "samples_per_s", "final_loss", "parameters")
FINAL_METRIC_CARDS = ("logit_scale", "logit_bias", "accuracy")  # objective scalars worth a card, when recorded

_EXTRA_SECTIONS: dict[str, Callable[[list[dict]], str | None]] = {}


def register_report_section(task: str, render: Callable[[list[dict]], str | None]) -> None:
    """Add a report section for `task`: render(results of that task) -> an HTML fragment or None."""
    _EXTRA_SECTIONS[task] = render


def _load_sections() -> None:
    import clipforge.eval.report_sections  # noqa: F401  registers the tokenizer / generation / captioning sections


def registered_sections(results: list[dict]) -> list[tuple[str, str]]:
    """(title, HTML) of the sections that evaluation tasks registered, for the tasks in `results`."""
    from clipforge.eval.tasks import available_tasks

    available_tasks()  # imports the optional task modules, which may register their sections
    _load_sections()
    grouped = _by_task(results)
    found = []
    for task, render in _EXTRA_SECTIONS.items():
        fragment = render(grouped[task]) if task in grouped else None
        if fragment:
            found.append((TASK_TITLES.get(task, task), fragment))
    return found


# ----------------------------------------------------------------------------------------------------------
# Reading the run folder


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a run that was killed
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_config(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------------------------------------
# Formatting


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _format(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="muted">n/a</span>'
    if not isinstance(value, int | float):
        return _esc(value)
    if name == "C" or name.endswith("_s"):
        return f"{value:.3g}"
    if "effective_robustness" in name:
        return f"{100 * value:+.1f} pp"
    if "ci95" in name:
        return f"±{100 * value:.1f}"
    if is_fraction(name, float(value)):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def _image(b64: str, alt: str, css: str = "figure") -> str:
    return f'<img class="{css}" alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _table(headers: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _by_task(results: list[dict]) -> dict[str, list[dict]]:
    """Results grouped by task, built-in tasks first in their usual order, then any other task by name."""
    grouped: dict[str, list[dict]] = {}
    for record in results:
        grouped.setdefault(record.get("clipforge_task") or record.get("task", "?"), []).append(record)
    order = list(TASK_TITLES)
    return dict(sorted(grouped.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order),
                                                          item[0])))


# ----------------------------------------------------------------------------------------------------------
# Sections


def _fewshot_cell(metrics: dict, tag: str) -> str:
    accuracy = metrics.get(f"fewshot_acc1@{tag}")
    if accuracy is None:
        return _format("acc", None)
    return (f'{_format("acc", accuracy)} '
            f'<span class="muted">{_format("ci95", metrics.get(f"fewshot_ci95@{tag}"))}</span>')


def _row_label(record: dict, several_models: bool) -> str:
    """The dataset, and the model when the folder holds results of more than one."""
    label = _esc(record["dataset"])
    return f'{label} <span class="muted">{_esc(record.get("model", "?"))}</span>' if several_models else label


def _metrics_tables(results: list[dict]) -> str:
    several = len({r.get("model") for r in results}) > 1
    parts = []
    for task, records in _by_task(results).items():
        if task == "fewshot":
            shots = sorted({k.split("@")[1] for r in records for k in r["metrics"] if k.startswith("fewshot_acc1@")},
                           key=lambda tag: int(tag.split("way")[1].rstrip("shot")))
            rows = [[_row_label(r, several)] + [_fewshot_cell(r["metrics"], tag) for tag in shots] for r in records]
            headers = ["dataset"] + [_esc(tag.replace("way", "-way ").replace("shot", "-shot")) for tag in shots]
        else:
            names = HEADLINE_METRICS.get(task) or sorted({k for r in records for k in r["metrics"]})
            names = [n for n in names if any(n in r["metrics"] for r in records)]
            rows = [[_row_label(r, several)] + [_format(n, r["metrics"].get(n)) for n in names] for r in records]
            headers = ["dataset"] + [_esc(METRIC_LABELS.get(n, n)) for n in names]
        title = TASK_TITLES.get(task, task.replace("_", " ").capitalize())
        benchmark = records[0].get("task", "")
        parts.append(f'<h3>{_esc(title)} <span class="tag">{_esc(benchmark)}</span></h3>'
                     + _table(headers, rows, "metrics"))
    return "".join(parts)


def _confusion_section(records: list[dict]) -> str | None:
    figures = []
    for record in records:
        matrix = record.get("details", {}).get("confusion_matrix")
        if matrix:
            title = f"{record['dataset']}: zero-shot confusion (row-normalised)"
            figures.append(_image(plots.confusion_matrix(matrix, record.get("classnames"), title), title))
    return '<div class="grid">' + "".join(figures) + "</div>" if figures else None


def _retrieval_section(records: list[dict]) -> str | None:
    blocks = []
    for record in records:
        examples = record.get("_examples") or {}
        thumbs = examples.get("thumbnails_png_base64", {})
        rows = []
        for query in examples.get("queries", []):
            cells = []
            for rank, hit in enumerate(query["top"], start=1):
                mark = "hit" if hit["correct"] else "miss"
                thumb = thumbs.get(str(hit["image"]))
                picture = _image(thumb, hit.get("key", ""), "thumb") if thumb else '<div class="thumb"></div>'
                cells.append(f'<div class="cand {mark}">{picture}<div class="cap">#{rank} · '
                             f'{hit["score"]:.3f}{" ✓" if hit["correct"] else ""}</div></div>')
            found = any(hit["correct"] for hit in query["top"])
            verdict = '<span class="ok">found in top 5</span>' if found else '<span class="bad">not in top 5</span>'
            target = thumbs.get(str(query.get("target_image")))
            if not found and target and query.get("target_rank"):
                cells.append(f'<div class="cand target">{_image(target, query.get("target_key", ""), "thumb")}'
                             f'<div class="cap">its image: #{query["target_rank"]}</div></div>')
            rows.append(f'<div class="query"><div class="qtext">“{_esc(query["caption"])}” {verdict}</div>'
                        f'<div class="cands">{"".join(cells)}</div></div>')
        if rows:
            blocks.append(f"<h3>{_esc(record['dataset'])}</h3>" + "".join(rows))
    if not blocks:
        return None
    legend = ('<p class="muted">Each caption retrieves images (text→image); its own image is framed green when it '
              'is among the top 5, other images red; when it is not, it is shown after them (dashed) with its rank. '
              'Scores are cosine similarities.</p>')
    return legend + "".join(blocks)


def _fewshot_section(records: list[dict]) -> str | None:
    series = {r["dataset"]: r.get("details", {}).get("shots", []) for r in records}
    series = {k: v for k, v in series.items() if v}
    figure = plots.fewshot_curves(series)
    return _image(figure, "few-shot accuracy against shots") if figure else None


def _probe_section(records: list[dict]) -> str | None:
    figures = []
    for record in records:
        sweep = record.get("details", {}).get("sweep")
        if sweep and "C" in record["metrics"]:
            title = f"{record['dataset']}: linear-probe C sweep (validation split)"
            figures.append(_image(plots.probe_sweep(sweep, record["metrics"]["C"], title), title))
    return '<div class="grid">' + "".join(figures) + "</div>" if figures else None


def _robustness_section(records: list[dict]) -> str | None:
    parts = []
    for record in records:
        variants = record.get("details", {}).get("variants") or {}
        if not variants:
            continue
        metrics = record["metrics"]
        original = (metrics.get("acc1@original", math.nan), metrics.get("baseline_acc1@original", math.nan))
        title = f"{record['dataset']}: accuracy under shift"
        parts.append(_image(plots.robustness_bars(variants, original, title), title))
        rows = [[_esc(name), _format("acc", v["zeroshot_acc1"]), _format("acc", v["baseline_acc1"]),
                 _format("effective_robustness", v["effective_robustness"]),
                 f'{v["trend_slope"]:.2f} / {v["trend_intercept"]:+.2f}'] for name, v in variants.items()]
        parts.append(_table(["variant", "zero-shot acc1", "baseline acc1", "effective robustness",
                             "trend slope / intercept (logit)"], rows, "metrics"))
        definition = record.get("details", {}).get("definition")
        if definition:
            parts.append(f'<p class="muted">{_esc(definition)}.</p>')
    return "".join(parts) or None


SECTIONS: list[tuple[str, str, Callable[[list[dict]], str | None]]] = [
    ("zeroshot", "Zero-shot confusion matrices", _confusion_section),
    ("retrieval", "Retrieval examples", _retrieval_section),
    ("fewshot", "Few-shot accuracy vs shots", _fewshot_section),
    ("linear_probe", "Linear probe: choosing C", _probe_section),
    ("robustness", "Robustness", _robustness_section),
]


# ----------------------------------------------------------------------------------------------------------


def _overview(run_dir: Path, config: dict, summary: dict, results: list[dict], suite: dict) -> str:
    """Key facts as (label, HTML value) cards."""
    model = (config.get("model") or {}).get("name") or (results[0]["model"] if results else "?")
    cards = [("run folder", _esc(run_dir.resolve().name)), ("model", _esc(model))]
    if config.get("objective"):
        cards.append(("objective", _esc(config["objective"].get("name", "?"))))
    weights = sorted({r.get("pretrained") or "" for r in results})
    if len(weights) > 1:
        cards.append(("weights", _esc(f"{len(weights)} models or checkpoints (named per row)")))
    elif weights and weights[0]:
        cards.append(("weights", _esc(Path(weights[0]).name or weights[0])))
    final_metrics = summary.get("final_metrics") or {}
    shown = [(key, summary.get(key)) for key in SUMMARY_KEYS] + \
        [(f"final_{key}", final_metrics.get(key)) for key in FINAL_METRIC_CARDS]
    for key, value in shown:
        if isinstance(value, int | float) and not isinstance(value, bool):
            cards.append((key.replace("_", " "), _esc(f"{value:.4g}" if isinstance(value, float) else f"{value:,}")))
    timing = suite.get("timing") or {}
    if timing:
        cards.append(("evaluation", _esc(f'{timing.get("total_s", 0):.1f} s, {timing.get("images_encoded", 0)} '
                                         f'images and {timing.get("texts_encoded", 0)} texts encoded once each')))
    return '<div class="overview">' + "".join(
        f'<div class="kv"><div class="k">{_esc(label)}</div><div class="v">{value}</div></div>'
        for label, value in cards) + "</div>"


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write `<run_dir>/report.html` (or `output`) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder '{run_dir}' does not exist")
    path = Path(output) if output is not None else run_dir / REPORT_FILE
    if path.is_dir():
        raise DataError(f"report output '{path}' is a folder; give a file name (e.g. {path / REPORT_FILE})")
    if not path.parent.is_dir():
        raise DataError(f"cannot write the report to '{path}': folder '{path.parent}' does not exist")
    config = _read_config(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    suite = _read_json(run_dir / "eval_suite.json")
    log_rows = _read_jsonl(run_dir / "metrics.jsonl")
    results = read_results(run_dir / "eval")
    if not results and not log_rows:
        raise DataError(f"'{run_dir}' has neither eval/*.json results nor metrics.jsonl: nothing to report "
                        f"(run 'clipforge eval' or train first)")

    body = [_overview(run_dir, config, summary, results, suite)]
    if results:
        body.append('<section><h2>Metrics</h2>' + _metrics_tables(results) + "</section>")
    curves = plots.training_curves(log_rows)
    evals = plots.eval_curves(log_rows)
    if curves or evals:
        parts = [_image(c, "training curves") for c in (curves, evals) if c]
        body.append("<section><h2>Training</h2>" + "".join(parts) + "</section>")
    grouped = _by_task(results)
    _load_sections()
    for task, title, render in SECTIONS + [(t, TASK_TITLES.get(t, t), r) for t, r in _EXTRA_SECTIONS.items()]:
        if task in grouped:
            fragment = render(grouped[task])
            if fragment:
                body.append(f"<section><h2>{_esc(title)}</h2>{fragment}</section>")
    skipped = suite.get("skipped") or []
    if skipped:
        rows = [[_esc(s["task"]), _esc(s["dataset"]), _esc(s["reason"])] for s in skipped]
        body.append("<section><h2>Not evaluated</h2>" + _table(["task", "dataset", "reason"], rows) + "</section>")

    title = f"clipforge report: {run_dir.resolve().name}"
    created = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title><style>{CSS}</style>"
            f"</head><body><header><h1>{_esc(title)}</h1><div class=\"muted\">generated {created} by clipforge "
            f"{__version__} · self-contained, works offline</div></header><main>{''.join(body)}</main></body></html>")
    path.write_text(page, encoding="utf-8")
    return path


CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --accent:#2563eb; --ok:#16a34a; --bad:#dc2626; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color:var(--fg); background:#f9fafb; }
header { background:#111827; color:#f9fafb; padding:22px 32px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .muted { color:#9ca3af; }
main { max-width:1180px; margin:0 auto; padding:20px 32px 48px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin:18px 0; }
h2 { font-size:17px; margin:0 0 12px; }
h3 { font-size:14px; margin:18px 0 8px; color:#374151; }
.tag { font:11px ui-monospace, monospace; color:var(--muted); background:#f3f4f6; border-radius:4px;
       padding:1px 6px; margin-left:6px; }
.muted { color:var(--muted); }
table { border-collapse:collapse; width:100%; margin:4px 0 8px; font-variant-numeric:tabular-nums; }
th, td { text-align:right; padding:5px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { font-weight:600; color:#374151; background:#f9fafb; font-size:12px; }
tr:hover td { background:#f8fafc; }
.overview { display:grid; grid-template-columns:repeat(auto-fill, minmax(200px, 1fr)); gap:10px; margin-top:6px; }
.kv { background:#fff; border:1px solid var(--line); border-radius:8px; padding:8px 12px; }
.kv .k { font-size:11px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.kv .v { font-size:15px; font-weight:600; word-break:break-word; }
img.figure { max-width:100%; height:auto; display:block; margin:8px 0; }
.grid { display:grid; grid-template-columns:repeat(auto-fit, minmax(460px, 1fr)); gap:12px; }
.query { margin:10px 0 16px; }
.qtext { margin-bottom:6px; }
.ok { color:var(--ok); font-size:12px; margin-left:6px; } .bad { color:var(--bad); font-size:12px; margin-left:6px; }
.cands { display:flex; gap:10px; flex-wrap:wrap; }
.cand { border:3px solid var(--line); border-radius:8px; padding:3px; background:#fff; text-align:center; }
.cand.hit { border-color:var(--ok); } .cand.miss { border-color:#fca5a5; }
.cand.target { border:3px dashed var(--ok); margin-left:14px; }
img.thumb, div.thumb { width:96px; height:96px; image-rendering:pixelated; display:block; border-radius:4px; }
.cap { font-size:11px; color:var(--muted); }
"""
