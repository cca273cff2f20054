"""Report sections of the tokenizer, generation and frozen-transfer tasks: what people would rather look at than
read. Each renders the records of one task (with their `details` and `_examples`) to an HTML fragment:

    reconstruction   original -> reconstruction pairs, and the codebook-usage histogram of the held-out codes
    text_to_image    a grid of samples per prompt, with the judge's verdict
    genie_edits      source -> edits over r (one row per source) and the semantic-flip curve
    captioning       test images with the generated caption and its references

Registered with `register_report_section` when the task modules import this one, so the per-run report and the
demo's comparison page both show them.
"""

from __future__ import annotations

import base64
import html
import io

from clipforge.eval.report import register_report_section

MAX_PAIRS = 8
MAX_PROMPTS = 8


def _image(b64: str, alt: str, css: str = "thumb") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def usage_title(counts: list[int], name: str) -> str:
    return f"{name}: {sum(1 for c in counts if c > 0)} of {len(counts)} codes used"


def usage_histogram_png(counts: list[int], title: str) -> str:
    """Base64 PNG: how often each code is used, codes sorted by use (a flat curve = an evenly used codebook)."""
    import numpy as np
    from matplotlib.figure import Figure

    values = np.sort(np.asarray(counts, dtype=float))[::-1]
    share = values / max(values.sum(), 1.0)
    figure = Figure(figsize=(6.0, 2.4), dpi=110)
    ax = figure.add_subplot(1, 1, 1)
    ax.bar(np.arange(len(share)), 100 * share, width=1.0, color="#2563eb")
    ax.axhline(100 / len(share), color="#dc2626", linewidth=1, linestyle="--", label="uniform use")
    ax.set_title(usage_title(counts, title), fontsize=9)
    ax.set_xlabel("codes, by use", fontsize=8)
    ax.set_ylabel("% of the codes", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def reconstruction_section(records: list[dict]) -> str | None:
    blocks = []
    for record in records:
        dataset = html.escape(record["dataset"])
        pairs = (record.get("_examples") or {}).get("pairs", [])[:MAX_PAIRS]
        cells = [f'<div class="cand">{_image(p["original_png_base64"], "original")}'
                 f'{_image(p["reconstruction_png_base64"], "reconstruction")}'
                 f'<div class="cap">{html.escape(str(p.get("key", p.get("image", ""))))}</div></div>' for p in pairs]
        histogram = (record.get("details") or {}).get("code_histogram")
        parts = [f"<h3>{dataset}</h3>"]
        if cells:
            parts.append('<p class="muted">Each pair: the held-out image (top) and decode(encode(image)) '
                         '(bottom).</p><div class="cands">' + "".join(cells) + "</div>")
        if histogram:
            parts.append(_image(usage_histogram_png(histogram, record["dataset"]), "codebook usage", "figure"))
        if len(parts) > 1:
            blocks.append("".join(parts))
    return "".join(blocks) or None


def text_to_image_section(records: list[dict]) -> str | None:
    blocks = []
    for record in records:
        grids = (record.get("_examples") or {}).get("grids_png_base64", {})
        rows = [f'<div class="query"><div class="qtext">“{html.escape(prompt)}”</div>'
                f'{_image(grid, prompt, "figure")}</div>' for prompt, grid in list(grids.items())[:MAX_PROMPTS]]
        if rows:
            metrics = record.get("metrics", {})
            verdict = (f'<p class="muted">judge zero-shot top-1 on the samples: {100 * metrics["t2i_acc1"]:.1f}% '
                       f'(on real images: {100 * metrics.get("real_acc1", float("nan")):.1f}%)</p>'
                       if "t2i_acc1" in metrics else "")
            blocks.append(f"<h3>{html.escape(record['dataset'])}</h3>{verdict}" + "".join(rows))
    return "".join(blocks) or None


def captioning_section(records: list[dict]) -> str | None:
    blocks = []
    for record in records:
        examples = record.get("_examples") or {}
        thumbs = examples.get("thumbnails_png_base64", {})
        rows = []
        for row in examples.get("captions", [])[:MAX_PAIRS]:
            thumb = thumbs.get(str(row["image"]))
            picture = _image(thumb, row.get("key", "")) if thumb else ""
            references = "<br>".join(html.escape(r) for r in row.get("references", [])[:3])
            rows.append(f'<div class="query"><div class="cands"><div class="cand">{picture}</div><div>'
                        f'<div class="qtext"><b>{html.escape(row["generated"])}</b></div>'
                        f'<div class="cap">{references}</div></div></div></div>')
        if rows:
            blocks.append(f"<h3>{html.escape(record['dataset'])}</h3>" + "".join(rows))
    if not blocks:
        return None
    return ('<p class="muted">Greedy captions from the frozen encoder\'s tokens (bold), with reference captions '
            'below.</p>' + "".join(blocks))


register_report_section("reconstruction", reconstruction_section)
register_report_section("text_to_image", text_to_image_section)
register_report_section("captioning", captioning_section)


def genie_edits_section(records: list[dict]) -> str | None:
    blocks = []
    for record in records:
        examples = record.get("_examples") or {}
        rows = examples.get("rows", [])
        if not rows:
            continue
        ratios = ", ".join(f"{r:g}" for r in examples.get("ratios", []))
        cells = [f'<div class="cand">{_image(row["png_base64"], row["title"], "figure")}'
                 f'<div class="qtext">{html.escape(row["title"])}</div></div>' for row in rows]
        flip = record["metrics"].get("flip_point")
        verdict = "no flip" if flip is None or flip != flip else f"flip at r = {flip:g}"
        curve = examples.get("curve_png_base64")
        blocks.append(f'<h3>{html.escape(record["dataset"])}: source, then r = {ratios} ({verdict})</h3>'
                      + "".join(cells) + (_image(curve, "semantic-flip curve", "figure") if curve else ""))
    return "".join(blocks) or None


register_report_section("genie_edits", genie_edits_section)
