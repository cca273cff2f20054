"""The captioning head of frozen transfer: frozen image tokens -> MLP -> a small causal LM trained from scratch.

    vocabulary = WordVocabulary.from_captions(train_captions)
    model, losses = train_captioner(train_tokens [N, T, W], train_captions, vocabulary, steps=300, lr=3e-3)
    captions = generate_captions(model, test_tokens, vocabulary)          # greedy
    caption_scores(captions, test_captions)                               # {"bleu4", "cider"} (pycocoevalcap)

The sequence is `[mapped vision tokens (T)] <bos> w1 ... wn` and the LM predicts `w1 ... wn <eos>`; the loss is
on the caption only, the prefix is never a target. The vocabulary is word-level, built from the training
captions (lower-case, punctuation dropped, as COCO's PTB tokenisation drops it before scoring): SynthScenes
captions have 45 words, and a word LM of that size trains in seconds on one core. Scores use pycocoevalcap on
the same word tokenisation for hypotheses and references (its Java PTB tokenizer is not used).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter

import torch
from torch import nn

from clipforge.errors import DataError

MAX_WORDS = 40  # longer captions are cut for training; decoding stops after this many words
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
IGNORE = -100
WEIGHT_DECAY = 0.01
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: 'A red circle, left of it.' -> ['a', 'red', 'circle', 'left', ...]."""
    return _WORD.findall(text.lower())


@contextlib.contextmanager
def seeded(seed: int):
    """The global CPU RNG set to `seed` inside (for parameter initialisation), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """lr factor for optimiser step `step` (0-based): linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(parameters, lr: float, device: torch.device) -> torch.optim.AdamW:
    # the fused kernel: one pass over all tensors (several times faster than the default on the CPU)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=WEIGHT_DECAY,
                             fused=True if device.type in ("cpu", "cuda") else None)


class WordVocabulary:
    """Word <-> id; ids 0-3 are <pad>, <bos>, <eos>, <unk>, then words by frequency (ties alphabetical)."""

    def __init__(self, words: list[str]):
        self.itos = list(SPECIALS) + list(words)
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def from_captions(cls, captions: list[list[str]]) -> WordVocabulary:
        counts = Counter(word for per_image in captions for caption in per_image for word in caption_words(caption))
        return cls(sorted(counts, key=lambda word: (-counts[word], word)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_words: int = MAX_WORDS) -> list[int]:
        return [self.stoi.get(word, UNK) for word in caption_words(caption)[:max_words]]

    def decode(self, ids: list[int]) -> str:
        words = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return " ".join(words)


class CaptionModel(nn.Module):
    """MLP mapping of each vision token into the LM's width, then a causal pre-norm transformer over
    `[prefix] <bos> words`; logits only at the word positions."""

    SIZES = {"lm_width": 64, "lm_layers": 2, "lm_heads": 4, "mapping": "LayerNorm, Linear(W, 2x), GELU, Linear"}
    BATCH = 64  # (image, caption) pairs per step

    def __init__(self, token_width: int, num_tokens: int, vocab_size: int, max_words: int = MAX_WORDS,
                 width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.mapping = nn.Sequential(nn.LayerNorm(token_width), nn.Linear(token_width, 2 * width), nn.GELU(),
                                     nn.Linear(2 * width, width))
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(num_tokens + max_words + 2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, W], words [B, L] (starting with <bos>) -> next-word logits [B, L, V]."""
        num_tokens, length = tokens.shape[1], tokens.shape[1] + words.shape[1]
        x = torch.cat([self.mapping(tokens), self.embedding(words)], dim=1) + self.position[:length]  # [B, T+L, D]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        hidden = self.transformer(x, mask=mask, is_causal=True)
        return self.head(self.norm(hidden[:, num_tokens:]))


def caption_pairs(captions: list[list[str]], vocabulary: WordVocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index [P], ids [P, MAX_WORDS + 2] = <bos> words <eos> <pad>...) of every non-empty caption."""
    images, rows = [], []
    for image, per_image in enumerate(captions):
        for caption in per_image:
            ids = vocabulary.encode(caption)
            if ids:
                images.append(image)
                rows.append([BOS] + ids + [EOS] + [PAD] * (MAX_WORDS - len(ids)))
    return torch.tensor(images, dtype=torch.long), torch.tensor(rows, dtype=torch.long)


def train_captioner(tokens: torch.Tensor, captions: list[list[str]], vocabulary: WordVocabulary, *,
                    steps: int = 300, lr: float = 3e-3, seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[CaptionModel, list[float]]:
    """`steps` AdamW steps (warm-up, cosine decay) on random (image, caption) pairs of tokens [N, T, W] and their
    captions; returns the model (eval mode) and the mean loss of each twentieth of training."""
    device = torch.device(device)
    images, sequences = caption_pairs(captions, vocabulary)
    if len(images) == 0:
        raise DataError("the captioner needs training captions with words and got none")
    with seeded(seed):
        model = CaptionModel(tokens.shape[-1], tokens.shape[1], len(vocabulary))
    model.to(device).train()
    optimizer = adamw(model.parameters(), lr, device)
    warmup = min(100, steps // 10)
    generator = torch.Generator().manual_seed(seed)
    history, window = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup)
        pick = torch.randint(len(images), (CaptionModel.BATCH,), generator=generator)
        batch = sequences[pick]
        length = int((batch != PAD).sum(dim=1).max())  # <bos> ... <eos>
        words = batch[:, :length - 1]  # [B, L] inputs: <bos> w1 .. wn
        targets = batch[:, 1:length].masked_fill(batch[:, 1:length] == PAD, IGNORE)  # [B, L]: w1 .. wn <eos>
        logits = model(tokens[images[pick]].to(device), words.to(device))  # [B, L, V]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if len(window) >= max(1, steps // 20) or step == steps - 1:
            history.append(sum(window) / len(window))
            window = []
    return model.eval(), history


@torch.no_grad()
def generate_captions(model: CaptionModel, tokens: torch.Tensor, vocabulary: WordVocabulary,
                      max_words: int = MAX_WORDS, batch_size: int = 256) -> list[str]:
    """Greedy decoding for each image of tokens [N, T, W], up to `max_words` words or <eos>."""
    device = next(model.parameters()).device
    captions = []
    for start in range(0, len(tokens), batch_size):
        prefix = tokens[start:start + batch_size].to(device)  # [B, T, W]
        words = torch.full((len(prefix), 1), BOS, dtype=torch.long, device=device)
        finished = torch.zeros(len(prefix), dtype=torch.bool, device=device)
        for _ in range(max_words + 1):
            logits = model(prefix, words)[:, -1]  # [B, V]
            logits[:, [PAD, BOS, UNK]] = float("-inf")  # never targets in training
            following = logits.argmax(dim=-1).masked_fill(finished, PAD)
            words = torch.cat([words, following[:, None]], dim=1)
            finished |= following == EOS
            if bool(finished.all()):
                break
        captions.extend(vocabulary.decode(row[1:]) for row in words.tolist())
    return captions


def caption_scores(generated: list[str], references: list[list[str]]) -> dict:
    """{"bleu4", "cider"} of one generated caption per image against all of its reference captions, both word-
    tokenised by `caption_words`: pycocoevalcap's Bleu(4) (closest reference length) and Cider (CIDEr-D, document
    frequencies from these references)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated captions for {len(references)} reference lists")
    gts = {i: [" ".join(caption_words(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(caption_words(caption))] for i, caption in enumerate(generated)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
