"""The `code_semantics` task: what an image tokenizer's FROZEN codes say about the scene and its caption.

The protocol is the same for every tokenizer, so a plain VQ and an LG-VQ compare fairly. The codes of the
dataset's `train` split and of the held-out images are computed once. Each code is replaced by its codebook
vector (`quantizer.lookup`, [N, D, h, w]). Small probes are then trained on the train codes for
`eval.probe_steps` AdamW steps (batch 64 images, lr 3e-3, seeded by `eval.seed`, on the CPU) and measured on
the held-out codes. The tokenizer itself is never updated.

Scene questions, from the SynthScenes annotations (`EvalDataset.scenes`):

    color, shape   of the main object (8 answers each)
    count          how many objects the scene has (1-4)
    left_of        "is the X left of the Y?", asked for every ordered pair of objects, X and Y named by colour
                   and shape. Yes when X's box centre lies left of Y's (pairs with equal centres are left out).

    Probes: each code vector, with fixed 2-D sin-cos position features appended, is projected to
    `eval.probe_width`. One cross-attention layer (4 heads) runs from learned queries to these code tokens,
    and an MLP reads the attended vectors. colour, shape and count share one probe, with one query and one
    MLP each. left_of has its own probe: two queries, shifted by the colour + shape embeddings of X and of Y.
    Chance is the held-out accuracy of always giving the train split's most frequent answer.

Language probe, from the captions (clipforge.eval.code_language): text -> image retrieval, masked-word
recall (LG-VQ Table 3) and code-word similarity MSE (LG-VQ Table 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.codes import dataset_codes
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, register_task

PROBE_BATCH = 64
PROBE_LR = 3e-3
HEADS = 4
QUESTIONS = ("color", "shape", "count", "left_of")
POSITION_CHANNELS = 16  # fixed 2-D sin-cos position features appended to each code vector


# ---- frozen inputs -------------------------------------------------------------------------------------------

def module_device(module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def code_vectors(model, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """codes [N, h, w] -> their codebook vectors [N, D, h, w] float32 on the CPU."""
    device = module_device(model)
    return torch.cat([model.quantizer.lookup(codes[start:start + batch_size].to(device)).float().cpu()
                      for start in range(0, len(codes), batch_size)])


def split_vectors(context: TaskContext, dataset: EvalDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(train vectors, held-out vectors), each [N, D, h, w]."""
    model = context.features.model
    return code_vectors(model, dataset_codes(context, dataset.train)), code_vectors(model, dataset_codes(context,
                                                                                                       dataset))


