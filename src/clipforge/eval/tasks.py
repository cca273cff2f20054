"""The task registry: each evaluation task declares what a dataset must provide and how to run on it.

A task is a name, the CLIP_benchmark task name its result file carries, the dataset fields it needs
(`labels`, `classnames`, `captions`, `train`, `variants`, `regions`), the model capabilities it needs
(`requires`, from clipforge.eval.capabilities: `encode_image`, `encode_text`, `dense`, `codes`, `generate`) and a
`run(context, dataset)` function. A model without a required capability skips the task with the reason.
Tasks never encode images themselves: they ask the `TaskContext`, which computes each dataset's features once
and shares them (and the zero-shot classifier and the linear probe) across tasks.

Adding a task (e.g. region classification, clipforge.eval.regions):

    register_task(Task(name="regions", benchmark_task="region_classification", needs=("regions", "classnames"),
                       run=run_region_classification, description="box classification from dense features",
                       requires=("dense", "encode_text")))

Modules listed in OPTIONAL_TASK_MODULES are imported on first use of the registry, so a new task module only
needs its one `register_task` call.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from clipforge.config import EvalConfig
from clipforge.errors import ConfigError
from clipforge.eval.capabilities import missing_capabilities
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.features import FeatureStore
from clipforge.eval.fewshot import DEFAULT_QUERIES, evaluate_fewshot, fewshot_queries
from clipforge.eval.linear_probe import MAX_ITER, VAL_FRACTION, LinearProbeResult, linear_probe
from clipforge.eval.results import thumbnail_png_base64
from clipforge.eval.retrieval import (
    DEFAULT_RECALL_K,
    flatten_captions,
    retrieval_examples,
    retrieval_metrics,
    retrieval_scores,
)
from clipforge.eval.robustness import evaluate_robustness
from clipforge.eval.zeroshot import (
    LOGIT_SCALE,
    classifier_from_prompt_features,
    evaluate_zeroshot,
    tokenize_prompts,
)

OPTIONAL_TASK_MODULES = ("clipforge.eval.regions",  # FineCLIP's region classification registers itself
                         "clipforge.eval.codes", "clipforge.eval.code_probes",  # image tokenizers' code tasks
                         "clipforge.eval.generation",  # text-to-image priors (capability generate)
                         "clipforge.eval.genie_edits",  # GeNIe's label check (capability edit)
                         "clipforge.eval.frozen_transfer",  # attentive probe, captioning (image_tokens)
                         "clipforge.eval.lit")  # LiT retrieval: a text tower trained on the frozen image tokens


@dataclass
class TaskOutput:
    metrics: dict  # flat name -> number (CLIP_benchmark names where they exist)
    settings: dict = field(default_factory=dict)  # knobs that change the numbers
    details: dict = field(default_factory=dict)  # structured results for the report (small)
    examples: dict | None = None  # bulky report extras (thumbnails), written beside the result
    uses_classnames: bool = False
    uses_templates: bool = False


@dataclass
class TaskContext:
    """What a task may use: shared features and shared intermediate results, computed on first request."""

    features: FeatureStore
    config: EvalConfig
    templates: list[str]
    template_source: str = "synthscenes"
    recall_k: tuple[int, ...] = DEFAULT_RECALL_K
    fewshot_queries: int = DEFAULT_QUERIES
    _shared: dict = field(default_factory=dict)

    def image_features(self, dataset: EvalDataset) -> torch.Tensor:
        return self.features.image_features(dataset)  # [N, D] unit norm

    def shared(self, key, compute: Callable):
        """A value computed once per suite run under `key` (any hashable), e.g. a classifier."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def zeroshot_classifier(self, classnames: list[str]) -> torch.Tensor:
        """[D, C] template-ensembled class weights (one text pass per class list)."""
        def compute():
            prompts, tokens = tokenize_prompts(self.features.tokenizer, classnames, self.templates)
            prompt_features = self.features.text_features(prompts, stage="text features (prompts)", tokens=tokens)
            return classifier_from_prompt_features(prompt_features, len(classnames))
        return self.shared(("zeroshot_classifier", tuple(classnames)), compute)

    def linear_probe(self, dataset: EvalDataset) -> LinearProbeResult:
        """The dataset's linear probe (shared by the linear_probe and robustness tasks)."""
        def compute():
            return linear_probe(
                self.image_features(dataset.train), dataset.train.labels, self.image_features(dataset),
                dataset.labels, dataset.num_classes, seed=self.config.seed, classnames=dataset.classnames,
                dataset_name=dataset.name,
            )
        return self.shared(("linear_probe", id(dataset)), compute)


