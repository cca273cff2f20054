"""GeNIe's claim in miniature: diffusion-made hard negatives (a source image of class s edited toward class t's
prompt at a limited noise ratio r, labelled t) help few-shot and long-tailed classification more than standard
augmentation, Img2Img and Txt2Img; GeNIe-Ada (r per image) helps more.

    clipforge reproduce genie                                 # 8 arms x 3 seeds, 1- and 5-shot + long tail
    clipforge reproduce genie --seeds 0 --episodes 20         # a quick look

Once, cached (reproduce/genie_data.py): a CLIP on the base classes (the frozen backbone and the diffusion model's
text tower), the embedded latent diffusion model (autoencoder + UNet on every class), exported as a diffusers
folder. Per seed: real 32 px images of the 16 novel classes, every edit (augment_genie's resumable folders, keyed
by source, target, r and seed), their embeddings, then the protocols (reproduce/genie_eval.py):

    few-shot    5-way 1- and 5-shot episodes over the novel classes, 16 queries, support and query disjoint
    long tail   the 16 novel classes with Zipf counts (40 ... 1), classes under 20 filled up to 20; accuracy on a
                balanced test set by many (>= 20) / medium / few (<= 5) classes
    label check a logistic-regression oracle on 40 real images per class labels GeNIe's edits at each r: the
                fraction it calls the target vs the source class (the semantic-flip curve)

Each (seed, arm) result is kept in out/seed<S>/results/<arm>.json and read back on a re-run with the same sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clipforge.reproduce import common, genie_data, genie_eval
from clipforge.reproduce.common import Arm, ProgressFn

MARKER = "genie-reproduction"
ARMS: tuple[Arm, ...] = (
    Arm("none", "no augmentation", "genie"),
    Arm("mixup", "MixUp", "genie"),
    Arm("cutmix", "CutMix", "genie"),
    Arm("img2img_0.3", "Img2Img r = 0.3", "genie"),
    Arm("img2img_0.7", "Img2Img r = 0.7", "genie"),
    Arm("txt2img", "Txt2Img (r = 1)", "genie"),
    Arm("genie", "GeNIe r = 0.8", "genie"),
    Arm("genie_ada", "GeNIe-Ada", "genie"),
)
FLIP_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SHOTS = (1, 5)
PROTOCOL_VERSION = 2  # bumped when the evaluation changes, so cached results are recomputed (edits are kept)
ORACLE_C = 10.0  # the label check's classifier: weaker regularisation than the few-shot one, 40 images per class


def _edit_plan(arms: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
    """(mode, ratio) per source set for the chosen arms; the few-shot GeNIe ratios always (the label check)."""
    fewshot = [("genie", r) for r in FLIP_RATIOS if r < 1] + [("txt2img", 1.0)]
    longtail = []
    for arm in arms:
        if arm == "genie":
            longtail.append(("genie", genie_eval.GENIE_RATIO))
        elif arm == "genie_ada":
            longtail += [("genie", r) for r in genie_eval.GRID]
        elif arm == "txt2img":
            longtail.append(("txt2img", 1.0))
        elif arm.startswith("img2img_"):
            ratio = float(arm.removeprefix("img2img_"))
            fewshot.append(("img2img", ratio))
            longtail.append(("img2img", ratio))
    unique = lambda items: list(dict.fromkeys(items))  # noqa: E731
    return {"fewshot": unique(fewshot), "longtail": unique(longtail)}


class SeedData:
    """Everything of one seed the protocols read: keys, features, edits, pixels, the long-tail split."""

    def __init__(self, out: Path, seed: int, sizes: genie_data.Sizes, arms: Sequence[str], model, backbone,
                 progress: ProgressFn):
        from clipforge.augment.protocols import tail_groups, zipf_counts
        from clipforge.data.synth import CLASSNAMES, NOVEL_CLASSES

        self.seed, self.sizes = seed, sizes
        root = out / f"seed{seed}"
        pools = genie_data.real_pools(seed, sizes)
        self.pools = pools
        self.names = {c: CLASSNAMES[c] for c in NOVEL_CLASSES}
        classes = [self.names[c] for c in NOVEL_CLASSES]
        indices = [i for pool in pools.values() for items in pool.values() for i in items]
        self.keys = dict(zip(indices, genie_data.real_keys(seed, indices)))
        rng = np.random.default_rng([seed, 11])
        order = [int(c) for c in rng.permutation(NOVEL_CLASSES)]  # which class is the head, which the tail
        counts = zipf_counts(len(order), largest=sizes.longtail_largest, smallest=1)
        self.counts = dict(zip(order, counts))
        self.groups = dict(zip(order, tail_groups(counts, many=sizes.longtail_target, few=sizes.longtail_few)))
        self.train_keys = {c: [self.keys[i] for i in pools["longtail"][c][:n]] for c, n in self.counts.items()}
        self.test_keys = {c: [self.keys[i] for i in pools["longtail_test"][c]] for c in NOVEL_CLASSES}
        heads = [c for c in order if self.groups[c] == "many"]
        self.sources = [self.train_keys[heads[j % len(heads)]][j // len(heads)] for j in range(sizes.longtail_sources)]
        needy = [c for c in order if self.counts[c] < sizes.longtail_target]

        def indices(pool: str, wanted: Sequence[str] | None = None) -> list[int]:
            found = [i for c in NOVEL_CLASSES for i in pools[pool][c]]
            return found if wanted is None else [i for i in found if self.keys[i] in set(wanted)]

        real = {name: genie_data.write_real(root / "real" / name, seed, indices(name))
                for name in ("support", "query", "oracle", "longtail_test")}
        real["longtail"] = genie_data.write_real(root / "real" / "longtail", seed, indices(
            "longtail", [k for keys in self.train_keys.values() for k in keys]))
        real["longtail_sources"] = genie_data.write_real(root / "real" / "longtail_sources", seed,
                                                         indices("longtail", self.sources))
        real["longtail_tail"] = genie_data.write_real(root / "real" / "longtail_tail", seed, indices(
            "longtail", [k for c in needy for k in self.train_keys[c]]))
        self.features: dict[str, torch.Tensor] = {}
        for name in ("support", "query", "oracle", "longtail", "longtail_test"):
            metas, features = genie_data.folder_features(real[name], backbone, root / "features" / f"real_{name}")
            self.features.update({m["__key__"]: f for m, f in zip(metas, features)})
        self.source_class = {self.keys[i]: NOVEL_CLASSES.index(c) for pool in pools.values()
                             for c, items in pool.items() for i in items}
        self.pixels = {**genie_data.pixels_of(real["support"]), **genie_data.pixels_of(real["longtail"])}
        plan = _edit_plan(arms)
        self.fewshot_edits, self.longtail_edits = genie_eval.EditTable(), genie_eval.EditTable()
        targets = {"fewshot": None, "longtail": [self.names[c] for c in needy]}
        for part, table in (("fewshot", self.fewshot_edits), ("longtail", self.longtail_edits)):
            for mode, ratio in plan[part]:
                source = real["support"] if part == "fewshot" else \
                    real["longtail_tail" if mode == "img2img" else "longtail_sources"]
                name = f"{part}_{mode}_{ratio:g}"
                folder = genie_data.make_edits(source, model, root / "edits" / name, mode=mode, ratio=ratio, seed=seed,
                                               classes=classes, targets=targets[part], sizes=sizes, progress=progress)
                metas, features = genie_data.folder_features(folder, backbone, root / "features" / name)
                table.add(metas, features)
        self.edit_folders = root / "edits"


def _evaluate_arm(arm: str, data: SeedData, shots: Sequence[int], episodes: int, backbone) -> dict:
    from clipforge.augment.protocols import mean_ci, sample_episodes

    result: dict = {"fewshot": {}}
    for k in shots:
        drawn = sample_episodes(data.pools["support"], query_pool=data.pools["query"], n_way=5, k_shot=k,
                                n_query=16, num_episodes=episodes, seed=data.seed * 100 + k)
        chosen: list[float] = []  # GeNIe-Ada's selected ratios
        accuracies = [genie_eval.fewshot_arm(arm, episode, keys=data.keys, names=data.names, real=data.features,
                                             edits=data.fewshot_edits, pixels=data.pixels, backbone=backbone,
                                             rng=np.random.default_rng([data.seed, k, e]), chosen=chosen)
                      for e, episode in enumerate(drawn)]
        mean, half_width = mean_ci(accuracies)
        result["fewshot"][str(k)] = {"mean": mean, "ci95": half_width, "episodes": accuracies}
        if chosen:
            result["fewshot"][str(k)]["selected_ratios"] = {f"{r:g}": chosen.count(r) for r in genie_eval.GRID}
    result["longtail"] = genie_eval.longtail_arm(
        arm, counts=data.counts, target=data.sizes.longtail_target, train_keys=data.train_keys,
        test_keys=data.test_keys, sources=data.sources, names=data.names, real=data.features,
        edits=data.longtail_edits, pixels=data.pixels, backbone=backbone, seed=data.seed, groups=data.groups)
    return result


def _label_check(data: SeedData) -> dict:
    """The oracle's accuracy on held-out real images and its flip curve over the few-shot GeNIe edits."""
    from clipforge.augment.protocols import fit_logistic, flip_point, predict_logistic
    from clipforge.data.synth import NOVEL_CLASSES

    def split(pool: str):
        keys = [data.keys[i] for c in NOVEL_CLASSES for i in data.pools[pool][c]]
        return torch.stack([data.features[k] for k in keys]), [data.source_class[k] for k in keys]

    train_x, train_y = split("oracle")
    oracle = fit_logistic(train_x, train_y, C=ORACLE_C, num_classes=len(NOVEL_CLASSES))
    test_x, test_y = split("query")
    accuracy = float((predict_logistic(*oracle, test_x).numpy() == np.asarray(test_y)).mean())
    class_index = {data.names[c]: i for i, c in enumerate(NOVEL_CLASSES)}
    curve = genie_eval.label_check(data.fewshot_edits, FLIP_RATIOS, oracle, data.source_class, class_index)
    return {"oracle_accuracy": accuracy, "curve": {str(r): v for r, v in curve.items()},
            "flip_point": flip_point(curve)}


