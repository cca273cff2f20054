"""Image and text features: each image is encoded once per (model, dataset) and shared by every task.

A model is anything with `encode_image(images [B, 3, H, W]) -> [B, D]` and `encode_text(tokens [B, L]) ->
[B, D]` (an open_clip CLIP, ours, a user's own). Features are L2-normalised float32 on the CPU: zero-shot,
retrieval, linear probe, few-shot and robustness all use unit-norm `encode_image` outputs (the CLIP_benchmark
convention), so one pass serves them all. `FeatureStore` caches them by dataset object and by text list, and
refuses features that are not finite (NaN weights would otherwise give chance-level numbers with no word).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clipforge.errors import ClipforgeError, ConfigError

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _PreprocessedImages(Dataset):
    def __init__(self, images: Sequence, preprocess: Callable):
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.images[index])  # [3, H, W]


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, enabled=True) if amp else contextlib.nullcontext()


@torch.no_grad()
def compute_image_features(
    model, preprocess: Callable, images: Sequence, batch_size: int = 256, device: torch.device | None = None,
    workers: int = 0, amp: bool = False, progress: ProgressFn | None = None, stage: str = "image features",
) -> torch.Tensor:
    """Unit-norm `encode_image` features of every image, in order: [N, D] float32 on the CPU."""
    device = device or model_device(model)
    loader = DataLoader(_PreprocessedImages(images, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    chunks, done = [], 0
    for batch in loader:  # [B, 3, H, W]
        with _autocast(device, amp):
            features = model.encode_image(batch.to(device, non_blocking=True))  # [B, D]
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        done += batch.shape[0]
        if progress is not None:
            progress(stage, done, len(images))
    return torch.cat(chunks)


@torch.no_grad()
def compute_text_features(
    model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256, device: torch.device | None = None,
    amp: bool = False, progress: ProgressFn | None = None, stage: str = "text features",
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-norm `encode_text` features of every text, in order: [T, D] float32 on the CPU. `tokens` [T, L]
    (the tokenizer's output for all of `texts`, when already computed) are used instead of tokenizing again."""
    device = device or model_device(model)
    pretokenized = isinstance(tokens, torch.Tensor) and tokens.shape[0] == len(texts)
    chunks = []
    for start in range(0, len(texts), batch_size):
        if pretokenized:
            batch = tokens[start:start + batch_size].to(device)  # [B, L]
        else:
            batch = tokenizer(list(texts[start:start + batch_size])).to(device)  # [B, L]
        with _autocast(device, amp):
            features = model.encode_text(batch)  # [B, D]
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        if progress is not None:
            progress(stage, min(start + batch_size, len(texts)), len(texts))
    return torch.cat(chunks)


def check_finite(features: torch.Tensor, what: str) -> torch.Tensor:
    """`features` [N, D], or ClipforgeError naming `what` when a row holds NaN or inf."""
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        raise ClipforgeError(f"{what}: the model gave non-finite (NaN or inf) features for {int(bad.sum())} of "
                             f"{len(features)} inputs; check the model's weights")
    return features


class FeatureStore:
    """Computes features on first request and keeps them: one image pass per dataset, one text pass per list.

    `seconds` and `images_encoded` / `texts_encoded` tell what the passes cost (the suite reports them).
    """

    def __init__(self, model, preprocess: Callable, tokenizer: Callable | None, batch_size: int = 256,
                 device: torch.device | None = None, workers: int = 0, amp: bool = False,
                 progress: ProgressFn | None = None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device or model_device(model)
        self.workers = workers
        self.amp = amp
        self.progress = progress
        self._images: dict[int, tuple[object, torch.Tensor]] = {}
        self._texts: dict[tuple[str, ...], torch.Tensor] = {}
        self.seconds = {"image": 0.0, "text": 0.0}
        self.images_encoded = 0
        self.texts_encoded = 0

    def image_features(self, dataset) -> torch.Tensor:
        """[N, D] unit-norm features of `dataset.images` (an EvalDataset or any object with `.images`)."""
        entry = self._images.get(id(dataset))
        if entry is not None and entry[0] is dataset:
            return entry[1]
        start = time.perf_counter()
        name = getattr(dataset, "name", "images")
        features = compute_image_features(self.model, self.preprocess, dataset.images, self.batch_size,
                                          self.device, self.workers, self.amp, self.progress,
                                          stage=f"features {name}")
        check_finite(features, f"dataset '{name}' image features")
        self.seconds["image"] += time.perf_counter() - start
        self.images_encoded += len(dataset.images)
        self._images[id(dataset)] = (dataset, features)  # the dataset is kept so its id stays unique
        return features

    def text_features(self, texts: Sequence[str], stage: str = "text features",
                      tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[T, D] unit-norm features of `texts` (`tokens`: their tokenizer output, when already computed)."""
        key = tuple(texts)
        if key not in self._texts:
            if self.tokenizer is None:
                raise ConfigError(f"{stage}: text features need a tokenizer and none was given")
            start = time.perf_counter()
            self._texts[key] = check_finite(
                compute_text_features(self.model, self.tokenizer, key, self.batch_size, self.device, self.amp,
                                      self.progress, stage=stage, tokens=tokens), stage)
            self.seconds["text"] += time.perf_counter() - start
            self.texts_encoded += len(key)
        return self._texts[key]
