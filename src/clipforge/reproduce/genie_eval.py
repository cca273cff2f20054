"""The three GeNIe protocols on cached features: few-shot episodes, the long tail, and the label check.

Every arm sees the same real images and the same budget of extra samples; only where the extra samples come from
differs. Features come from the frozen base-class backbone (genie_data.Backbone); the classifier is a
multinomial logistic regression (C = 1, L-BFGS, augment/protocols.fit_logistic) on real plus extra features.

Few-shot (per episode, N ways, K shots; target way t gets (N - 1) * K extra samples):
    none          the support alone
    img2img_r     t's own support images edited toward t's own prompt at r, one copy per other way
    txt2img       pure noise (r = 1) with t's prompt, one per (other way's support image, t)
    genie         each other way's support image edited toward t at r = 0.8
    genie_ada     the same pairs, r chosen per pair from the grid 0.5..0.9: the edits' embeddings projected on
                  the line from the source's embedding to t's prototype (the mean of the episode's t support),
                  the ratio just after the largest jump (augment/adaptive.py, the tool's own code)
    mixup/cutmix  N (N - 1) K mixes of support-image pairs (Beta(0.8, 0.8)), soft labels
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clipforge.augment import adaptive, protocols

GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
GENIE_RATIO = 0.8


class EditTable:
    """Features of edits, looked up by (mode, source key, class name, ratio); class name: the target (genie,
    txt2img) or the copy's other class (img2img). The mode keeps an Img2Img copy at r apart from the GeNIe edit
    of the same image toward the same class at the same r."""

    def __init__(self):
        self.rows: dict[tuple[str, str, str, float], int] = {}
        self.parts: list[torch.Tensor] = []
        self._size = 0

    def add(self, records: list[dict], features: torch.Tensor) -> None:
        for i, meta in enumerate(records):
            name = meta.get("copy_for_class", meta["target_class"])
            key = (meta["mode"], meta["source_key"], name, float(meta["ratio"]))
            if key in self.rows:
                raise ValueError(f"two edits share the key {key}")
            self.rows[key] = self._size + i
        self.parts = [torch.cat([*self.parts, features])]  # one table: lookups index it directly
        self._size += len(records)

    def features(self) -> torch.Tensor:
        return self.parts[0] if self.parts else torch.empty(0, 0)

    def lookup(self, keys: Sequence[tuple[str, str, str, float]]) -> torch.Tensor:
        table = self.features()
        return table[[self.rows[k] for k in keys]]


def ada_choice(source: torch.Tensor, prototype: torch.Tensor, grid_features: torch.Tensor) -> int:
    """Index into GRID chosen by GeNIe-Ada for one pair; grid_features [len(GRID), D]."""
    scores = adaptive.projection_scores(source.double(), prototype.double(), grid_features.double())
    return adaptive.select_ratio(scores)


def _fit_score(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y, num_classes: int):
    weight, bias = protocols.fit_logistic(train_x, train_y, C=1.0, num_classes=num_classes)
    return protocols.predict_logistic(weight, bias, test_x).numpy(), np.asarray(test_y)


def fewshot_arm(arm: str, episode: protocols.Episode, *, keys: dict[int, str], names: dict[int, str],
                real: dict[str, torch.Tensor], edits: EditTable, pixels: dict[str, torch.Tensor], backbone,
                rng: np.random.Generator, chosen: list | None = None) -> float:
    """Query accuracy of one arm on one episode. keys: item -> image key; names: class id -> class name;
    `chosen` collects GeNIe-Ada's selected ratios."""
    ways = len(episode.classes)
    support_items, support_y = episode.labelled("support")
    query_items, query_y = episode.labelled("query")
    support_x = torch.stack([real[keys[i]] for i in support_items])
    extra_x, extra_y = None, None
    pairs = protocols.genie_pairs(episode)  # (item, source way, target way)
    target_name = [names[c] for c in episode.classes]
    if arm in ("genie", "txt2img"):
        ratio = GENIE_RATIO if arm == "genie" else 1.0
        extra_x = edits.lookup([(arm, keys[item], target_name[t], ratio) for item, _, t in pairs])
        extra_y = [t for _, _, t in pairs]
    elif arm == "genie_ada":
        prototypes = [support_x[[j for j, y in enumerate(support_y) if y == w]].mean(dim=0) for w in range(ways)]
        picked = []
        for item, _, t in pairs:
            grid = edits.lookup([("genie", keys[item], target_name[t], r) for r in GRID])
            index = ada_choice(real[keys[item]], prototypes[t], grid)
            picked.append(grid[index])
            if chosen is not None:
                chosen.append(GRID[index])
        extra_x, extra_y = torch.stack(picked), [t for _, _, t in pairs]
    elif arm.startswith("img2img_"):
        ratio = float(arm.removeprefix("img2img_"))
        copies = [(item, t, other) for t in range(ways) for other in range(ways) if other != t
                  for item in episode.support[t]]
        extra_x = edits.lookup([("img2img", keys[item], target_name[other], ratio) for item, _, other in copies])
        extra_y = [t for _, t, _ in copies]
    elif arm in ("mixup", "cutmix"):
        images = torch.stack([pixels[keys[i]] for i in support_items])
        mix = protocols.mixup if arm == "mixup" else protocols.cutmix
        mixed, soft = mix(images, support_y, ways, count=len(pairs), generator=rng)
        extra_x, extra_y = backbone.embed_tensors(mixed), soft.double()
    elif arm != "none":
        raise ValueError(f"unknown few-shot arm '{arm}'")
    train_x, train_y = support_x, torch.nn.functional.one_hot(torch.tensor(support_y), ways).double()
    if extra_x is not None:
        if not isinstance(extra_y, torch.Tensor):
            extra_y = torch.nn.functional.one_hot(torch.tensor(extra_y), ways).double()
        train_x, train_y = torch.cat([train_x, extra_x]), torch.cat([train_y, extra_y])
    query_x = torch.stack([real[keys[i]] for i in query_items])
    predicted, truth = _fit_score(train_x, train_y, query_x, query_y, ways)
    return float((predicted == truth).mean())


