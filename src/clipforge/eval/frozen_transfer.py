"""Frozen transfer (LCL's evaluation protocol): small heads trained on a frozen image encoder's tokens.

Any model with the `image_tokens` capability (clipforge.models.tokens: an open_clip ViT's output tokens after
`ln_post`, or an LCL encoder's patch tokens) is evaluated the same way, so CLIP, FineCLIP and LCL encoders
compare in one table. The encoder never trains: each dataset's tokens are extracted once (eval mode, no grad)
and shared by both tasks.

- `attentive_probe` — classification: learned queries attend over the LayerNorm-ed tokens (open_clip's
  `AttentionalPooler`, one multi-head attention layer), then LayerNorm and a linear classifier, trained with
  AdamW on the `train` split for a fixed number of epochs (`eval.transfer_epochs`, `eval.transfer_lr`,
  `eval.transfer_heads`, `eval.transfer_queries`), seeded; top-1 / top-5 / mean per-class recall on the test
  split (`ap_` names).
- `captioning` — an MLP maps each vision token into a small causal transformer language model, trained from
  scratch on the train split's captions (prefix = mapped tokens, then the caption; loss on the caption only)
  for `eval.caption_steps` AdamW steps at `eval.caption_lr`; greedy decoding on the test split, scored with
  pycocoevalcap's BLEU-4 and CIDEr(-D) against all captions of each image (clipforge.eval.captioner).

Both heads are seeded from `eval.seed` (their own generators; the caller's random state is left as it was)
and, on the CPU, give the same numbers on every run.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from open_clip.transformer import AttentionalPooler
from PIL import Image
from torch import nn

from clipforge.config import EvalConfig
from clipforge.eval.captioner import (
    MAX_WORDS,
    WEIGHT_DECAY,
    CaptionModel,
    WordVocabulary,
    adamw,
    caption_scores,
    caption_words,
    generate_captions,
    seeded,
    train_captioner,
    warmup_cosine,
)
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.features import check_finite, model_device
from clipforge.eval.results import thumbnail_png_base64
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task
from clipforge.eval.zeroshot import classification_metrics
from clipforge.models.tokens import encode_image_tokens

PROBE_BATCH = 64
NUM_EXAMPLES = 8  # captioning rows kept for the report


# ----------------------------------------------------------------------------------------------------------
# Frozen tokens


@torch.no_grad()
def extract_image_tokens(model, preprocess, images, batch_size: int = 256, device: torch.device | None = None,
                         amp: bool = False, name: str = "images") -> torch.Tensor:
    """[N, T, W] float32 CPU tokens of every image (`encode_image_tokens`, eval mode, no grad, batched). They are
    held in memory: N * T * W * 4 bytes (1000 SynthScenes images on lcl-tiny: 2 MB; on a ViT-B/16, 600 MB)."""
    device = device or model_device(model)
    was_training = getattr(model, "training", False)
    if callable(getattr(model, "eval", None)):
        model.eval()
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocess(images[i]) for i in range(start, min(start + batch_size, len(images)))])
            autocast = torch.autocast(device.type) if amp else contextlib.nullcontext()
            with autocast:
                tokens = encode_image_tokens(model, batch.to(device))  # [B, T, W]
            chunks.append(tokens.float().cpu())
    finally:
        if callable(getattr(model, "train", None)):
            model.train(was_training)
    tokens = torch.cat(chunks)
    check_finite(tokens.flatten(1), f"dataset '{name}' image tokens")
    return tokens


def image_tokens(context: TaskContext, dataset: EvalDataset) -> torch.Tensor:
    """The dataset's frozen tokens [N, T, W], extracted once per suite run and shared by both tasks."""
    store = context.features

    def compute():
        start = time.perf_counter()
        tokens = extract_image_tokens(store.model, store.preprocess, dataset.images, store.batch_size, store.device,
                                      store.amp, dataset.name)
        store.seconds["image"] += time.perf_counter() - start  # the suite's summary counts every image pass
        store.images_encoded += len(dataset.images)
        return tokens
    return context.shared(("image_tokens", id(dataset)), compute)


# ----------------------------------------------------------------------------------------------------------
# Attentive probe


def usable_heads(width: int, requested: int) -> int:
    """`requested` when it divides the token width, else the largest divisor of `width` below it."""
    return max(h for h in range(1, min(requested, width) + 1) if width % h == 0)


