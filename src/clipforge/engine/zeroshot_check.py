"""A minimal zero-shot check at the end of training, on held-out SynthScenes images.

Classifies SynthScenes validation images (held-out scenes; base classes) among the base class names with
one prompt, "a photo of a {}.", and reports top-1 accuracy (chance = 1 / number of base classes). It also
reports accuracy on novel colour x shape compositions, which never appear in training captions, among all
classes. The full evaluation (templates, retrieval, probes, robustness) is clipforge.eval's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROMPT = "a photo of a {}."


@torch.no_grad()
def _class_embeddings(model: nn.Module, tokenizer, classnames: list[str], device) -> torch.Tensor:
    tokens = tokenizer([PROMPT.format(name) for name in classnames]).to(device)  # [C, L]
    return F.normalize(model.encode_text(tokens), dim=-1)  # [C, D]


@torch.no_grad()
def _accuracy(model, preprocess, tokenizer, generator, count, classes, classnames, device, batch_size) -> float:
    text = _class_embeddings(model, tokenizer, [classnames[c] for c in classes], device)  # [C, D]
    class_index = {label: i for i, label in enumerate(classes)}
    correct = 0
    for start in range(0, count, batch_size):
        scenes = [generator.scene(i) for i in range(start, min(count, start + batch_size))]
        images = torch.stack([preprocess(generator.render(scene)) for scene in scenes]).to(device)  # [b, 3, H, W]
        targets = torch.tensor([class_index[scene.label] for scene in scenes], device=device)  # [b]
        image = F.normalize(model.encode_image(images), dim=-1)  # [b, D]
        correct += int(((image @ text.T).argmax(dim=1) == targets).sum())
    return correct / count


def synth_zeroshot(model: nn.Module, preprocess, tokenizer, config, device: torch.device) -> dict:
    """{"zeroshot_base_acc1", "zeroshot_novel_acc1", "chance_base", "chance_novel", "num_images", "prompt"}."""
    from clipforge.data.synth import BASE_CLASSES, CLASSNAMES, SynthScenes

    synth = config.data.synth
    count = min(config.eval.num_eval, 1000)
    was_training = model.training
    model.eval()
    try:
        base = _accuracy(
            model, preprocess, tokenizer, SynthScenes(synth.image_size, synth.seed, "val", synth.omit_fraction),
            count, list(BASE_CLASSES), CLASSNAMES, device, config.eval.batch_size,
        )
        novel = _accuracy(
            model, preprocess, tokenizer, SynthScenes(synth.image_size, synth.seed, "novel", synth.omit_fraction),
            count, list(range(len(CLASSNAMES))), CLASSNAMES, device, config.eval.batch_size,
        )
    finally:
        model.train(was_training)
    return {
        "zeroshot_base_acc1": base,
        "zeroshot_novel_acc1": novel,
        "chance_base": 1.0 / len(BASE_CLASSES),
        "chance_novel": 1.0 / len(CLASSNAMES),
        "num_images": count,
        "prompt": PROMPT,
    }
