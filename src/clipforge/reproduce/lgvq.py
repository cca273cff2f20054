"""LG-VQ's claim in miniature: language-guided codebook learning (L_gsa, L_mtp, L_ras against a frozen MiniLM)
makes a VQ tokenizer's codes more text-aligned and uses more of the codebook, at no cost in reconstruction; and
beyond the paper, whether the language terms still add semantics when the quantiser (FSQ) already uses the whole
codebook.

    clipforge reproduce lgvq                                 # 7 arms x 3 seeds (sizes in docs/results.md)
    clipforge reproduce lgvq --seeds 0 --arms vq lgvq        # a quick look

Arms (the same tokenizer, data, steps and optimiser as configs/lgvq_synth_tiny.yaml; only the terms differ):

    vq        the plain tokenizer (reconstruction + commitment + PatchGAN from step 200): objective vq
    gsa       + L_gsa only                      (the paper's Table 2 ablation)
    mtp       + L_mtp only
    mtp_ras   + L_mtp + L_ras
    lgvq      all three at the paper's weights (configs/lgvq_synth_tiny.yaml)
    fsq       FSQ levels [8, 8] (64 codes, no codebook to collapse), objective vq
    fsq_lg    FSQ + all three terms

A CLIP on 32 px SynthScenes is trained once (configs/lgvq_judge_clip_synth_tiny.yaml): its image tower is the
Fréchet distances' feature extractor and its zero-shot classifier the text-to-image judge. Each tokenizer is
evaluated on held-out scenes: reconstruction (PSNR, SSIM, Fréchet distance), codebook usage and perplexity, and
the semantic probes read from its frozen codes. Training and evaluation resume: finished parts are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from clipforge.config import EvalConfig, load_config
from clipforge.reproduce import common
from clipforge.reproduce.common import Arm, ProgressFn

MARKER = "lgvq-reproduction"
_PLAIN = ("objective.name=vq",)
_FSQ = ("model.name=vq-tiny-fsq",)

ARMS: tuple[Arm, ...] = (
    Arm("vq", "VQ (EMA codebook)", "lgvq", _PLAIN),
    Arm("gsa", "+ L_gsa", "lgvq", ("objective.lgvq.mtp_weight=0", "objective.lgvq.ras_weight=0")),
    Arm("mtp", "+ L_mtp", "lgvq", ("objective.lgvq.gsa_weight=0", "objective.lgvq.ras_weight=0")),
    Arm("mtp_ras", "+ L_mtp + L_ras", "lgvq", ("objective.lgvq.gsa_weight=0",)),
    Arm("lgvq", "LG-VQ (all three)", "lgvq"),
    Arm("fsq", "FSQ", "lgvq", (*_FSQ, *_PLAIN)),
    Arm("fsq_lg", "FSQ + LG (all three)", "lgvq", _FSQ),
)

T2I_ARMS = ("vq", "lgvq")  # a text-to-image prior is trained over these arms' tokenizers (same steps each)
T2I_SEEDS = (0,)  # ... of these seeds (a prior costs as much as a tokenizer run)

# (column title, task, metric) on synthscenes-base
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("PSNR dB", "reconstruction", "psnr"),
    ("SSIM", "reconstruction", "ssim"),
    ("rFD", "reconstruction", "frechet_distance"),
    ("usage %", "reconstruction", "codebook_usage"),
    ("perplexity", "reconstruction", "perplexity"),
    ("colour", "code_semantics", "color_accuracy"),
    ("shape", "code_semantics", "shape_accuracy"),
    ("count", "code_semantics", "count_accuracy"),
    ("left of", "code_semantics", "left_of_accuracy"),
    ("T->I R@1", "code_semantics", "image_retrieval_recall@1"),
    ("masked-word R@1", "code_semantics", "masked_word_recall@1"),
    ("masked attribute-word R@1", "code_semantics", "masked_word_recall@1_visual"),
    ("code-word MSE", "code_semantics", "code_word_similarity_mse"),
)
T2I_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("t2i judge top-1", "text_to_image", "t2i_acc1"),
    ("judge top-1 on real", "text_to_image", "real_acc1"),
    ("t2i FD", "text_to_image", "frechet_distance"),
)
EVAL_TASKS = ["reconstruction", "code_semantics"]
# how far each language term had trained: metrics.jsonl at the end (mean of the last 3 records, every 10 steps)
TRAINING_COLUMNS = (("end gsa acc", "gsa_accuracy"), ("end mtp acc", "mtp_accuracy"),
                    ("end train usage %", "codebook_usage"), ("end train PSNR", "psnr"))


def _number(digits: int):
    return lambda mean, std: f"{mean:.{digits}f} +- {std:.{digits}f}"


FORMATS = {"end train usage %": _number(1), "end train PSNR": _number(2), "PSNR dB": _number(2), "SSIM": _number(3), "rFD": _number(3), "usage %": _number(1),
           "perplexity": _number(1), "code-word MSE": _number(4), "t2i FD": _number(3)}


def judge_config(out_dir: Path, config_dir: Path, extra: Sequence[str] = ()):
    return load_config(config_dir / "lgvq_judge_clip_synth_tiny.yaml",
                       [*extra, f"output_dir={out_dir / 'judge_clip'}", "name=judge_clip", "train.progress=false",
                        "eval.at_end=false"])


def run_configs(arms: Sequence[Arm], seeds: Sequence[int], out_dir: Path, config_dir: Path,
                extra: Sequence[str], arm_seeds: dict[str, list[int]] | None = None) -> dict:
    configs = {}
    for arm, seed in common.seed_plan(arms, seeds, arm_seeds or {}):
        name = f"{arm.key}_seed{seed}"
        configs[(arm.key, seed)] = load_config(
            config_dir / f"{arm.config}_synth_tiny.yaml",
            [*arm.overrides, *extra, f"seed={seed}", f"name={name}", f"output_dir={out_dir / name}",
             "train.progress=false", "eval.at_end=false"])
    return configs


def prior_config(tokenizer_run: Path, seed: int, out_dir: Path, config_dir: Path):
    """The text-to-image prior over one tokenizer run: configs/code_prior_synth_tiny.yaml as it is."""
    name = f"prior_{tokenizer_run.name}"
    return load_config(config_dir / "code_prior_synth_tiny.yaml",
                       [f"objective.code_ar.tokenizer={tokenizer_run}", f"seed={seed}", f"name={name}",
                        f"output_dir={out_dir / name}", "train.progress=false", "eval.at_end=false"])


def evaluate(run_dir: Path, name: str, datasets, eval_config: EvalConfig, columns, progress: ProgressFn) -> dict:
    """{column title: value} of one run's final weights on synthscenes-base (cached in the run folder)."""
    from clipforge.eval.suite import run_suite
    from clipforge.models.factory import load_model

    def compute() -> dict:
        progress(f"{name}: evaluating ({', '.join(eval_config.tasks)})")
        model, preprocess, tokenizer = load_model(None, checkpoint=run_dir)
        suite = run_suite(model, preprocess, tokenizer, eval_config, datasets, out_dir=run_dir / "reproduce_eval",
                          model_name=name)
        found = {r["clipforge_task"]: r["metrics"] for r in suite["results"]}
        return {title: found.get(task, {}).get(metric, math.nan) for title, task, metric in columns}

    key = {"tasks": list(eval_config.tasks), "num_eval": eval_config.num_eval, "columns": [c[0] for c in columns],
           "feature_run": eval_config.feature_run}
    return common.cached_evaluation(run_dir, "reproduce_eval", key, compute, progress)