@dataclass(frozen=True)
class Task:
    name: str
    benchmark_task: str
    needs: tuple[str, ...]
    run: Callable[[TaskContext, EvalDataset], TaskOutput]
    description: str = ""
    check: Callable[[EvalDataset, EvalConfig], str | None] | None = None  # extra applicability test
    requires: tuple[str, ...] = ("encode_image", "encode_text")  # model capabilities (clipforge.eval.capabilities)

    def missing(self, dataset: EvalDataset, config: EvalConfig, capabilities: frozenset[str] | None = None,
                note: str = "") -> str | None:
        """Why this task cannot run on `dataset` with a model of `capabilities` (None when it can); `note` is
        added to a missing-capability reason."""
        if capabilities is not None:
            reason = missing_capabilities(self.requires, capabilities, note)
            if reason is not None:
                return reason
        for need in self.needs:
            value = getattr(dataset, need, None)
            if not value:
                return f"needs {need} and dataset '{dataset.name}' has none"
            if need == "train" and value.labels is None:
                return f"needs a labelled training set and '{value.name}' has no labels"
        return self.check(dataset, config) if self.check else None


_REGISTRY: dict[str, Task] = {}
_optional_loaded = False


def register_task(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def _load_optional_tasks() -> None:
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    for module in OPTIONAL_TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def available_tasks() -> list[str]:
    _load_optional_tasks()
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    _load_optional_tasks()
    if name not in _REGISTRY:
        nearest = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
        raise ConfigError(f"unknown evaluation task '{name}' (known: {', '.join(_REGISTRY)}){hint}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------------------------------------
# Built-in tasks


def run_zeroshot(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    classifier = context.zeroshot_classifier(dataset.classnames)
    metrics, details = evaluate_zeroshot(context.image_features(dataset), dataset.labels, classifier,
                                         dataset.classnames, dataset.name)
    settings = {"templates": context.template_source, "num_templates": len(context.templates),
                "logit_scale": LOGIT_SCALE, "ensemble": "mean of unit-norm prompt embeddings, re-normalised"}
    return TaskOutput(metrics, settings, details, uses_classnames=True, uses_templates=True)


def run_retrieval(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    texts, text_image_index = flatten_captions(dataset.captions, dataset.name)
    image_features = context.image_features(dataset)
    text_features = context.features.text_features(texts, stage=f"text features {dataset.name} captions")
    scores = retrieval_scores(image_features, text_features)  # [T, N]
    metrics = retrieval_metrics(image_features, text_features, text_image_index, context.recall_k,
                                scores=scores, dataset_name=dataset.name)
    examples = retrieval_examples(scores, texts, text_image_index)
    thumbnails = {}
    for example in examples:
        for hit in example["top"]:
            hit["key"] = dataset.keys[hit["image"]]
            image = dataset.images[hit["image"]] if hit["image"] not in thumbnails else None
            if isinstance(image, Image.Image):  # a dataset of other image objects gets no thumbnails
                thumbnails[hit["image"]] = thumbnail_png_base64(image)
        example["target_key"] = dataset.keys[example["target_image"]]
        target = example["target_image"]
        image = dataset.images[target] if target not in thumbnails else None
        if isinstance(image, Image.Image):  # shown beside a miss, with its rank
            thumbnails[target] = thumbnail_png_base64(image)
    settings = {"recall_k": list(context.recall_k), "hit": "any correct item in the top k",
                "image_retrieval": "text->image", "text_retrieval": "image->text"}
    details = {"num_images": len(dataset), "num_texts": len(texts)}
    return TaskOutput(metrics, settings, details,
                      examples={"queries": examples, "thumbnails_png_base64": {str(k): v for k, v in
                                                                               thumbnails.items()}})


def run_linear_probe(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    result = context.linear_probe(dataset)
    settings = {"solver": "sklearn LogisticRegression lbfgs", "max_iter": MAX_ITER, "C_grid": "logspace(-6, 6, 97)",
                "search": "parametric binary search", "val_fraction": VAL_FRACTION, "refit": "train+val",
                "normalized": True, "seed": context.config.seed, "fewshot_k": -1}
    return TaskOutput(dict(result.metrics), settings, dict(result.details), uses_classnames=True)


def _check_linear_probe(dataset: EvalDataset, config: EvalConfig) -> str | None:
    """The probe needs two training classes and a class with two images (to hold out a validation split)."""
    counts = torch.bincount(torch.as_tensor(dataset.train.labels, dtype=torch.long))
    classes = int((counts > 0).sum())
    if classes < 2:
        return f"needs training images of at least two classes and '{dataset.train.name}' has {classes}"
    if int(counts.max()) < 2:
        return (f"needs two training images of some class to hold out a validation split and "
                f"'{dataset.train.name}' has one per class")
    return None


def _check_fewshot(dataset: EvalDataset, config: EvalConfig) -> str | None:
    if dataset.num_classes < config.fewshot_ways:
        return (f"needs {config.fewshot_ways} classes ({config.fewshot_ways}-way) and dataset '{dataset.name}' "
                f"has {dataset.num_classes}")
    if all(fewshot_queries(dataset.labels, config.fewshot_ways, shots) is None for shots in config.fewshot_shots):
        return (f"needs {config.fewshot_ways} classes with more than {min(config.fewshot_shots)} images each; "
                f"dataset '{dataset.name}' has fewer")
    return None


def run_fewshot(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    config = context.config
    features = context.image_features(dataset)
    metrics, table, skipped = {}, [], []
    for shots in config.fewshot_shots:
        tag = f"{config.fewshot_ways}way{shots}shot"
        queries = fewshot_queries(dataset.labels, config.fewshot_ways, shots, context.fewshot_queries)
        if queries is None:
            skipped.append({"shots": shots, "reason": f"fewer than {config.fewshot_ways} classes have "
                                                      f"{shots + 1} images"})
            warnings.warn(f"{dataset.name}: {tag} skipped: fewer than {config.fewshot_ways} classes have "
                          f"{shots + 1} images", stacklevel=2)
            continue
        result = evaluate_fewshot(features, dataset.labels, config.fewshot_ways, shots, config.fewshot_episodes,
                                  queries, seed=config.seed)
        metrics[f"fewshot_acc1@{tag}"] = result["acc1"]
        metrics[f"fewshot_ci95@{tag}"] = result["ci95"]
        table.append({k: result[k] for k in ("ways", "shots", "queries", "episodes", "acc1", "ci95")})
    settings = {"ways": config.fewshot_ways, "shots": list(config.fewshot_shots),
                "episodes": config.fewshot_episodes, "queries_per_class": context.fewshot_queries,
                "classifier": "multinomial logistic regression, C=1, on unit-norm features",
                "ci": "1.96 * std / sqrt(episodes)", "seed": config.seed}
    return TaskOutput(metrics, settings, {"shots": table, "skipped": skipped})


def run_robustness(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    probe = context.linear_probe(dataset)
    variant_features = {name: context.image_features(variant) for name, variant in dataset.variants.items()}
    metrics, details = evaluate_robustness(
        context.image_features(dataset), dataset.labels, variant_features,
        context.zeroshot_classifier(dataset.classnames), probe.classifier, probe.sweep,
    )
    settings = {"variants": list(dataset.variants), "baseline": "linear probe on the original's training "
                "features (its C sweep and final fit)", "trend": "least squares in logit space",
                "templates": context.template_source}
    return TaskOutput(metrics, settings, details, uses_classnames=True, uses_templates=True)


IMAGE_AND_TEXT = ("encode_image", "encode_text")
register_task(Task("zeroshot", "zeroshot_classification", ("labels", "classnames"), run_zeroshot,
                   "zero-shot classification from class-name prompts", requires=IMAGE_AND_TEXT))
register_task(Task("retrieval", "zeroshot_retrieval", ("captions",), run_retrieval,
                   "image<->text retrieval, recall@k", requires=IMAGE_AND_TEXT))
register_task(Task("linear_probe", "linear_probe", ("labels", "train"), run_linear_probe,
                   "logistic regression on frozen features, C swept on a validation split",
                   check=_check_linear_probe, requires=("encode_image",)))
register_task(Task("fewshot", "fewshot_classification", ("labels",), run_fewshot,
                   "N-way K-shot episodes, logistic regression on the support set", check=_check_fewshot,
                   requires=("encode_image",)))
register_task(Task("robustness", "robustness", ("labels", "classnames", "train", "variants"), run_robustness,
                   "zero-shot accuracy under distribution shift, effective robustness",
                   check=_check_linear_probe, requires=IMAGE_AND_TEXT))