class AttentiveProbe(nn.Module):
    """open_clip's AttentionalPooler (learned queries, LayerNorm-ed, attend over LayerNorm-ed tokens; the pool LiT
    retrieval uses too), the queries' mean LayerNorm-ed, then a linear classifier."""

    def __init__(self, width: int, num_classes: int, heads: int = 4, queries: int = 1):
        super().__init__()
        self.pool = AttentionalPooler(width, width, n_head=heads, n_queries=queries)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, C]
        pooled = self.pool(tokens)  # [B, Q, W]
        return self.classifier(self.norm(pooled.mean(dim=1)))


def train_attentive_probe(tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 50,
                          lr: float = 2e-3, heads: int = 4, queries: int = 1, seed: int = 0,
                          device: torch.device | str = "cpu") -> tuple[AttentiveProbe, list[float]]:
    """AdamW (cosine schedule) on cross-entropy for `epochs` passes over `tokens` [N, T, W]; returns the probe (in
    eval mode) and the mean loss of each epoch."""
    device = torch.device(device)
    with seeded(seed):
        probe = AttentiveProbe(tokens.shape[-1], num_classes, usable_heads(tokens.shape[-1], heads), queries)
    probe.to(device).train()
    optimizer = adamw(probe.parameters(), lr, device)
    total_steps, step = epochs * math.ceil(len(tokens) / PROBE_BATCH), 0
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        total = 0.0
        for start in range(0, len(tokens), PROBE_BATCH):
            index = order[start:start + PROBE_BATCH]
            for group in optimizer.param_groups:
                group["lr"] = lr * warmup_cosine(step, total_steps)
            step += 1
            logits = probe(tokens[index].to(device))  # [B, C]
            loss = nn.functional.cross_entropy(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(tokens))
    return probe.eval(), history