def _sample(generator: torch.Generator, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[:PROBE_BATCH]


def fit(probe: nn.Module, batch_loss, steps: int, seed: int) -> nn.Module:
    """`steps` AdamW steps on `batch_loss(generator) -> loss`, seeded; the probe is returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=PROBE_LR)
    probe.train()
    for _ in range(steps):
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


def majority_chance(train_answers: torch.Tensor, test_answers: torch.Tensor) -> float:
    """Held-out accuracy of always giving the train split's most frequent answer."""
    return float((test_answers == torch.bincount(train_answers).argmax()).float().mean())


# ---- scene questions -----------------------------------------------------------------------------------------

@dataclass
class SceneAnswers:
    color: torch.Tensor  # [N] the main object's colour index
    shape: torch.Tensor  # [N]
    count: torch.Tensor  # [N] number of objects - 1
    pairs: torch.Tensor  # [Q, 6] (image, X colour, X shape, Y colour, Y shape, X left of Y)


def scene_answers(scenes: list[dict]) -> SceneAnswers:
    from clipforge.data.synth import COLORS, SHAPES

    color, shape, count, pairs = [], [], [], []
    for image, scene in enumerate(scenes):
        objects = scene["objects"]
        color.append(COLORS.index(objects[0]["color"]))
        shape.append(SHAPES.index(objects[0]["shape"]))
        count.append(len(objects) - 1)
        centres = [(o["box"][0] + o["box"][2]) / 2 for o in objects]
        for i, first in enumerate(objects):
            for j, second in enumerate(objects):
                if i != j and centres[i] != centres[j]:
                    pairs.append((image, COLORS.index(first["color"]), SHAPES.index(first["shape"]),
                                  COLORS.index(second["color"]), SHAPES.index(second["shape"]),
                                  int(centres[i] < centres[j])))
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SceneAnswers(as_long(color), as_long(shape), as_long(count), as_long(pairs).reshape(-1, 6))


def grid_positions(rows: int, columns: int, channels: int) -> torch.Tensor:
    """[rows * columns, channels] fixed 2-D sin-cos positions, row-major: half the channels code x, half y."""
    quarter = channels // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter) / max(quarter, 1)))  # [C/4]
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    angles = [axis.flatten().float()[:, None] * frequencies for axis in (x, y)]  # [hw, C/4] each
    encoding = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # [hw, 4 (C/4)]
    return F.pad(encoding, (0, channels - encoding.shape[1]))


class QueryProbe(nn.Module):
    """Learned queries (optionally shifted per example) cross-attend to the code tokens; one MLP per answer reads
    its own `queries_per_answer` attended vectors."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], width: int, answers: list[int],
                 queries_per_answer: int = 1):
        super().__init__()
        self.register_buffer("position", grid_positions(*grid, POSITION_CHANNELS), persistent=False)  # [hw, C]
        self.input = nn.Linear(embed_dim + POSITION_CHANNELS, width)  # the code vector and its fixed position
        self.norm = nn.LayerNorm(width)
        self.per_answer = queries_per_answer
        self.query = nn.Parameter(torch.randn(len(answers) * queries_per_answer, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, HEADS, batch_first=True)
        inner = queries_per_answer * width
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(inner), nn.Linear(inner, width), nn.GELU(),
                                                 nn.Linear(width, count)) for count in answers)

    def forward(self, tokens: torch.Tensor, shift: torch.Tensor | None = None) -> list[torch.Tensor]:
        """tokens [B, hw, D] code vectors; shift [B, Q, W] or None -> one logits tensor [B, answers] per answer."""
        position = self.position.expand(tokens.shape[0], -1, -1)
        keys = self.norm(self.input(torch.cat([tokens, position], dim=-1)))  # [B, hw, W]
        query = self.query.expand(tokens.shape[0], -1, -1)
        if shift is not None:
            query = query + shift
        attended, _ = self.attention(query, keys, keys, need_weights=False)  # [B, Q, W]
        return [head(attended[:, i * self.per_answer:(i + 1) * self.per_answer].flatten(1))
                for i, head in enumerate(self.heads)]


class RelationProbe(nn.Module):
    """left_of: two queries, shifted by the colour + shape embeddings of X and of Y; yes / no."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], width: int, colors: int, shapes: int):
        super().__init__()
        self.color, self.shape = nn.Embedding(colors, width), nn.Embedding(shapes, width)
        self.probe = QueryProbe(embed_dim, grid, width, [2], queries_per_answer=2)

    def forward(self, tokens: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """tokens [B, hw, D] (the image of each pair); pairs [B, 6] rows of SceneAnswers.pairs -> [B, 2]."""
        shift = torch.stack([self.color(pairs[:, 1]) + self.shape(pairs[:, 2]),
                             self.color(pairs[:, 3]) + self.shape(pairs[:, 4])], dim=1)  # [B, 2, W]
        return self.probe(tokens, shift)[0]


@torch.no_grad()
def _predict(forward, count: int, batch_size: int = 256) -> list[torch.Tensor]:
    """forward(rows) -> list of logits; their argmax over all `count` rows, per answer."""
    outputs = [forward(torch.arange(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    return [torch.cat([logits[i] for logits in outputs]).argmax(dim=1) for i in range(len(outputs[0]))]


IMAGE_QUESTIONS = QUESTIONS[:3]  # answered by one probe, one query and one head each


def scene_probes(train_vectors: torch.Tensor, train_scenes: list[dict], test_vectors: torch.Tensor,
                 test_scenes: list[dict], steps: int, width: int, seed: int) -> tuple[dict, dict]:
    """Train the question probes on the train codes; (metrics, details) on the held-out codes. vectors
    [N, D, h, w]. colour, shape and count share one probe (a query and an MLP each); left_of has its own."""
    from clipforge.data.synth import COLORS, SHAPES

    train, test = scene_answers(train_scenes), scene_answers(test_scenes)
    train_tokens, test_tokens = (v.flatten(2).transpose(1, 2).contiguous() for v in (train_vectors, test_vectors))
    embed_dim, grid = train_vectors.shape[1], tuple(train_vectors.shape[2:])
    answers = [getattr(train, q) for q in IMAGE_QUESTIONS]
    test_answers = [getattr(test, q) for q in IMAGE_QUESTIONS]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_probe = QueryProbe(embed_dim, grid, width,
                                 [int(max(a.max(), b.max())) + 1 for a, b in zip(answers, test_answers)])
        relation_probe = RelationProbe(embed_dim, grid, width, len(COLORS), len(SHAPES))

    def image_loss(generator):
        rows = _sample(generator, len(train_tokens))
        return sum(F.cross_entropy(logits, a[rows]) for logits, a in zip(image_probe(train_tokens[rows]), answers))

    def relation_loss(generator):
        rows = train.pairs[_sample(generator, len(train.pairs))]
        return F.cross_entropy(relation_probe(train_tokens[rows[:, 0]], rows), rows[:, 5])

    fit(image_probe, image_loss, steps, seed)
    predicted = _predict(lambda rows: image_probe(test_tokens[rows]), len(test_tokens))
    if len(train.pairs) and len(test.pairs):  # some scene has two objects
        fit(relation_probe, relation_loss, steps, seed + 1)
        predicted += _predict(lambda rows: [relation_probe(test_tokens[test.pairs[rows, 0]], test.pairs[rows])],
                              len(test.pairs))
        answers.append(train.pairs[:, 5])
        test_answers.append(test.pairs[:, 5])
    metrics = {}
    for question, guess, train_answer, test_answer in zip(QUESTIONS, predicted, answers, test_answers):
        metrics[f"{question}_accuracy"] = float((guess == test_answer).float().mean())
        metrics[f"{question}_chance"] = majority_chance(train_answer, test_answer)
    return metrics, {"num_pairs": {"train": len(train.pairs), "test": len(test.pairs)}}


# ---- the task ------------------------------------------------------------------------------------------------

def _has(dataset: EvalDataset | None, field_name: str) -> bool:
    values = getattr(dataset, field_name, None) if dataset is not None else None
    if field_name == "scenes":  # SynthScenes annotations: every scene names its objects
        return bool(values) and all(scene.get("objects") for scene in values)
    return bool(values)


def _check_code_semantics(dataset: EvalDataset, config) -> str | None:
    if dataset.train is None:
        return f"needs a training split to fit the probes and dataset '{dataset.name}' has none"
    if not any(_has(dataset, f) and _has(dataset.train, f) for f in ("scenes", "captions")):
        return (f"needs SynthScenes annotations (scenes) or captions on both '{dataset.name}' and its training "
                f"split")
    return None


def run_code_semantics(context: TaskContext, dataset: EvalDataset) -> TaskOutput:
    config, started = context.config, time.perf_counter()
    steps, width, seed = config.probe_steps, config.probe_width, config.seed
    train_vectors, test_vectors = split_vectors(context, dataset)
    metrics, details = {}, {"num_train": len(train_vectors), "num_test": len(test_vectors),
                            "grid": list(test_vectors.shape[2:]), "embed_dim": test_vectors.shape[1]}
    settings = {"protocol": "probes on the frozen codes' codebook vectors (quantizer.lookup); trained on the "
                            "dataset's train split, measured on the held-out images",
                "probe_steps": steps, "probe_batch": PROBE_BATCH, "probe_lr": PROBE_LR, "optimizer": "AdamW",
                "probe_width": width, "seed": seed, "device": "cpu"}
    skipped = []
    if _has(dataset, "scenes") and _has(dataset.train, "scenes"):
        scene_metrics, scene_details = scene_probes(train_vectors, dataset.train.scenes, test_vectors,
                                                    dataset.scenes, steps, width, seed)
        metrics.update(scene_metrics)
        details.update(scene_details)
        settings["scene_probe"] = (f"one cross-attention layer ({HEADS} heads) from learned queries to the code "
                                   f"vectors + fixed 2-D sin-cos positions, an MLP per answer; colour/shape/count "
                                   f"share one probe; left_of: two queries shifted by X's and Y's colour+shape "
                                   f"embeddings")
        settings["chance"] = "held-out accuracy of the train split's most frequent answer"
    else:
        skipped.append("scene questions: the dataset has no SynthScenes annotations")
    if _has(dataset, "captions") and _has(dataset.train, "captions"):
        from clipforge.eval import code_language as language

        store = context.features
        prior, tokenizer = language.probe_text_prior(store.model, context.shared, store.device)
        text = context.shared(("code_language_text", id(dataset), id(prior)), lambda: (
            language.split_text(prior, tokenizer, dataset.train, seed, train=True),
            language.split_text(prior, tokenizer, dataset, seed, train=False)))
        language_metrics, language_details = language.language_probe(
            train_vectors, text[0], test_vectors, text[1], prior, tokenizer, steps, width, seed)
        metrics.update(language_metrics)
        details.update(language_details)
        settings.update({
            "text_prior": prior.spec(), "caption_tokens": getattr(tokenizer, "max_length", None),
            "captions": f"one chosen per image (phrasing drawn with the seed): sentence, word features and the "
                        f"held-out masked caption; training images: up to {language.TRAIN_CAPTIONS} masked "
                        f"captions each",
            "language_probe": f"lgvq CodeEncoder (1 pre-LN layer, width {width}) -> E; InfoNCE (symmetric, "
                              f"temperature {language.TEMPERATURE}) of E[:, 0] projected vs the prior's sentence "
                              f"feature, plus the masked-word CE of a 1-layer decoder over the masked caption "
                              f"with cross-attention to E, trained together",
            "masked_words": f"{language.MASK_RATIO[0]}-{language.MASK_RATIO[1]} of each caption's whole words, "
                            f"seeded; the prior reads the masked caption; recall@1 per token over the dataset's "
                            f"caption tokens; _visual: colour/shape/size/fill tokens; chance: the most frequent "
                            f"train token",
            "code_word_similarity_mse": "relationship_alignment_loss: word tokens matched to code positions by "
                                        "argmax cosine with E[:, 1:], compared through the raw codebook vectors",
        })
    details["skipped"] = skipped
    details["seconds"] = time.perf_counter() - started
    return TaskOutput(metrics, settings, details)


register_task(Task("code_semantics", "code_semantics", (), run_code_semantics,
                   "probes on frozen codes: scene questions, text->image R@1, masked-word recall, code-word MSE",
                   check=_check_code_semantics, requires=("codes",)))
