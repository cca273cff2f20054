"""The language probe of the `code_semantics` task (clipforge.eval.code_probes): LG-VQ's language heads in
miniature, trained on an image tokenizer's FROZEN codes (objectives/lgvq.py holds the heads LG-VQ trains).

The text side is frozen and computed once per dataset: the same features serve every tokenizer. It comes from
the tokenizer's own text prior, or from all-MiniLM-L6-v2 (max length 40) when it has none. Every image has one
"chosen" caption, its phrasing drawn with the seed. That caption gives the sentence feature, the word features
and, on the held-out split, the masked caption that is scored. A training image contributes every caption
(up to TRAIN_CAPTIONS, each masked once) to the masked-word head: one caption per image learns too little.

    E            lgvq's CodeEncoder (one pre-LN layer of width `probe_width`) over the codebook vectors:
                 E [N, 1+hw, Dt]
    retrieval    E[:, 0] projected to the prior's sentence space; InfoNCE (symmetric, temperature 0.07) with
                 the chosen caption's sentence feature. image_retrieval_recall@k: text -> image over the
                 held-out images.
    masked word  LG-VQ Table 3. 10-30% of a caption's whole words are masked, seeded and fixed per caption.
                 The masked tokens become the prior's mask id BEFORE the prior reads the caption, so no
                 feature can carry a hidden word (the official LG-VQ code reads the unmasked caption). The
                 prior's token features of the masked caption enter one pre-LN transformer decoder layer
                 (self-attention over the caption, cross-attention to E projected to the probe width). At each
                 masked token, its output is scored against the prior's token embeddings of the candidate
                 tokens (every token in the dataset's captions) plus a learned bias. masked_word_recall@1 is
                 per token; `_visual` covers the tokens of attribute words (colour, shape, size, fill).
    code-word    LG-VQ Table 4, via lgvq's `relationship_alignment_loss`. Each word token of the chosen caption
                 is matched to the code position whose E[:, 1:] is most similar to its prior feature (argmax
                 cosine). The metric is the MSE, over valid word pairs, between the word-word cosines and the
                 cosines of the matched positions' codebook vectors. No learned head sits on the codebook
                 vectors, so the number describes the codes (the probe only matches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.code_probes import HEADS, _sample, fit, majority_chance, module_device

TEMPERATURE = 0.07
MASK_RATIO = (0.1, 0.3)  # LG-VQ's range for the share of masked words
MAX_LENGTH = 40  # caption tokens for the MiniLM prior
RECALL_K = (1, 5)
TRAIN_CAPTIONS = 4  # masked captions per training image (SynthScenes has four phrasings)


def probe_text_prior(model, shared=None, device: torch.device | str = "cpu"):
    """(prior, tokenizer): the model's own text prior, or all-MiniLM-L6-v2 (`shared(key, compute)` caches it).
    MiniLM reads MAX_LENGTH tokens."""
    from clipforge.models.text_prior import CaptionTokenizer, build_text_prior

    own = getattr(model, "text_prior", None)
    if own is not None and own.kind != "minilm":
        return own, own.tokenizer
    if own is None:
        def load():
            return build_text_prior({"kind": "minilm", "max_length": MAX_LENGTH}).to(device)
        own = shared("minilm_prior", load) if shared is not None else load()
    return own, CaptionTokenizer(own.tokenizer.tokenizer, MAX_LENGTH)


@torch.no_grad()
def run_prior(prior, ids: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, L, Dt], sentence [N, Ds]) float32 on the CPU, in batches of similar length (less padding)."""
    device = module_device(prior)
    lengths = prior.attention(ids.to(device)).sum(dim=1).cpu()
    order = torch.argsort(lengths, stable=True)
    tokens = sentence = None
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        used = int(lengths[rows].max())
        out = prior(ids[rows, :used].to(device))
        if tokens is None:
            tokens = torch.zeros(len(ids), ids.shape[1], out.tokens.shape[-1])
            sentence = torch.zeros(len(ids), out.sentence.shape[-1])
        tokens[rows, :used] = out.tokens.float().cpu()
        sentence[rows] = out.sentence.float().cpu()
    return tokens, sentence