@torch.no_grad()
def probe_logits(probe: AttentiveProbe, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = next(probe.parameters()).device
    return torch.cat([probe(tokens[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(tokens), batch_size)])  # [N, C]


def attentive_probe(train_tokens: torch.Tensor, train_labels, test_tokens: torch.Tensor, test_labels,
                    num_classes: int, *, epochs: int = 50, lr: float = 2e-3, heads: int = 4, queries: int = 1,
                    seed: int = 0, device: torch.device | str = "cpu", classnames: list[str] | None = None,
                    dataset_name: str = "dataset") -> tuple[dict, dict]:
    """Train on (train_tokens [N, T, W], train_labels), test on the test split: (metrics, details) with
    `ap_acc1`, `ap_acc5`, `ap_mean_per_class_recall` (classification_metrics) and the training curve."""
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    probe, history = train_attentive_probe(train_tokens, train_labels, num_classes, epochs=epochs, lr=lr,
                                           heads=heads, queries=queries, seed=seed, device=device)
    logits = probe_logits(probe, test_tokens)
    metrics, details = classification_metrics(logits, test_labels, classnames, dataset_name, prefix="ap_")
    train_accuracy = (probe_logits(probe, train_tokens).argmax(dim=1) == train_labels).double().mean().item()
    metrics["ap_train_acc1"] = train_accuracy
    details.update({"epoch_loss": history, "num_train": len(train_tokens), "num_test": len(test_tokens),
                    "num_tokens": int(train_tokens.shape[1]), "token_width": int(train_tokens.shape[2]),
                    "heads_used": probe.pool.attn.num_heads})
    return metrics, details


def _check_attentive_probe(dataset: EvalDataset, config: EvalConfig) -> str | None:
    classes = len(set(dataset.train.labels))
    if classes < 2:
        return f"needs training images of at least two classes and '{dataset.train.name}' has {classes}"
    return None


def run_attentive_probe(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    config = context.config
    train_tokens = image_tokens(context, dataset.train)
    test_tokens = image_tokens(context, dataset)
    metrics, details = attentive_probe(
        train_tokens, dataset.train.labels, test_tokens, dataset.labels,
        max(dataset.num_classes, max(dataset.train.labels) + 1),  # a train label the test split lacks still fits
        epochs=config.transfer_epochs, lr=config.transfer_lr, heads=config.transfer_heads,
        queries=config.transfer_queries, seed=config.seed, device=context.features.device,
        classnames=dataset.classnames, dataset_name=dataset.name)
    settings = {"epochs": config.transfer_epochs, "lr": config.transfer_lr, "heads": details["heads_used"],
                "heads_requested": config.transfer_heads, "queries": config.transfer_queries,
                "batch_size_probe": PROBE_BATCH, "weight_decay": WEIGHT_DECAY,
                "optimizer": "AdamW, cosine decay, no warmup", "split": "train on train, report on test",
                "pooler": "open_clip AttentionalPooler (learned queries, multi-head attention over LayerNorm(tokens)), mean "
                          "over queries, LayerNorm, linear",
                "encoder": "frozen, eval mode", "seed": config.seed}
    return TaskOutput(metrics, settings, details, uses_classnames=True)


# ----------------------------------------------------------------------------------------------------------
# Captioning


def _captioned(dataset: EvalDataset | None) -> list[int]:
    """Indices of the images that have at least one non-empty caption."""
    if dataset is None or not dataset.captions:
        return []
    return [i for i, captions in enumerate(dataset.captions) if any(caption_words(c) for c in captions)]


def _check_captioning(dataset: EvalDataset, config: EvalConfig) -> str | None:
    if dataset.train is None:
        return f"needs a training set with captions and dataset '{dataset.name}' has none"
    if not _captioned(dataset.train):
        return f"needs a training set with captions and '{dataset.train.name}' has none"
    if not _captioned(dataset):
        return f"needs captions and dataset '{dataset.name}' has none with words"
    return None


def captioning(train_tokens: torch.Tensor, train_captions: list[list[str]], test_tokens: torch.Tensor,
               test_captions: list[list[str]], *, steps: int = 300, lr: float = 3e-3, seed: int = 0,
               device: torch.device | str = "cpu") -> tuple[dict, dict, list[str]]:
    """Train the captioner on (train_tokens [N, T, W], their captions), caption the test tokens greedily and score
    against every test caption of each image: (metrics {bleu4, cider}, details, generated captions)."""
    vocabulary = WordVocabulary.from_captions(train_captions)
    model, history = train_captioner(train_tokens, train_captions, vocabulary, steps=steps, lr=lr, seed=seed,
                                     device=device)
    generated = generate_captions(model, test_tokens, vocabulary)
    scored = [i for i, captions in enumerate(test_captions) if any(caption_words(c) for c in captions)]
    metrics = caption_scores([generated[i] for i in scored], [test_captions[i] for i in scored])
    lengths = [len(caption_words(generated[i])) for i in scored]
    details = {"vocabulary_size": len(vocabulary), "loss_curve": history, "num_train": len(train_tokens),
               "num_scored": len(scored), "num_test": len(test_tokens),
               "mean_generated_words": sum(lengths) / max(1, len(lengths)),
               "distinct_captions": len({generated[i] for i in scored}),
               "num_tokens": int(train_tokens.shape[1]), "token_width": int(train_tokens.shape[2])}
    return metrics, details, generated


def run_captioning(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    config = context.config
    train_index = _captioned(dataset.train)
    train_tokens = image_tokens(context, dataset.train)[train_index]
    train_captions = [dataset.train.captions[i] for i in train_index]
    test_tokens = image_tokens(context, dataset)
    metrics, details, generated = captioning(train_tokens, train_captions, test_tokens, dataset.captions,
                                             steps=config.caption_steps, lr=config.caption_lr, seed=config.seed,
                                             device=context.features.device)
    rows, thumbnails = [], {}
    for index in _captioned(dataset)[:NUM_EXAMPLES]:
        rows.append({"image": index, "key": dataset.keys[index], "generated": generated[index],
                     "references": list(dataset.captions[index])})
        image = dataset.images[index]
        if isinstance(image, Image.Image):
            thumbnails[str(index)] = thumbnail_png_base64(image)
    settings = {"steps": config.caption_steps, "lr": config.caption_lr, **CaptionModel.SIZES,
                "batch_size_captions": CaptionModel.BATCH, "max_words": MAX_WORDS,
                "vocabulary": "word-level, from the training captions (lower-case, punctuation dropped)",
                "decoding": "greedy", "references": "every caption of a test image",
                "metrics": "pycocoevalcap Bleu(4) closest ref length, Cider (CIDEr-D, idf from test references)",
                "optimizer": "AdamW, warmup then cosine decay", "encoder": "frozen, eval mode", "seed": config.seed}
    return TaskOutput(metrics, settings, details, examples={"captions": rows, "thumbnails_png_base64": thumbnails})


register_task(Task("attentive_probe", "attentive_probe", ("labels", "train"), run_attentive_probe,
                   "attention pooling + linear classifier trained on frozen image tokens",
                   check=_check_attentive_probe, requires=("image_tokens",)))
register_task(Task("captioning", "captioning", ("captions",), run_captioning,
                   "an MLP maps frozen image tokens into a small LM trained on the training captions; BLEU-4, CIDEr",
                   check=_check_captioning, requires=("image_tokens",)))
