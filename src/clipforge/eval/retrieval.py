"""Image-text retrieval with several captions per image (CLIP_benchmark `zeroshot_retrieval`; spec A7).

All captions of all images are the text side; `text_image_index[t]` is the image caption t belongs to.
scores = texts @ images.T, [T, N], on unit-norm features. A query is a hit at k when at least one correct
item is among its k highest scores (torch.topk order, as CLIP_benchmark). Names follow CLIP_benchmark, which
are easy to misread:

- `image_retrieval_recall@k`: text -> image. Each caption retrieves images; its one image is the positive.
- `text_retrieval_recall@k`:  image -> text. Each image retrieves captions; any of its captions is a hit.

When k >= the gallery size every query is a hit (recall 1.0). Images without captions cannot be i2t queries;
they stay in the gallery and a warning says how many were left out as queries.
"""

from __future__ import annotations

import warnings

import torch

from clipforge.errors import DataError

DEFAULT_RECALL_K = (1, 5, 10)


def flatten_captions(captions: list[list[str]], dataset_name: str = "dataset") -> tuple[list[str], torch.Tensor]:
    """Per-image caption lists -> (texts [T], text_image_index [T] int64)."""
    texts, owners = [], []
    for image_index, image_captions in enumerate(captions):
        for caption in image_captions:
            texts.append(caption)
            owners.append(image_index)
    if not texts:
        raise DataError(f"{dataset_name}: retrieval needs captions, and no image has one")
    return texts, torch.tensor(owners, dtype=torch.long)


def _hits_at_k(scores: torch.Tensor, is_positive, k: int, chunk: int) -> torch.Tensor:
    """[Q] bool: does each query row of `scores` [Q, G] have a positive among its top-k columns?"""
    k = min(k, scores.shape[1])
    hits = []
    for start in range(0, scores.shape[0], chunk):
        top = scores[start:start + chunk].topk(k, dim=1).indices  # [q, k] gallery indices
        hits.append(is_positive(start, top).any(dim=1))
    return torch.cat(hits)


def retrieval_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[T, N] caption-image similarities (one matmul, as CLIP_benchmark)."""
    return text_features @ image_features.T


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image_index: torch.Tensor,
    recall_k: tuple[int, ...] = DEFAULT_RECALL_K, chunk: int = 1024, scores: torch.Tensor | None = None,
    dataset_name: str = "dataset",
) -> dict:
    """Recall@k in both directions for unit-norm image [N, D] and text [T, D] features."""
    if len(text_features) == 0:
        raise DataError(f"{dataset_name}: retrieval needs captions, and no image has one")
    num_images = image_features.shape[0]
    text_image_index = torch.as_tensor(text_image_index, dtype=torch.long)
    scores = retrieval_scores(image_features, text_features) if scores is None else scores  # [T, N]
    has_caption = torch.bincount(text_image_index, minlength=num_images) > 0  # [N]
    if not bool(has_caption.all()):
        warnings.warn(f"{dataset_name}: {int((~has_caption).sum())} of {num_images} images have no caption; they "
                      f"are left out as image->text queries (still retrievable as images)", stacklevel=2)
    metrics = {}
    for k in recall_k:
        # text -> image: the caption's own image among its top-k images
        t2i = _hits_at_k(scores, lambda start, top: top == text_image_index[start:start + top.shape[0], None],
                         k, chunk)
        # image -> text: any of the image's captions among its top-k captions
        i2t = _hits_at_k(scores.T, lambda start, top: text_image_index[top] == torch.arange(
            start, start + top.shape[0])[:, None], k, chunk)
        metrics[f"image_retrieval_recall@{k}"] = t2i.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[has_caption].float().mean().item()
    return metrics


def retrieval_examples(
    scores: torch.Tensor, texts: list[str], text_image_index: torch.Tensor, num_queries: int = 6, k: int = 5,
) -> list[dict]:
    """A few caption queries (evenly spread, deterministic) with their top-k images, for the report."""
    num_texts = scores.shape[0]
    queries = sorted({round(i * (num_texts - 1) / max(num_queries - 1, 1)) for i in range(min(num_queries,
                                                                                              num_texts))})
    examples = []
    for query in queries:
        values, top = scores[query].topk(min(k, scores.shape[1]))
        target = int(text_image_index[query])
        target_rank = int((scores[query] > scores[query, target]).sum()) + 1  # 1 = best
        examples.append({
            "caption": texts[query],
            "text_index": query,
            "target_image": target,
            "target_rank": target_rank,
            "top": [{"image": int(i), "score": float(v), "correct": int(i) == target}
                    for v, i in zip(values.tolist(), top.tolist())],
        })
    return examples