def word_mask(prior, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, L] word tokens: not special, not padding; [N, L] the first token of each word), on the CPU."""
    on_device = ids.to(module_device(prior))
    valid = (~prior.special(on_device) & prior.attention(on_device)).cpu()
    return valid, prior.word_starts(on_device).cpu() & valid


@dataclass
class SentenceFeatures:
    """The chosen caption of each image: [N] rows."""

    ids: torch.Tensor  # [N, L]
    sentence: torch.Tensor  # [N, Ds] the prior's sentence feature
    word_tokens: torch.Tensor  # [N, L, Dt] the prior's token features
    word_valid: torch.Tensor  # [N, L] bool: word tokens


@dataclass
class MaskedCaptions:
    """Masked captions: [T] rows, each of image `owner`."""

    owner: torch.Tensor  # [T]
    ids: torch.Tensor  # [T, L] the caption's tokens (the targets, at `masked`)
    masked: torch.Tensor  # [T, L] bool: the hidden tokens
    masked_ids: torch.Tensor  # [T, L] what the prior read: the caption with its masked tokens set to the mask id
    context: torch.Tensor  # [T, L, Dt] the prior's token features of the masked caption
    padding: torch.Tensor  # [T, L] bool


def sentence_features(prior, tokenizer, captions: list[str]) -> SentenceFeatures:
    ids = tokenizer(list(captions)).cpu()  # [N, L]
    tokens, sentence = run_prior(prior, ids)
    return SentenceFeatures(ids, sentence, tokens, word_mask(prior, ids)[0])


def masked_captions(prior, tokenizer, captions: list[str], owner: torch.Tensor, seed: int) -> MaskedCaptions:
    """Mask each caption (the masks depend on the seed, the caption's row and its word layout only, so a
    different hidden word gives the same mask) and run the prior on the MASKED caption."""
    from clipforge.objectives.lgvq import choose_masked_words

    ids = tokenizer(list(captions)).cpu()  # [T, L]
    words, starts = word_mask(prior, ids)
    masked = choose_masked_words(starts, words, *MASK_RATIO, generator=torch.Generator().manual_seed(seed))
    masked_ids = torch.where(masked, torch.full_like(ids, prior.mask_id), ids)
    context, _ = run_prior(prior, masked_ids)
    padding = ~prior.attention(masked_ids.to(module_device(prior))).cpu()
    return MaskedCaptions(owner, ids, masked, masked_ids, context, padding)


def chosen_caption_index(dataset, seed: int) -> list[int]:
    """Which caption of each image is its chosen one: drawn with `seed`, the same for every tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(len(captions), (1,), generator=generator)) for captions in dataset.captions]


def split_text(prior, tokenizer, dataset, seed: int, train: bool) -> tuple[SentenceFeatures, MaskedCaptions]:
    """A split's frozen text side: its chosen captions' features, and its masked captions (a training split:
    up to TRAIN_CAPTIONS per image; a held-out split: the chosen caption)."""
    chosen = chosen_caption_index(dataset, seed)
    sentences = sentence_features(prior, tokenizer, [c[i] for c, i in zip(dataset.captions, chosen)])
    if train:
        pairs = [(image, caption) for image, captions in enumerate(dataset.captions)
                 for caption in captions[:TRAIN_CAPTIONS]]
    else:
        pairs = [(image, captions[i]) for image, (captions, i) in enumerate(zip(dataset.captions, chosen))]
    owner = torch.tensor([image for image, _ in pairs], dtype=torch.long)
    return sentences, masked_captions(prior, tokenizer, [caption for _, caption in pairs], owner, seed + 1)


