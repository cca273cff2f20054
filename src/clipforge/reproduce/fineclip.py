"""FineCLIP's claim in miniature: region understanding improves over CLIP while global image-text ability stays.

    clipforge reproduce fineclip                      # 5 arms x 3 seeds, the tiny configs as they are
    clipforge reproduce fineclip --seeds 0 --set train.epochs=1      # a quick look

Arms (every one trains the same model on the same SynthScenes data for the same number of steps, with the
same optimiser; only the objective differs):

    clip       configs/clip_synth_tiny.yaml
    global     FineCLIP with the global term only (w_distill = w_region = 0): CLIP's loss on region batches
    +distill   global + self-distillation
    +region    global + regional contrast
    fineclip   all three terms (configs/fineclip_synth_tiny.yaml)

Each run is evaluated on held-out SynthScenes scenes: region (box) classification, zero-shot classification
on base classes and on novel colour x shape compositions, and image-text retrieval. Runs are resumable: a
finished run is not trained again, an interrupted one continues from its latest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from clipforge.config import EvalConfig, load_config
from clipforge.reproduce import common
from clipforge.reproduce.common import Arm, ProgressFn

MARKER = "fineclip-reproduction"

ARMS: tuple[Arm, ...] = (
    Arm("clip", "CLIP", "clip"),
    Arm("global", "FineCLIP, global term only", "fineclip",
        ("objective.fineclip.w_distill=0", "objective.fineclip.w_region=0")),
    Arm("distill", "FineCLIP, global + distill", "fineclip", ("objective.fineclip.w_region=0",)),
    Arm("region", "FineCLIP, global + region", "fineclip", ("objective.fineclip.w_distill=0",)),
    Arm("fineclip", "FineCLIP (global + distill + region)", "fineclip"),
)

# (column title, dataset, task, metric)
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("region top-1", "synthscenes-base", "regions", "region_acc1"),
    ("region mAcc", "synthscenes-base", "regions", "region_mean_per_class_recall"),
    ("zero-shot base top-1", "synthscenes-base", "zeroshot", "acc1"),
    ("zero-shot novel top-1", "synthscenes-novel", "zeroshot", "acc1"),
    ("T->I R@1", "synthscenes-base", "retrieval", "image_retrieval_recall@1"),
    ("I->T R@1", "synthscenes-base", "retrieval", "text_retrieval_recall@1"),
)
EVAL_TASKS = ["zeroshot", "retrieval", "regions"]



def run_config(arm: Arm, seed: int, out_dir: Path, config_dir: Path, extra: Sequence[str]):
    """The ExperimentConfig of one (arm, seed) run."""
    path = config_dir / f"{arm.config}_synth_tiny.yaml"
    name = f"{arm.key}_seed{seed}"
    overrides = [*arm.overrides, *extra, f"seed={seed}", f"name={name}", f"output_dir={out_dir / name}",
                 "train.progress=false"]
    return load_config(path, overrides)


def train_and_evaluate(config, datasets, eval_config: EvalConfig, progress: ProgressFn) -> dict:
    """Train one run (or reuse it when finished) and evaluate its final weights: {column title: value}."""
    from clipforge.eval.suite import run_suite
    from clipforge.models.factory import load_model

    run_dir = config.run_dir
    summary = common.train_once(config, progress)
    model, preprocess, tokenizer = load_model(None, checkpoint=run_dir)
    progress(f"{config.name}: evaluating")
    suite = run_suite(model, preprocess, tokenizer, eval_config, datasets, out_dir=run_dir, model_name=config.name)
    found = {(r["dataset"], r["clipforge_task"]): r["metrics"] for r in suite["results"]}
    metrics = {title: found.get((dataset, task), {}).get(metric, math.nan)
               for title, dataset, task, metric in COLUMNS}
    metrics["train_time_s"] = summary.get("train_time_s")
    metrics["steps"] = summary.get("steps")
    return metrics


def results_table(results: dict[str, list[dict]]) -> str:
    """Markdown table: one row per arm, mean +- std over seeds in percent."""
    return common.results_table(ARMS, results, [title for title, *_ in COLUMNS])


def write_results_section(path: Path, section: str) -> None:
    """Replace (or append) the FineCLIP section of docs/results.md, leaving the other sections alone."""
    common.write_results_section(path, section, MARKER)


def reproduce_fineclip(
    out_dir: str | Path = "runs/reproduce_fineclip",
    *,
    seeds: Sequence[int] = (0, 1, 2),
    arms: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    num_eval: int = 500,
    config_dir: str | Path = "configs",
    progress: ProgressFn | None = None,
) -> dict:
    """Train and evaluate every (arm, seed); returns {"results": {arm: [metrics per seed]}, "table": markdown,
    "configs": {...}} and writes them to <out_dir>/results.json. `overrides` apply to every run alike."""
    from clipforge.eval.datasets import synth_eval_datasets

    progress = progress or (lambda message: None)
    out_dir, config_dir = Path(out_dir), Path(config_dir)
    chosen = common.select_arms(ARMS, arms)
    # every config is loaded (and checked) before any training; seed by seed, so a partial run has every arm
    configs = {(arm.key, seed): run_config(arm, seed, out_dir, config_dir, overrides) for seed in seeds
               for arm in chosen}
    first = next(iter(configs.values()))
    synth = first.data.synth
    progress(f"generating {num_eval} held-out SynthScenes scenes per evaluation split")
    datasets = synth_eval_datasets(num_eval=num_eval, num_train=1, image_size=synth.image_size, seed=synth.seed,
                                   omit_fraction=synth.omit_fraction, variants=[])
    eval_config = EvalConfig(tasks=EVAL_TASKS, num_eval=num_eval, batch_size=first.eval.batch_size,
                             templates=first.eval.templates)
    results: dict[str, list[dict]] = {}
    for (arm_key, seed), config in configs.items():
        metrics = train_and_evaluate(config, datasets, eval_config, progress)
        results.setdefault(arm_key, []).append({"seed": seed, **metrics})
    table = results_table(results)
    payload = {
        "results": results, "table": table, "seeds": list(seeds), "overrides": list(overrides),
        "num_eval": num_eval, "steps": {k: v[0].get("steps") for k, v in results.items()},
    }
    common.write_payload(out_dir, payload)
    return payload
