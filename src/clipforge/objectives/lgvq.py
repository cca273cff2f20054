"""The `lgvq` objective: LG-VQ's language-guided codebook learning on top of `vq` (LG-VQ, NeurIPS 2024; docs/lgvq.md).

Everything `vq` trains (reconstruction, codebook, commitment, the discriminator phase), plus three language
terms that act on the quantised features after the straight-through estimator, so their gradients reach the
encoder (not the codebook vectors directly), as in the official code:

    code encoder   quantised grid [B, h*w, D] + a CLS token -> small transformer -> E [B, 1+h*w, Dt]
    L_gsa          InfoNCE between the code CLS (projected to the sentence space) and the frozen text prior's
                   sentence feature; temperature and direction configurable (official: 1, image -> text)
    L_mtp          10-30% of each caption's WORDS masked; a cross-attention decoder over E predicts them,
                   scored against the prior's (tied, detached) token embeddings, label-smoothed CE. The words'
                   context comes from the prior run on the MASKED caption (masked tokens replaced by the
                   prior's mask id, then by a learned per-position mask embedding), so no feature can carry a
                   masked word; the official code reads features of the unmasked caption (a leak).
    L_ras          word-word cosines of the caption vs cosines of the code embeddings each word aligns to
                   (argmax over positions), MSE over valid word pairs (the official code also averages padding)

Loss weights default to the paper's CelebA/TextCaps values (1e-3, 1e-2, 1e-4); a weight of 0 turns the term
off and its head is not built. A sample without a caption (see `CaptionOptionalBatch`) trains the tokenizer
terms only; the language terms skip it and the batch's share of such samples is the metric
`no_caption_fraction`. The language terms use this rank's captioned samples (no gather across ranks, as in
the official code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import LgvqObjectiveConfig, VqObjectiveConfig
from clipforge.data.batches import CaptionOptionalBatch, ImageTextBatch
from clipforge.errors import ConfigError
from clipforge.objectives.base import MAIN_PHASE, ObjectiveOutput
from clipforge.objectives.vq import DISCRIMINATOR_PHASE, VqObjective, check_vq_model

# ---- the language heads ---------------------------------------------------------------------------------------

class CodeEncoder(nn.Module):
    """Quantised grid + CLS -> [B, 1+h*w, out_dim] (the official quantTransformer, pre-LN, projected)."""

    def __init__(self, embed_dim: int, grid: int, width: int, layers: int, heads: int, out_dim: int):
        super().__init__()
        self.input = nn.Linear(embed_dim, width)
        self.cls = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.position = nn.Parameter(torch.randn(1 + grid * grid, width) * 0.01)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.input(features.flatten(2).transpose(1, 2))  # [B, hw, W]
        tokens = torch.cat([self.cls.expand(tokens.shape[0], 1, -1), tokens], dim=1) + self.position
        return self.proj(self.ln_post(self.transformer(self.ln_pre(tokens))))  # [B, 1+hw, out]


class MaskedTextPredictor(nn.Module):
    """Masked words from their (masked) context and the codes: self-attention over the caption, cross-attention
    to the code tokens, post-LN; logits = LN(GELU(Linear(h))) @ token_embeddings^T + bias."""

    def __init__(self, length: int, dim: int, vocab_size: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.randn(length, dim) * 0.01)  # [L, Dt] one per position
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, context: torch.Tensor, masked: torch.Tensor, padding: torch.Tensor, code_tokens: torch.Tensor,
                token_embeddings: torch.Tensor) -> torch.Tensor:
        """context [N, L, Dt] prior features of the masked caption; masked, padding [N, L] bool; code_tokens
        [N, 1+hw, Dt]; token_embeddings [V, Dt]. Returns logits [M, V] at the masked positions (row-major)."""
        length = context.shape[1]
        inputs = torch.where(masked.unsqueeze(-1), self.mask_embedding[:length].expand_as(context), context)
        inputs = inputs.masked_fill(padding.unsqueeze(-1), 0.0)
        hidden = self.decoder(inputs, code_tokens, tgt_key_padding_mask=padding)  # [N, L, Dt]
        chosen = self.norm(F.gelu(self.dense(hidden[masked])))  # [M, Dt]
        return chosen @ token_embeddings.T + self.bias  # [M, V]


class RelationHead(nn.Module):
    """Phi = LN(GELU(W_r z_q)): the code embeddings L_ras compares, W_r initialised N(0, 0.01)."""

    def __init__(self, embed_dim: int, dim: int):
        super().__init__()
        self.project = nn.Linear(embed_dim, dim)
        nn.init.normal_(self.project.weight, std=0.01)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.project(features.flatten(2).transpose(1, 2))))  # [B, hw, Dt]


# ---- the losses (pure functions: tests/test_lgvq.py checks them on hand-made features) -------------------------

def global_alignment_loss(code_global: torch.Tensor, sentence: torch.Tensor, temperature: float = 1.0,
                          symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of code_global [N, D] against sentence [N, D] (detached: the prior is a fixed target).
    Returns (loss, image->text top-1 accuracy)."""
    codes, texts = F.normalize(code_global, dim=-1), F.normalize(sentence.detach(), dim=-1)
    logits = codes @ texts.T / temperature  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.detach().argmax(dim=1) == labels).float().mean()


