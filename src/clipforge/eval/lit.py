"""LiT-style frozen-transfer retrieval (`lit_retrieval`): lock the image encoder, tune a text tower against it.

For the model under evaluation (any model with the `image_tokens` capability: a CLIP, FineCLIP or LCL encoder),
on each dataset with captions and a captioned `train` split:

1. the train split's (image, caption) pairs are written as temporary image-text shards (one record per caption);
2. a `lit` model (clipforge.models.lit) over the evaluated model's tokens — trainable attention pool + linear
   projection on the image side, an open_clip text tower from scratch, a learned temperature — is trained on
   them through the engine (`engine.loop.train`, objective `clip`) for `eval.lit_steps` steps of
   `eval.lit_batch_size` pairs at `eval.lit_lr` (AdamW, 10% warmup, cosine), seeded by `eval.seed`. The
   evaluated model is lent to the family in memory (`lend_image_encoder`), frozen, never copied, and handed back
   with its requires_grad flags and mode as they were;
3. image<->text recall@k on the test split with the existing retrieval metrics (`lit_` names).

The run goes into a temporary folder that is removed afterwards, or into `<eval.lit_run_dir>/<dataset>` when
that is set (kept; its model.json names the lent encoder, so it reloads only with the encoder handed over).
The training is a separate single-process run: the caller's random state is left as it was, so the other
tasks' numbers do not depend on whether this one ran. On the CPU the same inputs give the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipforge.config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainConfig, validate
from clipforge.errors import ClipforgeError
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.features import check_finite, compute_image_features, compute_text_features
from clipforge.eval.results import safe_name
from clipforge.eval.retrieval import flatten_captions, retrieval_metrics
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task

WARMUP_FRACTION = 0.1
DISTRIBUTED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def write_caption_shards(dataset: EvalDataset, folder: Path) -> int:
    """Every (image, caption) pair of `dataset` as one shard of `key.png` + `key.txt` records, caption-major
    (all first captions, then all second ones...) so a shuffle buffer mixes images. Returns the pair count."""
    from clipforge.data.shards import write_shards

    captions = dataset.captions or []
    pngs: dict[int, bytes] = {}

    def png(index: int) -> bytes:
        if index not in pngs:
            buffer = io.BytesIO()
            dataset.images[index].save(buffer, format="PNG")
            pngs[index] = buffer.getvalue()
        return pngs[index]

    records = [{"__key__": f"pair_{i:07d}_{j:03d}", "png": png(i), "txt": text}
               for j in range(max((len(c) for c in captions), default=0))
               for i, image_captions in enumerate(captions)
               if j < len(image_captions) and (text := image_captions[j].strip())]
    write_shards(records, folder, shard_size=max(1, len(records)), prefix="lit")
    return len(records)


def lit_experiment(run_dir: Path, shards: Path, model_file: Path, num_pairs: int, config: EvalConfig,
                   device: torch.device) -> ExperimentConfig:
    """The engine config of one LiT run: the CLIP objective over a `lit` model, the eval config's budget."""
    steps = config.lit_steps
    experiment = ExperimentConfig(
        name="lit_retrieval", seed=config.seed, output_dir=str(run_dir),
        data=DataConfig(train=str(shards), batch_size=min(config.lit_batch_size, num_pairs), workers=0,
                        shuffle_buffer=num_pairs, scan=False),
        model=ModelConfig(family="lit", name=str(model_file)),
        train=TrainConfig(max_steps=steps, lr=config.lit_lr, warmup_steps=min(int(steps * WARMUP_FRACTION), steps - 1),
                          log_every=max(1, steps // 20), keep_last=1, tensorboard=False, progress=False,
                          device=str(device)),
        eval=EvalConfig(tasks=[]),
    )
    validate(experiment, "lit_retrieval")
    return experiment


@contextlib.contextmanager
def separate_training_run():
    """A nested single-process run: no process group joined, the caller's random state restored afterwards."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        raise ClipforgeError("lit_retrieval trains its own LiT model in one process; run this evaluation outside "
                             "a distributed job")
    hidden = {key: os.environ.pop(key) for key in DISTRIBUTED_ENV if key in os.environ}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        os.environ.update(hidden)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _check(dataset: EvalDataset, config: EvalConfig) -> str | None:
    train = dataset.train
    if train is None or not train.captions or not any(train.captions):
        return f"needs a training split with captions and '{dataset.name}' has none"
    return None


def run_lit_retrieval(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    from clipforge.engine.loop import train
    from clipforge.models.factory import load_model
    from clipforge.models.lit import lend_image_encoder, variant_settings

    config, store = context.config, context.features
    keep = config.lit_run_dir is not None
    with contextlib.ExitStack() as stack:
        if keep:
            folder = Path(config.lit_run_dir) / safe_name(dataset.name)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipforge-lit-")))
        num_pairs = write_caption_shards(dataset.train, folder / "shards")
        key = stack.enter_context(lend_image_encoder(store.model, store.preprocess))
        settings = {**variant_settings(config.lit_model), "image_run": key, "image_sha256": None}
        model_file = folder / "lit_model.json"
        model_file.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        experiment = lit_experiment(folder / "run", folder / "shards", model_file, num_pairs, config, store.device)

        def on_event(event) -> None:
            if store.progress is not None and event.kind in ("step", "end"):
                store.progress(f"lit_retrieval {dataset.name} training", event.step, event.total_steps)

        # rebuilding the trained model draws initial weights, a DataLoader draws its seed: all inside
        with separate_training_run():
            result = train(experiment, on_event=on_event, overwrite=keep)
            lit_model, preprocess, tokenizer = load_model(None, checkpoint=result.checkpoint, device=store.device)
            image_features = check_finite(compute_image_features(
                lit_model, preprocess, dataset.images, store.batch_size, store.device, amp=store.amp,
                stage=f"lit features {dataset.name}"), f"lit_retrieval '{dataset.name}' image features")
            texts, text_image_index = flatten_captions(dataset.captions, dataset.name)
            text_features = check_finite(compute_text_features(
                lit_model, tokenizer, texts, store.batch_size, store.device, amp=store.amp,
                stage=f"lit text features {dataset.name}"), f"lit_retrieval '{dataset.name}' text features")
        del lit_model  # it holds the lent encoder, which goes back when the block closes
    recalls = retrieval_metrics(image_features, text_features, text_image_index, context.recall_k,
                                dataset_name=dataset.name)
    summary = result.summary
    train_config = experiment.train
    settings = {
        "steps": train_config.max_steps, "train_batch_size": experiment.data.batch_size, "lr": train_config.lr,
        "warmup_steps": train_config.warmup_steps, "schedule": train_config.schedule,
        "weight_decay": train_config.weight_decay, "optimizer": "AdamW", "objective": "clip (learned temperature)",
        "lit_model": config.lit_model, "seed": config.seed, "recall_k": list(context.recall_k),
        "image_side": "frozen encode_image_tokens -> attention pool (1 query) -> linear projection",
        "text_side": "open_clip TextTransformer trained from scratch (CLIP BPE)",
        "run_dir": str(result.run_dir) if keep else None,
    }
    details = {"num_train_pairs": num_pairs, "num_train_images": len(dataset.train), "num_images": len(dataset),
               "num_texts": len(texts), "final_loss": summary.get("final_loss"),
               "final_logit_scale": summary.get("final_metrics", {}).get("logit_scale"),
               "train_time_s": summary.get("train_time_s")}
    return TaskOutput({f"lit_{name}": value for name, value in recalls.items()}, settings, details)


register_task(Task("lit_retrieval", "lit_retrieval", ("captions",), run_lit_retrieval,
                   "LiT: a text tower and attention pool trained on the frozen image tokens, recall@k",
                   check=_check, requires=("image_tokens",)))
