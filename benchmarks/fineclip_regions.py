"""Why region classification comes out as it does: three ways to get a region feature from the same trained model.

    .venv/bin/python benchmarks/fineclip_regions.py runs/reproduce_fineclip       # every run of the reproduction
    .venv/bin/python benchmarks/fineclip_regions.py runs/reproduce_fineclip --num-eval 500 --sizes 64 128

For each trained run (a folder with summary.json, found under the given folders) and the held-out SynthScenes
base scenes, box classification top-1 against the class prompt embeddings, with the region feature taken as

- dense @ S px: RoIAlign from the value-path dense map of the image resized to S (64 px -> an 8x8 map with the
  tiny model's 8 px patches, 128 px -> 16x16): what FineCLIP's region terms train and the `regions` task reports;
- crop: the model's own global embedding of the box enlarged 1.5x and resized to the model input -- the
  self-distillation teacher (one image-encoder pass per box, the cost FineCLIP's dense path avoids).

Runs are grouped by arm (the name before `_seed`), mean +- std over seeds. Wall time and peak RSS are printed.
If pooling is far below the crop, the dense path (not the text side) is what limits region accuracy; if a
finer map helps, resolution does.

It also measures the regional contrast's label noise in the first run's training data: how many region captions
of a batch (the run's batch size, up to data.max_regions regions per image) repeat within that batch -- such
repeats are false negatives for InfoNCE -- and the region-to-caption accuracy they allow at best (1/k for a
caption that appears k times).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from clipforge.eval.datasets import synth_eval_datasets
from clipforge.eval.regions import evaluate_regions
from clipforge.eval.templates import load_templates
from clipforge.models.factory import load_model
from clipforge.objectives.fineclip import FineclipObjective


class CropTeacher(torch.nn.Module):
    """Region features as the model's own embeddings of the enlarged box crops: the `fineclip` objective's
    self-distillation teacher (`FineclipObjective.crop_embeddings`, default crop_scale and teacher resolution)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.visual = model.visual
        self.objective = FineclipObjective()

    def encode_text(self, *args, **kwargs):
        return self.model.encode_text(*args, **kwargs)

    def encode_regions(self, images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch_index, slot_index = valid.nonzero(as_tuple=True)  # K > 0: the caller skips box-less batches
        embeddings = self.objective.crop_embeddings(self.model, images, boxes[batch_index, slot_index].float(),
                                                    batch_index, tuple(images.shape[-2:]))  # [K, D]
        out = embeddings.new_zeros(*valid.shape, embeddings.shape[-1])
        out[batch_index, slot_index] = embeddings
        return out


def _runs(folders: list[str]) -> list[Path]:
    runs = []
    for folder in folders:
        path = Path(folder)
        runs += sorted(p.parent for p in path.glob("**/summary.json")) if path.is_dir() else []
    if not runs:
        sys.exit(f"no trained runs (folders with summary.json) under {', '.join(folders)}")
    return runs


def caption_repeats(run: Path, batches: int = 10) -> tuple[float, float, float, float]:
    """(regions per batch, distinct captions per batch, fraction of regions whose caption repeats in the batch,
    best achievable region->caption accuracy), averaged over the first `batches` batches of the run's data."""
    import collections

    from clipforge.config import load_config
    from clipforge.data.samples import SkipCounter
    from clipforge.data.sources import open_source

    config = load_config(run / "config.yaml")
    source = open_source(str(run / "data" / "train"))
    batch_size, max_regions = config.data.batch_size, config.data.max_regions
    records = source.records(SkipCounter())
    figures = []
    for _ in range(batches):
        captions = []
        for _, record in zip(range(batch_size), records):
            regions = json.loads(record["json"]).get("regions", [])
            captions += [r["caption"] for r in regions[:max_regions] if r.get("caption")]
        counts = collections.Counter(captions)
        figures.append((len(captions), len(counts), sum(counts[c] > 1 for c in captions) / len(captions),
                        statistics.fmean(1 / counts[c] for c in captions)))
    return tuple(statistics.fmean(f[i] for f in figures) for i in range(4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--num-eval", type=int, default=500, help="held-out base scenes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="input sizes for the dense map")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = _runs(args.folders)
    first_config = json.loads((runs[0] / "summary.json").read_text())
    print(f"{len(runs)} runs; model {first_config.get('model')}; {args.num_eval} held-out base scenes", flush=True)
    (dataset,) = synth_eval_datasets(num_eval=args.num_eval, num_train=1, variants=[], groups=("base",))
    templates = load_templates("synthscenes")
    columns = [f"dense @ {s} px" for s in args.sizes] + ["crop (teacher)"]
    by_arm: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        model, _, tokenizer = load_model(None, checkpoint=run)
        values = {}
        with torch.no_grad():
            for size, title in zip(args.sizes, columns):
                metrics, _ = evaluate_regions(model, tokenizer, dataset, templates, image_size=size)
                values[title] = metrics["region_acc1"]
            metrics, _ = evaluate_regions(CropTeacher(model).eval(), tokenizer, dataset, templates)
            values["crop (teacher)"] = metrics["region_acc1"]
        arm = run.name.split("_seed")[0]
        for title, value in values.items():
            by_arm.setdefault(arm, {}).setdefault(title, []).append(value)
        print(f"  {run.name}: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in values.items()), flush=True)

    print("\nregion top-1 (%), mean +- std over seeds")
    header = "| arm | seeds | " + " | ".join(columns) + " |"
    print(header)
    print("| --- | ---: |" + " ---: |" * len(columns))
    for arm, values in by_arm.items():
        cells = []
        for title in columns:
            v = [100 * x for x in values[title]]
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.fmean(v):.1f} +- {std:.1f}")
        print(f"| {arm} | {len(values[columns[0]])} | " + " | ".join(cells) + " |")
    regions, distinct, repeated, ceiling = caption_repeats(runs[0])
    print(f"\nregion captions in a training batch ({runs[0].name}'s data, first 10 batches): {regions:.0f} regions, "
          f"{distinct:.0f} distinct captions, {100 * repeated:.0f}% of regions share their caption with another "
          f"region of the batch; best achievable region->caption accuracy {100 * ceiling:.0f}%")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nwall {time.perf_counter() - started:.0f} s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