def relationship_alignment_loss(word_features: torch.Tensor, word_valid: torch.Tensor, code_tokens: torch.Tensor,
                                code_embeddings: torch.Tensor) -> torch.Tensor:
    """L_ras. word_features [N, L, D], word_valid [N, L] bool, code_tokens [N, P, D] (the code encoder's
    per-position outputs, which pick each word's code), code_embeddings [N, P, D] (Phi, what is compared).
    MSE between the word-word cosines (detached) and the cosines of the codes the words align to, over valid
    word pairs."""
    words = F.normalize(word_features, dim=-1) * word_valid.unsqueeze(-1)  # [N, L, D]
    similarity = words @ F.normalize(code_tokens, dim=-1).transpose(1, 2)  # [N, L, P]
    best, position = similarity.max(dim=-1)  # [N, L] each word's best code position
    picked = code_embeddings.gather(1, position.unsqueeze(-1).expand(-1, -1, code_embeddings.shape[-1]))
    codes = F.normalize(best.unsqueeze(-1) * picked, dim=-1) * word_valid.unsqueeze(-1)  # [N, L, D]
    target = (words @ words.transpose(1, 2)).detach()  # [N, L, L]
    predicted = codes @ codes.transpose(1, 2)
    pairs = (word_valid.unsqueeze(2) & word_valid.unsqueeze(1)).float()
    return ((predicted - target).pow(2) * pairs).sum() / pairs.sum().clamp_min(1.0)