def reproduce_genie(out_dir: str | Path = "runs/reproduce_genie", *, seeds: Sequence[int] = (0, 1, 2),
                    arms: Sequence[str] | None = None, episodes: int = 100, shots: Sequence[int] = SHOTS,
                    sizes: genie_data.Sizes | None = None, overrides: Sequence[str] = (),
                    config_dir: str | Path = "configs", train_only: bool = False,
                    progress: ProgressFn = lambda message: None) -> dict:
    from clipforge.augment.diffusion import load_diffusion

    out, sizes = Path(out_dir), sizes or genie_data.Sizes()
    chosen = common.select_arms(ARMS, arms)
    folder = genie_data.prepare_models(out, Path(config_dir), progress, overrides)
    if train_only:
        return {}
    model = load_diffusion(folder, scheduler="dpm")
    backbone = genie_data.Backbone(out / "clip")
    key = {"protocol": PROTOCOL_VERSION, "sizes": dataclasses.asdict(sizes), "episodes": episodes, "shots": list(shots),
           "model": model.fingerprint, "backbone": backbone.identity}
    per_seed: dict[int, dict] = {}
    for seed in seeds:
        progress(f"seed {seed}: real images, edits and embeddings")
        data = SeedData(out, seed, sizes, [a.key for a in chosen], model, backbone, progress)
        results_dir = out / f"seed{seed}" / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        per_seed[seed] = {"arms": {}, "label_check": common.cached_evaluation(
            results_dir, "label_check", key, lambda data=data: _label_check(data), progress)}
        for arm in chosen:
            progress(f"seed {seed}: {arm.key}")
            per_seed[seed]["arms"][arm.key] = common.cached_evaluation(
                results_dir, arm.key, key, lambda arm=arm, data=data: _evaluate_arm(arm.key, data, shots, episodes, backbone),
                progress)
        per_seed[seed]["longtail_counts"] = {data.names[c]: n for c, n in data.counts.items()}
    from clipforge.reproduce.genie_report import summarise

    payload = summarise(chosen, per_seed, sizes, episodes, shots, out)
    common.write_payload(out, payload)
    return payload


def write_results_section(path: Path, section: str) -> None:
    common.write_results_section(path, section, MARKER)