def longtail_extra(arm: str, *, counts: dict[int, int], target: int, train_keys: dict[int, list[str]],
                   sources: list[str], names: dict[int, str], real: dict[str, torch.Tensor], edits: EditTable,
                   pixels: dict[str, torch.Tensor], backbone, rng: np.random.Generator, num_classes: int,
                   index_of: dict[int, int]):
    """(extra features [M, D], soft labels [M, C]) for the long-tail training set: every class under `target`
    images gets target - count extra samples; GeNIe-type arms edit head-class `sources` toward it."""
    needs = {c: target - n for c, n in counts.items() if n < target}
    features, labels = [], []
    if arm in ("genie", "txt2img", "genie_ada"):
        for c, need in needs.items():
            picked = rng.choice(len(sources), size=min(need, len(sources)), replace=False)
            prototype = torch.stack([real[k] for k in train_keys[c]]).mean(dim=0)
            for j in picked:
                source = sources[int(j)]
                if arm == "genie_ada":
                    grid = edits.lookup([("genie", source, names[c], r) for r in GRID])
                    features.append(grid[ada_choice(real[source], prototype, grid)])
                else:
                    ratio = GENIE_RATIO if arm == "genie" else 1.0
                    features.append(edits.lookup([(arm, source, names[c], ratio)])[0])
                labels.append(index_of[c])
    elif arm.startswith("img2img_"):
        ratio = float(arm.removeprefix("img2img_"))
        others = [names[c] for c in needs]
        for c, need in needs.items():
            copies = [(k, o) for o in others if o != names[c] for k in train_keys[c]]
            for j in rng.choice(len(copies), size=min(need, len(copies)), replace=False):
                key, other = copies[int(j)]
                features.append(edits.lookup([("img2img", key, other, ratio)])[0])
                labels.append(index_of[c])
    elif arm in ("mixup", "cutmix"):
        all_keys = [k for c in counts for k in train_keys[c]]
        all_y = [index_of[c] for c in counts for _ in train_keys[c]]
        images = torch.stack([pixels[k] for k in all_keys])
        mix = protocols.mixup if arm == "mixup" else protocols.cutmix
        mixed, soft = mix(images, all_y, num_classes, count=sum(needs.values()), generator=rng)
        return backbone.embed_tensors(mixed), soft.double()
    elif arm != "none":
        raise ValueError(f"unknown long-tail arm '{arm}'")
    if not features:
        return None, None
    return torch.stack(features), torch.nn.functional.one_hot(torch.tensor(labels), num_classes).double()


def longtail_arm(arm: str, *, counts: dict[int, int], target: int, train_keys: dict[int, list[str]],
                 test_keys: dict[int, list[str]], sources: list[str], names: dict[int, str],
                 real: dict[str, torch.Tensor], edits: EditTable, pixels: dict[str, torch.Tensor], backbone,
                 seed: int, groups: dict[int, str]) -> dict[str, float]:
    classes = sorted(counts)
    index_of = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    train_x = torch.stack([real[k] for c in classes for k in train_keys[c]])
    train_y = torch.nn.functional.one_hot(torch.tensor([index_of[c] for c in classes for _ in train_keys[c]]),
                                          len(classes)).double()
    extra_x, extra_y = longtail_extra(arm, counts=counts, target=target, train_keys=train_keys, sources=sources,
                                      names=names, real=real, edits=edits, pixels=pixels, backbone=backbone, rng=rng,
                                      num_classes=len(classes), index_of=index_of)
    if extra_x is not None:
        train_x, train_y = torch.cat([train_x, extra_x]), torch.cat([train_y, extra_y])
    test_x = torch.stack([real[k] for c in classes for k in test_keys[c]])
    test_y = [index_of[c] for c in classes for _ in test_keys[c]]
    predicted, truth = _fit_score(train_x, train_y, test_x, test_y, len(classes))
    return protocols.group_accuracy(predicted, truth, [groups[c] for c in classes])


def label_check(edits: EditTable, ratios: Sequence[float], oracle: tuple[torch.Tensor, torch.Tensor],
                source_class: dict[str, int], class_index: dict[str, int]) -> dict[float, dict[str, float]]:
    """The semantic-flip curve: per ratio, the fraction of GeNIe edits the oracle assigns to the target class,
    the source class, or another; oracle = (weight, bias) of a logistic regression over the novel classes."""
    weight, bias = oracle
    table = edits.features()
    predictions, sources, targets = {}, {}, {}
    for ratio in ratios:  # GeNIe's edits; at r = 1 the Txt2Img ones (pure noise with the target prompt)
        mode = "txt2img" if ratio >= 1.0 else "genie"
        rows = [(key, row) for key, row in edits.rows.items() if key[0] == mode and key[3] == ratio]
        predictions[ratio] = protocols.predict_logistic(weight, bias, table[[row for _, row in rows]]).numpy()
        sources[ratio] = np.array([source_class[key[1]] for key, _ in rows])
        targets[ratio] = np.array([class_index[key[2]] for key, _ in rows])
    curve = {}
    for ratio in ratios:  # flip_curve takes one label set; rows differ per ratio only in order, so per ratio
        curve.update(protocols.flip_curve([ratio], [predictions[ratio]], sources[ratio], targets[ratio]))
    return curve
