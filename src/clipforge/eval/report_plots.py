"""Figures for the HTML report, rendered with matplotlib's object API (no pyplot state, no display) into
base64 PNG strings that the page embeds inline."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib.figure import Figure

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"]
DPI = 110


def _style(ax) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")
    ax.tick_params(colors="#374151", labelsize=8)


def to_base64_png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2 * window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def training_curves(rows: list[dict]) -> str | None:
    """Loss (total and each named loss), learning rate, logit scale and throughput against step."""
    rows = [r for r in rows if r.get("event") is None and isinstance(r.get("step"), int | float)]
    if not rows:
        return None
    loss_keys = [k for k in ("loss",) if any(k in r for r in rows)]
    loss_keys += sorted({k for r in rows for k in r if k.startswith("loss/")})
    panels = [("loss", loss_keys, True)]
    known = {"step", "epoch", "time", "lr", "logit_scale", "samples_per_s", "event"}
    rates = sorted({k for r in rows for k, v in r.items() if k not in known and not k.startswith(("loss", "skipped/"))
                    and isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0})
    if rates:
        panels.append(("batch metrics", rates[:6], True))
    for key, label in (("lr", "learning rate"), ("logit_scale", "logit scale"), ("samples_per_s", "samples / s")):
        if any(isinstance(r.get(key), int | float) for r in rows):
            panels.append((label, [key], False))
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.0 * lines))
    for index, (title, keys, smooth) in enumerate(panels):
        ax = figure.add_subplot(lines, columns, index + 1)
        for color, key in zip(PALETTE, keys):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)
                      and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = map(np.asarray, zip(*points))
            if smooth and len(values) > 20:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                values = _smooth(values, max(2, len(values) // 25))
            ax.plot(steps, values, color=color, linewidth=1.6, label=key)
        ax.set_title(title, fontsize=10, color="#111827")
        ax.set_xlabel("step", fontsize=8)
        if len(keys) > 1 or title == "batch metrics":
            ax.legend(fontsize=7, frameon=False)
        _style(ax)
    figure.tight_layout()
    return to_base64_png(figure)


def eval_curves(rows: list[dict]) -> str | None:
    """Rates logged by evaluations during training ({"event": "eval", "step": ..., name: value in [0, 1]});
    `chance*` keys are drawn as dashed reference lines."""
    rows = [r for r in rows if r.get("event") == "eval" and isinstance(r.get("step"), int | float)]

    def is_rate(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0

    keys = sorted({k for r in rows for k, v in r.items() if k not in ("step", "epoch") and is_rate(v)})
    if not rows or not keys:
        return None
    figure = Figure(figsize=(6.4, 3.2))
    ax = figure.add_subplot(1, 1, 1)
    for index, key in enumerate(keys[:10]):
        steps, values = zip(*[(r["step"], r[key]) for r in rows if is_rate(r.get(key))])
        if key.startswith("chance"):
            ax.plot(steps, values, color="#9ca3af", linestyle="--", linewidth=1, label=key)
        else:
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, color=PALETTE[index % len(PALETTE)],
                    label=key)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("evaluations during training", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    figure.tight_layout()
    return to_base64_png(figure)


def confusion_matrix(matrix: list[list[int]], classnames: list[str] | None, title: str) -> str:
    """Row-normalised confusion matrix (rows = true class) as a heat map."""
    counts = np.asarray(matrix, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = len(counts)
    side = min(9.0, max(4.0, 0.16 * size + 2.0))
    figure = Figure(figsize=(side + 1.0, side))
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if classnames and size <= 64:
        font = 7 if size <= 24 else 5
        ax.set_xticks(range(size), classnames, rotation=90, fontsize=font)
        ax.set_yticks(range(size), classnames, fontsize=font)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02).ax.tick_params(labelsize=7)
    figure.tight_layout()
    return to_base64_png(figure)


def fewshot_curves(series: dict[str, list[dict]]) -> str | None:
    """Accuracy vs shots with 95% CI error bars, one line per dataset."""
    if not series:
        return None
    figure = Figure(figsize=(5.6, 3.4))
    ax = figure.add_subplot(1, 1, 1)
    ways = None
    for index, (name, table) in enumerate(sorted(series.items())):
        table = sorted(table, key=lambda row: row["shots"])
        shots = [row["shots"] for row in table]
        acc = [row["acc1"] for row in table]
        ci = [0.0 if row.get("ci95") is None or not math.isfinite(row["ci95"]) else row["ci95"] for row in table]
        ways = table[0].get("ways") if table else ways
        ax.errorbar(shots, acc, yerr=ci, marker="o", markersize=4, capsize=3, linewidth=1.6,
                    color=PALETTE[index % len(PALETTE)], label=name)
        ax.set_xticks(sorted({s for row in series.values() for s in (r["shots"] for r in row)}))
    if ways:
        ax.axhline(1.0 / ways, color="#9ca3af", linestyle="--", linewidth=1, label=f"chance (1/{ways})")
    ax.set_xlabel("shots per class (K)", fontsize=8)
    ax.set_ylabel("query accuracy", fontsize=8)
    ax.set_title(f"few-shot accuracy ({ways}-way, mean ± 95% CI)" if ways else "few-shot accuracy", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    figure.tight_layout()
    return to_base64_png(figure)


def robustness_bars(variants: dict[str, dict], original: tuple[float, float], title: str) -> str:
    """Zero-shot vs linear-probe baseline accuracy on the original and each shifted variant."""
    names = ["original", *variants]
    zeroshot = [original[0]] + [v["zeroshot_acc1"] for v in variants.values()]
    baseline = [original[1]] + [v["baseline_acc1"] for v in variants.values()]
    x = np.arange(len(names))
    figure = Figure(figsize=(max(5.0, 0.9 * len(names) + 1.5), 3.3))
    ax = figure.add_subplot(1, 1, 1)
    ax.bar(x - 0.2, zeroshot, width=0.4, color=PALETTE[0], label="zero-shot")
    ax.bar(x + 0.2, baseline, width=0.4, color="#9ca3af", label="baseline (linear probe)")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("top-1 accuracy", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    figure.tight_layout()
    return to_base64_png(figure)


def probe_sweep(sweep: list[dict], chosen_C: float, title: str) -> str:
    """Validation accuracy against C (log scale) with the chosen C marked."""
    points = sorted((row["C"], row["val_acc1"]) for row in sweep)
    figure = Figure(figsize=(5.0, 2.8))
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.4, color=PALETTE[2])
    ax.axvline(chosen_C, color=PALETTE[1], linestyle="--", linewidth=1, label=f"chosen C = {chosen_C:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 strength)", fontsize=8)
    ax.set_ylabel("validation accuracy", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    figure.tight_layout()
    return to_base64_png(figure)
