"""LCL's claim in miniature: a vision encoder trained from scratch on interleaved documents by latent compression
matches CLIP trained on the pairs mined from the same documents, while generation-only pre-training collapses.

    clipforge reproduce lcl                                  # 6 arms x 3 seeds (sizes in docs/results.md)
    clipforge reproduce lcl --seeds 0 --arms lcl clip        # a quick look

Arms (the same documents, the same image tower — lcl-synth's 32 px ViT —, the same optimiser and the same
number of images seen; only the objective differs):

    lcl          configs/lcl_synth_tiny.yaml: w_gen 1.0 * next-token CE + w_con 0.1 * InfoNCE
    clip         configs/lcl_clip_baseline_synth_tiny.yaml: CLIP on the mined pairs (each document image with its
                 describing sentence), train.max_steps set so it sees as many images as an LCL run
    gen_only     w_con = 0 (the from-scratch Flamingo/Emu-style baseline)
    con_only     w_gen = 0
    wcon_0.3     w_con = 0.3  (with lcl and gen_only, the w_con sweep 0 / 0.1 / 0.3 / 1.0)
    wcon_1       w_con = 1.0

Every run's frozen image encoder is evaluated the same way on held-out SynthScenes scenes: zero-shot on the base
and novel classes (LCL poses the prompt before <soi>), the linear probe, and frozen transfer — an attentive probe,
LiT-style retrieval (a text tower trained against the frozen image tokens through the engine), and captioning
(BLEU-4, CIDEr). Training and evaluation are both resumable: a finished run is not trained again, an interrupted
one continues from its latest checkpoint, and a finished evaluation is read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from clipforge.config import EvalConfig, load_config
from clipforge.reproduce import common
from clipforge.reproduce.common import Arm, ProgressFn

MARKER = "lcl-reproduction"
DOCUMENTS = 2000  # SynthScenes documents, 2-4 images each, 32 px (the tiny config's data)

ARMS: tuple[Arm, ...] = (
    Arm("lcl", "LCL (w_con 0.1)", "lcl"),
    Arm("clip", "CLIP on the mined pairs", "lcl_clip_baseline"),
    Arm("gen_only", "generation only (w_con 0)", "lcl", ("objective.lcl.contrastive_weight=0",)),
    Arm("con_only", "contrastive only (w_gen 0)", "lcl", ("objective.lcl.generation_weight=0",)),
    Arm("wcon_0.3", "LCL, w_con 0.3", "lcl", ("objective.lcl.contrastive_weight=0.3",)),
    Arm("wcon_1", "LCL, w_con 1.0", "lcl", ("objective.lcl.contrastive_weight=1.0",)),
)

# (column title, dataset, task, metric)
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("zero-shot base", "synthscenes-base", "zeroshot", "acc1"),
    ("zero-shot novel", "synthscenes-novel", "zeroshot", "acc1"),
    ("linear probe base", "synthscenes-base", "linear_probe", "lp_acc1"),
    ("attentive probe base", "synthscenes-base", "attentive_probe", "ap_acc1"),
    ("attentive probe novel", "synthscenes-novel", "attentive_probe", "ap_acc1"),
    ("LiT T->I R@1", "synthscenes-base", "lit_retrieval", "lit_image_retrieval_recall@1"),
    ("LiT I->T R@1", "synthscenes-base", "lit_retrieval", "lit_text_retrieval_recall@1"),
    ("caption BLEU-4", "synthscenes-base", "captioning", "bleu4"),
    ("caption CIDEr", "synthscenes-base", "captioning", "cider"),
)
EVAL_TASKS = ["zeroshot", "linear_probe", "attentive_probe"]  # on the base and the novel classes
BASE_ONLY_TASKS = ["lit_retrieval", "captioning"]  # the two that train a text side: on the base classes only
NOT_PERCENT = {"caption CIDEr": lambda mean, std: f"{mean:.3f} +- {std:.3f}"}
# how far each term had trained: metrics.jsonl at the end (mean of the last 3 records, every 10 steps)
TRAINING_COLUMNS = (("end i2t acc", "i2t_acc"), ("end next-token acc", "next_token_acc"),
                    ("end contrastive pairs", "contrastive_pairs"))
TRAINING_FORMATS = {"end contrastive pairs": lambda mean, std: f"{mean:.1f} +- {std:.1f}"}


def prepare_data(out_dir: Path, image_size: int, progress: ProgressFn) -> tuple[Path, Path]:
    """The documents every arm trains on, and the pairs mined from them (each written once)."""
    from clipforge.data.documents import mine_document_pairs
    from clipforge.data.generate import generate_synth_shards
    from clipforge.data.shards import read_manifest

    documents, pairs = out_dir / "data" / "documents", out_dir / "data" / "pairs"
    _, generated = generate_synth_shards(documents, num=DOCUMENTS, image_size=image_size, documents=True)
    progress(f"{DOCUMENTS} documents {'written' if generated else 'already there'} in {documents}")
    if generated or read_manifest(pairs) is None:
        count, skipped = mine_document_pairs(documents, pairs)
        progress(f"{count} pairs mined into {pairs} (not mined: {skipped or 'none'})")
    return documents, pairs


def images_per_document(documents: Path, lcl_config) -> float:
    """Mean number of images an LCL run actually reads per document: the blocks that fit its context (the rest
    of a long document is cut before an image block, never through one)."""
    from clipforge.data.documents import read_document
    from clipforge.data.samples import SkipCounter
    from clipforge.data.shards import iter_tar_samples, resolve_shards
    from clipforge.models.lcl import LclTokenizer, image_tokens, variant_settings

    settings = variant_settings(lcl_config.model.name)
    tokenizer = LclTokenizer(settings["context_length"], image_tokens(settings))
    counter, kept, usable = SkipCounter(), 0, 0
    for shard in resolve_shards(str(documents)):
        for raw in iter_tar_samples(shard.url, counter):
            document = read_document(raw, counter, max_images=lcl_config.objective.lcl.max_images)
            document = document and tokenizer.fit_document(document, counter)
            if document is not None:
                usable += 1
                kept += len(tokenizer.lay_out(document).images)
    return kept / max(usable, 1)


def sentence_after_share(documents: Path) -> float:
    """Share of the documents' images whose describing sentence comes after them: the pairs for which the LM state
    at <soi>, which the contrastive term aligns with the image, has not read the description."""
    from clipforge.data.samples import SkipCounter, read_json_member
    from clipforge.data.shards import iter_tar_samples, resolve_shards

    after = total = 0
    for shard in resolve_shards(str(documents)):
        for raw in iter_tar_samples(shard.url, SkipCounter()):
            meta = read_json_member(raw)
            where = {item["image"]: k for k, item in enumerate(meta["items"]) if "image" in item}
            for number, image in enumerate(meta.get("images", [])):
                if isinstance(image, dict) and isinstance(image.get("caption_item"), int) and number in where:
                    total += 1
                    after += image["caption_item"] > where[number]
    return after / max(total, 1)


def run_configs(arms: Sequence[Arm], seeds: Sequence[int], out_dir: Path, config_dir: Path, documents: Path,
                pairs: Path, extra: Sequence[str], arm_seeds: dict[str, list[int]] | None = None) -> tuple[dict, dict]:
    """{(arm, seed): ExperimentConfig} and the equal-images bookkeeping."""
    def load(arm: Arm, seed: int, more: Sequence[str] = ()):
        name = f"{arm.key}_seed{seed}"
        data = f"data.train={pairs if arm.config == 'lcl_clip_baseline' else documents}"
        return load_config(config_dir / f"{arm.config}_synth_tiny.yaml",
                           [data, *arm.overrides, *extra, *more, f"seed={seed}", f"name={name}",
                            f"output_dir={out_dir / name}", "train.progress=false", "eval.at_end=false"])

    reference = load(ARMS[0], 0)
    per_document = images_per_document(documents, reference)
    lcl_steps = reference.train.epochs * (DOCUMENTS // reference.data.batch_size)
    images_seen = lcl_steps * reference.data.batch_size * per_document
    clip_batch = load_config(config_dir / "lcl_clip_baseline_synth_tiny.yaml").data.batch_size
    clip_steps = max(1, round(images_seen / clip_batch))
    configs = {}
    for arm, seed in common.seed_plan(arms, seeds, arm_seeds or {}):
        more = [f"train.max_steps={clip_steps}"] if arm.config == "lcl_clip_baseline" else []
        configs[(arm.key, seed)] = load(arm, seed, more)
    budget = {"sentence_after_image": sentence_after_share(documents),
              "lcl_steps": lcl_steps, "documents_per_step": reference.data.batch_size,
              "images_per_document_read": per_document, "images_seen": images_seen, "clip_steps": clip_steps,
              "clip_batch": clip_batch}
    return configs, budget


def evaluate(config, datasets, eval_config: EvalConfig, progress: ProgressFn) -> dict:
    """{column title: value} for the final weights of one run (cached in the run folder)."""
    from dataclasses import replace

    from clipforge.eval.suite import run_suite
    from clipforge.models.factory import load_model

    run_dir = config.run_dir

    def compute() -> dict:
        progress(f"{config.name}: evaluating")
        model, preprocess, tokenizer = load_model(None, checkpoint=run_dir)
        found = {}
        base = [d for d in datasets if d.name == "synthscenes-base"]
        for tasks, chosen in ((eval_config.tasks, datasets), (BASE_ONLY_TASKS, base)):
            suite = run_suite(model, preprocess, tokenizer, replace(eval_config, tasks=list(tasks)), chosen,
                              out_dir=run_dir / "reproduce_eval", model_name=config.name)
            found.update({(r["dataset"], r["clipforge_task"]): r["metrics"] for r in suite["results"]})
        return {title: found.get((dataset, task), {}).get(metric, math.nan)
                for title, dataset, task, metric in COLUMNS}

    key = {"tasks": [*eval_config.tasks, *BASE_ONLY_TASKS], "num_eval": eval_config.num_eval}
    return common.cached_evaluation(run_dir, "reproduce_eval", key, compute, progress)


def reproduce_lcl(out_dir: str | Path = "runs/reproduce_lcl", *, seeds: Sequence[int] = (0, 1, 2),
                  arms: Sequence[str] | None = None, overrides: Sequence[str] = (), num_eval: int = 500,
                  config_dir: str | Path = "configs", train_only: bool = False,
                  arm_seeds: dict[str, list[int]] | None = None, progress: ProgressFn | None = None) -> dict:
    """Train (and unless `train_only`, evaluate) every (arm, seed); returns {"results", "table", "budget", ...}
    and writes it to <out_dir>/results.json."""
    from clipforge.eval.datasets import synth_eval_datasets

    progress = progress or (lambda message: None)
    out_dir, config_dir = Path(out_dir), Path(config_dir)
    chosen = common.select_arms(ARMS, arms)
    image_size = load_config(config_dir / "lcl_synth_tiny.yaml").data.synth.image_size
    documents, pairs = prepare_data(out_dir, image_size, progress)
    configs, budget = run_configs(chosen, seeds, out_dir, config_dir, documents, pairs, overrides, arm_seeds)
    progress(f"equal images: LCL {budget['lcl_steps']} steps x {budget['documents_per_step']} documents x "
             f"{budget['images_per_document_read']:.2f} images read = {budget['images_seen']:.0f}; CLIP "
             f"{budget['clip_steps']} steps x {budget['clip_batch']} pairs")
    summaries = {key: common.train_once(config, progress) for key, config in configs.items()}
    results: dict[str, list[dict]] = {}
    if not train_only:
        first = next(iter(configs.values()))
        progress(f"generating {num_eval} held-out SynthScenes scenes per evaluation split")
        datasets = synth_eval_datasets(num_eval=num_eval, num_train=num_eval, image_size=image_size,
                                       seed=first.data.synth.seed, omit_fraction=first.data.synth.omit_fraction,
                                       variants=[])
        eval_config = EvalConfig(tasks=EVAL_TASKS, num_eval=num_eval, batch_size=first.eval.batch_size)
        for (arm_key, seed), config in configs.items():
            metrics = evaluate(config, datasets, eval_config, progress)
            summary = summaries[(arm_key, seed)]
            ended = common.final_logged(config.run_dir, [name for _, name in TRAINING_COLUMNS])
            ended = {title: ended[name] for title, name in TRAINING_COLUMNS}
            results.setdefault(arm_key, []).append({"seed": seed, **metrics, **ended, "steps": summary.get("steps"),
                                                    "train_time_s": summary.get("train_time_s")})
    table = common.results_table(ARMS, results, [title for title, *_ in COLUMNS], NOT_PERCENT)
    training = common.results_table(ARMS, results, [title for title, _ in TRAINING_COLUMNS], TRAINING_FORMATS)
    payload = {"results": results, "table": table, "training_table": training, "budget": budget, "seeds": list(seeds),
               "overrides": list(overrides), "num_eval": num_eval}
    common.write_payload(out_dir, payload)
    return payload


def write_results_section(path: Path, section: str) -> None:
    common.write_results_section(path, section, MARKER)
