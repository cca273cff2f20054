"""GeNIe-Ada: choose the noise ratio per (source image, target class) from a frozen classifier's embeddings.

For each ratio r_k of a grid (GeNIe: 0.5, 0.6, 0.7, 0.8, 0.9) the source is edited towards the target prompt
with the same noise. Each edit's embedding e_k is projected onto the line from the source's embedding e_src to
the target class prototype p (the mean embedding of the target class's real images):

    s_k = <e_k - e_src, p - e_src> / ||p - e_src||^2          (0 at the source, 1 at the prototype)

and the chosen ratio is the one just after the largest jump |s_{k+1} - s_k|: the edit right past the point where
the image's semantics flip to the target class (Koohpayegani et al., arXiv 2312.02548). Embeddings are
L2-normalised first, as the paper's backbone features are; the prototype is the mean of normalised embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from clipforge.errors import CheckpointError

DEFAULT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)

Embedder = Callable[[list[Image.Image]], torch.Tensor]  # N RGB images -> [N, D]


def normalise(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.double(), dim=-1)


def projection_scores(source: torch.Tensor, prototype: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
    """[K] position of each edit on the source -> prototype line; source [D], prototype [D], edits [K, D]."""
    direction = prototype - source  # [D]
    length = direction.dot(direction).clamp_min(1e-12)
    return (edits - source) @ direction / length


def select_ratio(scores: torch.Tensor) -> int:
    """Index into the grid of the ratio just after the largest jump of `scores` ([K], K >= 2); ties: the first."""
    if scores.numel() < 2:
        return 0
    jumps = (scores[1:] - scores[:-1]).abs()
    return int(torch.argmax(jumps)) + 1


def embed_images(embedder: Embedder, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """[N, D] L2-normalised (float64) embeddings of `images`, `batch_size` at a time."""
    parts = []
    for first in range(0, len(images), batch_size):
        with torch.no_grad():
            out = embedder(images[first:first + batch_size])
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(images[first:first + batch_size]):
            raise ValueError("the embedder must return a [N, D] tensor for N images")
        parts.append(normalise(out.detach().cpu()))
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.float64)


def class_prototypes(embeddings: torch.Tensor, labels: Sequence[int], classes: Sequence[int]) -> dict[int, torch.Tensor]:
    """{class: [D] mean of the normalised embeddings of its images}; embeddings [N, D], one label per row."""
    label_tensor = torch.as_tensor(list(labels))
    return {c: embeddings[label_tensor == c].mean(dim=0) for c in classes if bool((label_tensor == c).any())}


def load_embedder(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Embedder, str]:
    """A frozen classifier backbone from a clipforge run or checkpoint folder: (its `encode_image` on PIL images
    through its own evaluation preprocess, the sha256 of its weight file)."""
    from clipforge.models.factory import find_model_weights, load_model

    weights = find_model_weights(checkpoint)
    model, preprocess, _ = load_model(None, checkpoint=checkpoint, device=device)
    if not callable(getattr(model, "encode_image", None)):
        raise CheckpointError(f"the model in '{checkpoint}' has no encode_image; GeNIe-Ada needs image embeddings")
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)

    def embed(images: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device)
        return model.encode_image(batch).float()

    return embed, digest.hexdigest()