class LanguageProbe(nn.Module):
    """The code encoder, its sentence projection, and a one-layer masked-word decoder."""

    def __init__(self, embed_dim: int, grid: int, width: int, token_dim: int, sentence_dim: int, length: int,
                 candidates: torch.Tensor):
        from clipforge.objectives.lgvq import CodeEncoder

        super().__init__()
        self.code_encoder = CodeEncoder(embed_dim, grid, width, 1, HEADS, token_dim)
        self.sentence_projection = nn.Linear(token_dim, sentence_dim, bias=False)
        self.memory = nn.Sequential(nn.Linear(token_dim, width), nn.LayerNorm(width))
        self.text = nn.Sequential(nn.Linear(token_dim, width), nn.LayerNorm(width))
        self.text_position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.decoder = nn.TransformerDecoderLayer(width, HEADS, dim_feedforward=2 * width, dropout=0.0,
                                                  activation="gelu", batch_first=True, norm_first=True)
        self.word_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, token_dim), nn.LayerNorm(token_dim))
        self.register_buffer("candidates", candidates.detach().clone())  # [C, Dt] the prior's token embeddings
        self.bias = nn.Parameter(torch.zeros(len(candidates)))

    def image_embedding(self, encoded: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sentence_projection(encoded[:, 0]), dim=-1)  # [B, Ds]

    def word_logits(self, encoded: torch.Tensor, context: torch.Tensor, padding: torch.Tensor,
                    masked: torch.Tensor) -> torch.Tensor:
        """encoded [B, 1+hw, Dt] E of each caption's image; context [B, L, Dt] the prior's features of the masked
        captions; padding, masked [B, L] -> logits [M, C] at the masked tokens (row-major)."""
        text = self.text(context) + self.text_position[:context.shape[1]]
        hidden = self.decoder(text, self.memory(encoded), tgt_key_padding_mask=padding)  # [B, L, W]
        return self.word_head(hidden[masked]) @ self.candidates.T + self.bias