def choose_masked_words(word_starts: torch.Tensor, words: torch.Tensor, ratio_min: float, ratio_max: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, L] bool: the tokens of round(r * n_words) whole words per caption (at least one), r ~ U[min, max]
    per caption. word_starts [N, L]: first token of each word; words [N, L]: every word token."""
    count, length = word_starts.shape
    device = word_starts.device
    word_index = torch.cumsum(word_starts.long(), dim=1) - 1  # [N, L] the word each token belongs to
    words = words & (word_index >= 0)
    n_words = word_starts.sum(dim=1)  # [N]
    ratio = ratio_min + (ratio_max - ratio_min) * torch.rand(count, generator=generator, device=device)
    n_masked = torch.where(n_words > 0, (ratio * n_words).round().long().clamp_min(1), 0)  # [N]
    scores = torch.rand(count, length, generator=generator, device=device).masked_fill(~word_starts, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # [N, L] 0 = the lowest score
    start_masked = word_starts & (rank < n_masked.unsqueeze(1))
    by_word = torch.zeros(count, length + 1, dtype=torch.bool, device=device)  # column L: non-start tokens
    by_word.scatter_(1, torch.where(word_starts, word_index, length), start_masked)
    return words & by_word.gather(1, word_index.clamp_min(0))


# ---- the objective -------------------------------------------------------------------------------------------

@dataclass
class LanguageDims:
    embed_dim: int  # the tokenizer's code dimension D
    grid: int  # h = w of the code grid
    token_dim: int  # the prior's per-token features Dt
    sentence_dim: int  # the prior's sentence feature Ds
    vocab_size: int
    length: int  # caption tokens L


class LgvqObjective(VqObjective):
    batch_type = CaptionOptionalBatch
    name = "lgvq"
    families = ("vq",)
    find_unused_parameters = True  # also: a rank whose batch has no caption leaves the language heads idle

    def __init__(self, settings: VqObjectiveConfig | None = None, language: LgvqObjectiveConfig | None = None,
                 dims: LanguageDims | None = None):
        """`dims` None: an instance that can only tell its phases (the heads need the model's sizes)."""
        super().__init__(settings)
        language = language or LgvqObjectiveConfig()
        self.language = language
        self.code_encoder = self.global_projection = self.predictor = self.relation = None
        if dims is None or not (language.gsa_weight or language.mtp_weight or language.ras_weight):
            return
        self.code_encoder = CodeEncoder(dims.embed_dim, dims.grid, language.code_width, language.code_layers,
                                        language.code_heads, dims.token_dim)
        if language.gsa_weight:
            self.global_projection = nn.Linear(dims.token_dim, dims.sentence_dim, bias=False)
        if language.mtp_weight:
            self.predictor = MaskedTextPredictor(dims.length, dims.token_dim, dims.vocab_size,
                                                 language.decoder_layers, language.decoder_heads, language.dropout)
        if language.ras_weight:
            self.relation = RelationHead(dims.embed_dim, dims.token_dim)
        self.no_weight_decay = frozenset({"code_encoder.cls", "code_encoder.position", "predictor.mask_embedding"})

    @staticmethod
    def model_kwargs(config) -> dict:
        """The vq model carries the frozen text prior (and the bundle its tokenizer)."""
        language = config.objective.lgvq
        if language.text_prior == "minilm":
            return {"text_prior": {"kind": "minilm", "max_length": language.max_length}}
        return {"text_prior": {"kind": "clipforge_run", "checkpoint": language.text_prior}}

    @classmethod
    def from_config(cls, config, model: nn.Module) -> LgvqObjective:
        check_vq_model(model, cls.name)
        prior = getattr(model, "text_prior", None)
        if prior is None:
            raise ConfigError("objective 'lgvq' needs a vq model built with a text prior (objective.lgvq.text_prior)")
        dims = LanguageDims(model.embed_dim, model.grid_size, prior.token_dim, prior.sentence_dim, prior.vocab_size,
                            prior.max_length)
        return cls(config.objective.vq, config.objective.lgvq, dims)

    def forward(self, model: nn.Module, batch: ImageTextBatch, phase: str = MAIN_PHASE) -> ObjectiveOutput:
        if phase == DISCRIMINATOR_PHASE:
            return self.discriminator_losses(model, batch.images)
        output = model(batch.images)
        losses, metrics = self.tokenizer_losses(model, batch.images, output)
        prior = model.text_prior
        words = ~prior.special(batch.texts)  # [B, L]
        captioned = words.any(dim=1)  # [B]
        metrics["no_caption_fraction"] = 1.0 - captioned.float().mean()
        if self.code_encoder is not None and bool(captioned.any()):
            rows = captioned.nonzero().squeeze(1)
            used = int(prior.attention(batch.texts).any(dim=0).nonzero().max()) + 1  # trailing padding dropped
            language_losses, language_metrics = self.language_losses(
                prior, batch.texts[rows, :used], words[rows, :used], output.quantized.features[rows])
            losses.update(language_losses)
            metrics.update(language_metrics)
        return ObjectiveOutput(losses=losses, metrics=metrics)

    def language_losses(self, prior, ids: torch.Tensor, words: torch.Tensor,
                        features: torch.Tensor) -> tuple[dict, dict]:
        """ids, words [N, L] (captioned rows only); features [N, D, h, w] quantised, after straight-through."""
        language = self.language
        # the prior's pass over the unmasked caption feeds L_gsa and L_ras only (L_mtp reads the masked caption)
        text = prior(ids) if self.global_projection is not None or self.relation is not None else None  # frozen
        code_tokens = self.code_encoder(features)  # [N, 1+hw, Dt]
        losses, metrics = {}, {}
        if self.global_projection is not None:
            gsa, accuracy = global_alignment_loss(self.global_projection(code_tokens[:, 0]), text.sentence,
                                                  language.gsa_temperature, language.gsa_symmetric)
            losses["gsa"], metrics["gsa_accuracy"] = language.gsa_weight * gsa, accuracy
        if self.predictor is not None:
            masked = choose_masked_words(prior.word_starts(ids), words, language.mask_ratio_min,
                                         language.mask_ratio_max)
            logits = self.masked_word_logits(prior, ids, masked, code_tokens)  # [M, V]
            targets = ids[masked]
            if targets.numel():
                mtp = F.cross_entropy(logits, targets, label_smoothing=language.label_smoothing)
                losses["mtp"] = language.mtp_weight * mtp
                metrics["mtp_accuracy"] = (logits.detach().argmax(dim=1) == targets).float().mean()
        if self.relation is not None:
            ras = relationship_alignment_loss(text.tokens, words & text.attention_mask, code_tokens[:, 1:],
                                              self.relation(features))
            losses["ras"] = language.ras_weight * ras
        return losses, metrics

    def masked_word_logits(self, prior, ids: torch.Tensor, masked: torch.Tensor,
                           code_tokens: torch.Tensor) -> torch.Tensor:
        """[M, V] logits for the masked tokens, from a prior that read the caption with them replaced."""
        context = prior(torch.where(masked, torch.full_like(ids, prior.mask_id), ids))
        return self.predictor(context.tokens, masked, ~context.attention_mask, code_tokens, prior.token_embeddings())
