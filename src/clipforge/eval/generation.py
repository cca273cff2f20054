"""Generation tasks for text-to-image models (capability `generate`), scored by a judge: a trained clipforge CLIP run.

    text_to_image   for each class of the dataset, K images (`eval.generate_per_class`) from the class prompt
                    (the first template with the class name: "a {}." -> "a red circle."), then with the judge
                    (`eval.feature_run`, the CLIP run whose image tower is also the reconstruction task's
                    Fréchet space):
                      t2i_acc1, t2i_acc5, t2i_mean_per_class_recall   zero-shot accuracy of the intended class
                          (the judge's template-ensembled classifier over the dataset's class names)
                      frechet_distance   between the judge's unit-norm image features of the generated images and
                          of the dataset's real images (eval/frechet.py)
                      real_acc1   the judge's zero-shot accuracy on the real images: what the judge can tell
                    Without a judge the task is skipped with the reason. `examples`: one grid of samples per
                    prompt (thumbnails for the report).

Generation uses the model's own sampling defaults (temperature, top-k, guidance) and `eval.seed`, so the numbers
are reproducible; the settings are recorded with them.
"""

from __future__ import annotations

import torch
from PIL import Image

from clipforge.config import EvalConfig
from clipforge.errors import ConfigError
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.features import compute_image_features
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task
from clipforge.eval.templates import render

EXAMPLES_PER_PROMPT = 4  # samples in each prompt's grid


def tensor_images(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, S, S] in [-1, 1] -> N RGB PIL images (as `clipforge tokenize decode` writes them)."""
    from clipforge.models.tokenize import images_to_uint8

    return [Image.fromarray(pixels, "RGB") for pixels in images_to_uint8(images).numpy()]


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size side by side, in one row."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for index, image in enumerate(images):
        grid.paste(image, (index * width, 0))
    return grid


def load_judge(run: str, device: torch.device):
    """(model, preprocess, tokenizer) of the judge run; ConfigError unless it encodes images and texts."""
    from clipforge.eval.capabilities import model_capabilities
    from clipforge.models.factory import load_model

    model, preprocess, tokenizer = load_model(None, checkpoint=run, device=device)
    if tokenizer is None or not {"encode_image", "encode_text"} <= model_capabilities(model):
        raise ConfigError(f"eval.feature_run '{run}' cannot judge generated images: it needs encode_image, "
                          f"encode_text and a tokenizer (a clipforge CLIP run)")
    return model.eval(), preprocess, tokenizer


def _check_text_to_image(dataset: EvalDataset, config: EvalConfig) -> str | None:
    if not config.feature_run:
        return "needs a judge: set eval.feature_run to a clipforge CLIP run that scores the generated images"
    return None


def run_text_to_image(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    from clipforge.eval.frechet import frechet_distance
    from clipforge.eval.results import thumbnail_png_base64
    from clipforge.eval.zeroshot import build_zeroshot_classifier, classification_metrics, zeroshot_logits

    config, store = context.config, context.features
    per_class, classnames = config.generate_per_class, dataset.classnames
    judge, judge_preprocess, judge_tokenizer = context.shared(
        ("judge", config.feature_run), lambda: load_judge(config.feature_run, store.device))
    prompts = [render(context.templates[0], name) for name in classnames]
    generated = tensor_images(store.model.generate(prompts, num_per_prompt=per_class, seed=config.seed))

    def features(images) -> torch.Tensor:  # [N, D] unit norm, in the judge's image-feature space
        return compute_image_features(judge, judge_preprocess, images, store.batch_size, store.device)

    generated_features = features(generated)
    real_features = context.shared(("judge_features", config.feature_run, id(dataset)),
                                   lambda: features(dataset.images))
    classifier = context.shared(("judge_classifier", config.feature_run, tuple(classnames)),
                                lambda: build_zeroshot_classifier(judge, judge_tokenizer, classnames, context.templates,
                                                                  store.batch_size, store.device))
    intended = torch.arange(len(classnames)).repeat_interleave(per_class)  # [C * K]
    scores, details = classification_metrics(zeroshot_logits(generated_features, classifier), intended, classnames,
                                             dataset.name)
    metrics = {f"t2i_{name}": value for name, value in scores.items()}
    metrics["frechet_distance"] = frechet_distance(generated_features, real_features)
    if dataset.labels is not None:
        real_scores, _ = classification_metrics(zeroshot_logits(real_features, classifier), dataset.labels,
                                                classnames, dataset.name)
        metrics["real_acc1"] = real_scores["acc1"]
    shown = min(per_class, EXAMPLES_PER_PROMPT)
    grids = {prompt: thumbnail_png_base64(image_grid(generated[c * per_class: c * per_class + shown]), max_size=512)
             for c, prompt in enumerate(prompts)}
    sampling = dict(getattr(store.model, "sampling", {}))
    settings = {"prompt_template": context.templates[0], "per_class": per_class, "seed": config.seed,
                "sampling": sampling, "judge": config.feature_run,
                "feature_space": "the judge's encode_image, L2-normalised", "classifier": "the judge's zero-shot "
                "classifier (template ensemble over the dataset's class names)"}
    details = {"num_generated": len(generated), "num_real": len(dataset), "confusion_matrix":
               details["confusion_matrix"], "per_class_recall": details["per_class_recall"]}
    return TaskOutput(metrics, settings, details, examples={"prompts": prompts, "grids_png_base64": grids},
                      uses_classnames=True, uses_templates=True)


register_task(Task("text_to_image", "text_to_image_generation", ("classnames",), run_text_to_image,
                   "K images per class prompt, judged by a CLIP run: zero-shot accuracy and Fréchet distance",
                   check=_check_text_to_image, requires=("generate",)))