def reproduce_lgvq(out_dir: str | Path = "runs/reproduce_lgvq", *, seeds: Sequence[int] = (0, 1, 2),
                   arms: Sequence[str] | None = None, overrides: Sequence[str] = (), num_eval: int = 500,
                   config_dir: str | Path = "configs", train_only: bool = False,
                   arm_seeds: dict[str, list[int]] | None = None, progress: ProgressFn | None = None) -> dict:
    """Train the judge CLIP and every (arm, seed), then (unless `train_only`) evaluate them; writes
    <out_dir>/results.json and returns its payload."""
    from clipforge.eval.datasets import synth_eval_datasets

    progress = progress or (lambda message: None)
    out_dir, config_dir = Path(out_dir), Path(config_dir)
    chosen = common.select_arms(ARMS, arms)
    judge = judge_config(out_dir, config_dir)
    configs = run_configs(chosen, seeds, out_dir, config_dir, overrides, arm_seeds)
    common.train_once(judge, progress)
    summaries = {key: common.train_once(config, progress) for key, config in configs.items()}
    results: dict[str, list[dict]] = {}
    if not train_only:
        first = next(iter(configs.values()))
        synth = first.data.synth
        progress(f"generating {num_eval} held-out SynthScenes scenes per evaluation split")
        datasets = synth_eval_datasets(num_eval=num_eval, num_train=num_eval, image_size=synth.image_size,
                                       seed=synth.seed, omit_fraction=synth.omit_fraction, variants=[],
                                       groups=("base",))
        judge_run = str(judge.run_dir)
        eval_config = EvalConfig(tasks=EVAL_TASKS, num_eval=num_eval, batch_size=first.eval.batch_size,
                                 feature_run=judge_run)
        t2i_config = EvalConfig(tasks=["text_to_image"], num_eval=num_eval, batch_size=first.eval.batch_size,
                                feature_run=judge_run)
        for (arm_key, seed), config in configs.items():
            metrics = evaluate(config.run_dir, config.name, datasets, eval_config, COLUMNS, progress)
            if arm_key in T2I_ARMS and seed in T2I_SEEDS:
                prior = prior_config(config.run_dir, seed, out_dir, config_dir)
                common.train_once(prior, progress)
                metrics.update(evaluate(prior.run_dir, prior.name, datasets, t2i_config, T2I_COLUMNS, progress))
            summary = summaries[(arm_key, seed)]
            ended = common.final_logged(config.run_dir, [name for _, name in TRAINING_COLUMNS])
            ended = {title: ended[name] for title, name in TRAINING_COLUMNS}
            results.setdefault(arm_key, []).append({"seed": seed, **metrics, **ended, "steps": summary.get("steps"),
                                                    "train_time_s": summary.get("train_time_s")})
    titles = [title for title, *_ in (*COLUMNS, *T2I_COLUMNS)]
    table = common.results_table(ARMS, results, titles, FORMATS)
    training = common.results_table(ARMS, results, [title for title, _ in TRAINING_COLUMNS], FORMATS)
    payload = {"results": results, "table": table, "training_table": training, "seeds": list(seeds), "overrides": list(overrides),
               "num_eval": num_eval, "steps": {k: v[0].get("steps") for k, v in results.items()}}
    common.write_payload(out_dir, payload)
    return payload


def write_results_section(path: Path, section: str) -> None:
    common.write_results_section(path, section, MARKER)