def _candidate_tokens(prior, tokenizer, *captions: MaskedCaptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate token ids [C] sorted: every word token of the captions, the attribute-word ids among them)."""
    from clipforge.data.synth import COLORS, FILLS, SHAPES, SIZES

    candidates = torch.cat([c.ids[word_mask(prior, c.ids)[0]] for c in captions]).unique()
    attribute_ids = tokenizer(list(COLORS + SHAPES + SIZES + FILLS)).cpu()
    return candidates, attribute_ids[word_mask(prior, attribute_ids)[0]].unique()


def _trimmed(captions: MaskedCaptions, rows: torch.Tensor):
    """(context, padding, masked) of caption `rows`, cut after their longest caption."""
    used = int((~captions.padding[rows]).any(dim=0).nonzero().max()) + 1
    return captions.context[rows, :used], captions.padding[rows, :used], captions.masked[rows, :used]


def code_word_similarity_mse(word_tokens: torch.Tensor, word_valid: torch.Tensor, code_tokens: torch.Tensor,
                             code_vectors: torch.Tensor, chunk: int = 256) -> float:
    """relationship_alignment_loss over all N captions (word pairs pooled, in chunks): word_tokens [N, L, Dt],
    word_valid [N, L], code_tokens [N, P, Dt] (what words are matched to), code_vectors [N, P, D]."""
    from clipforge.objectives.lgvq import relationship_alignment_loss

    pairs = word_valid.sum(dim=1).double().pow(2)  # [N] valid word pairs per caption
    total = 0.0
    for start in range(0, len(word_tokens), chunk):
        part = slice(start, start + chunk)
        if float(pairs[part].sum()) > 0:
            loss = relationship_alignment_loss(word_tokens[part], word_valid[part], code_tokens[part],
                                               code_vectors[part])
            total += float(loss) * float(pairs[part].sum())
    return total / max(float(pairs.sum()), 1.0)


def language_probe(train_vectors: torch.Tensor, train_text: tuple[SentenceFeatures, MaskedCaptions],
                   test_vectors: torch.Tensor, test_text: tuple[SentenceFeatures, MaskedCaptions], prior,
                   tokenizer, steps: int, width: int, seed: int) -> tuple[dict, dict]:
    """Train the probe on the train codes [N, D, h, w]; (metrics, details) on the held-out ones."""
    from clipforge.eval.retrieval import retrieval_metrics

    (train_sentences, train_masked), (test_sentences, test_masked) = train_text, test_text
    candidates, attribute_ids = _candidate_tokens(prior, tokenizer, train_masked, test_masked)
    to_candidate = torch.full((int(candidates.max()) + 1,), -1, dtype=torch.long)
    to_candidate[candidates] = torch.arange(len(candidates))
    embeddings = prior.token_embeddings()[candidates.to(module_device(prior))].float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LanguageProbe(train_vectors.shape[1], train_vectors.shape[2], width, embeddings.shape[1],
                              train_sentences.sentence.shape[1], train_masked.ids.shape[1], embeddings)
    sentences = F.normalize(train_sentences.sentence, dim=-1)
    counts = torch.bincount(train_masked.owner, minlength=len(train_vectors))  # masked captions per image
    first = torch.cumsum(counts, dim=0) - counts  # rows are grouped by image, in image order

    def batch_loss(generator):
        rows = _sample(generator, len(train_vectors))
        encoded = probe.code_encoder(train_vectors[rows])  # [B, 1+hw, Dt]
        logits = probe.image_embedding(encoded) @ sentences[rows].T / TEMPERATURE
        labels = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        has = counts[rows] > 0
        if bool(has.any()):  # one of each image's masked captions
            pick = (torch.rand(len(rows), generator=generator) * counts[rows]).long()
            caption_rows = (first[rows] + pick)[has]
            context, padding, masked = _trimmed(train_masked, caption_rows)
            targets = to_candidate[train_masked.ids[caption_rows, :masked.shape[1]][masked]]
            loss = loss + F.cross_entropy(probe.word_logits(encoded[has], context, padding, masked), targets)
        return loss

    fit(probe, batch_loss, steps, seed)
    with torch.no_grad():
        encoded = torch.cat([probe.code_encoder(test_vectors[start:start + 256])
                             for start in range(0, len(test_vectors), 256)])  # [N, 1+hw, Dt]
        retrieval = retrieval_metrics(probe.image_embedding(encoded), F.normalize(test_sentences.sentence, dim=-1),
                                      torch.arange(len(test_vectors)), RECALL_K)
        hits, targets = [], []
        for start in range(0, len(test_masked.owner), 256):
            rows = torch.arange(start, min(start + 256, len(test_masked.owner)))
            context, padding, masked = _trimmed(test_masked, rows)
            target = test_masked.ids[rows, :masked.shape[1]][masked]
            predicted = probe.word_logits(encoded[test_masked.owner[rows]], context, padding, masked).argmax(dim=1)
            hits.append(predicted == to_candidate[target])
            targets.append(target)
        hits, targets = torch.cat(hits), torch.cat(targets)
        mse = code_word_similarity_mse(test_sentences.word_tokens, test_sentences.word_valid, encoded[:, 1:],
                                       test_vectors.flatten(2).transpose(1, 2))
    visual = torch.isin(targets, attribute_ids)
    train_targets = to_candidate[train_masked.ids[train_masked.masked]]
    metrics = {f"image_retrieval_recall@{k}": retrieval[f"image_retrieval_recall@{k}"] for k in RECALL_K}
    metrics.update({f"image_retrieval_chance@{k}": min(1.0, k / len(test_vectors)) for k in RECALL_K})
    metrics["masked_word_recall@1"] = float(hits.float().mean())
    metrics["masked_word_recall@1_visual"] = float(hits[visual].float().mean()) if bool(visual.any()) else 0.0
    metrics["masked_word_chance"] = majority_chance(train_targets, to_candidate[targets])
    metrics["code_word_similarity_mse"] = mse
    details = {"num_masked_captions": {"train": len(train_masked.owner), "test": len(test_masked.owner)},
               "num_masked_tokens": {"train": len(train_targets), "test": len(targets)},
               "num_visual_masked": int(visual.sum()), "num_candidates": len(candidates)}
    return metrics, details
