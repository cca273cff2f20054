"""The `lcl` family: LCL's vision encoder, attentive pooler and causal language model (the method's paper
§1.3-1.4), and its document tokenizer.

    images [N, 3, S, S] -> open_clip ViT (class token dropped, no projection) -> patches [N, P, Wv]
                        -> AttentivePooler -> pooled latent [N, D] (contrastive)   +   image tokens [N, P, D]
    tokens [B, T] with <img> placeholders -> token embeddings, image tokens written at the placeholders
                        -> causal open_clip TextTransformer (trained from scratch) -> hidden [B, T, D]
    hidden -> lm_head (LayerNorm + Linear, not tied to the embedding) -> next-token logits [.., V]
    hidden at <soi> -> ln_final -> text_projection -> the LM's prediction of the image (contrastive)

Vocabulary: the CLIP BPE (49408 ids, <start_of_text> 49406, <end_of_text> 49407) plus <img_placehold> 49408,
<start_of_img> 49409, <end_of_img> 49410 (the official ids) and <pad> 49411, which is never a target (targets use
IGNORE_INDEX; the official code pads with 0, the BPE token '!').

`encode_image` is the pooled latent; `encode_text` poses a prompt as a caption standing before an image
(`<sot> prompt <soi>`) and reads the LM state at <soi>, so the zero-shot and retrieval tasks run unchanged.

Variants (one small config dict each; `model.name` may also be a JSON/YAML file holding such a dict):
    lcl-tiny            32 px, patch 8 (16 image tokens), width 32, 2+2 layers, context 64 (tests, smoke runs)
    lcl-synth           32 px, patch 8, width 64, 3+3 layers, context 96 (configs/lcl_synth_tiny.yaml)
    lcl-vit-b-32        the official LCL_ViT-B-32_laion: 224 px, 49 image tokens, LM 512 wide 12/8, context 128
    lcl-vit-b-32-mmc4   the same with context 2048 (LCL_ViT-B-32_mmc4)
    lcl-vit-b-16        LCL_ViT-B-16_laion: 196 image tokens, LM 768 wide 12/12, context 280
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from clipforge.config import ModelConfig
from clipforge.data.batches import IGNORE_INDEX, DocumentBatch
from clipforge.data.documents import document_images, is_pair
from clipforge.data.samples import Document, SkipCounter
from clipforge.data.transforms import sample_seed
from clipforge.errors import ConfigError, DataError
from clipforge.models.family import ModelBundle, variant_or_file_settings

SOT, EOT = 49406, 49407  # the CLIP BPE's own start and end of text
IMAGE, SOI, EOI, PAD = 49408, 49409, 49410, 49411  # <img_placehold>, <start_of_img>, <end_of_img>, <pad>
VOCAB_SIZE = 49412
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # as CLIP; clamped to [0, ln 100] by the objective after each step

VARIANTS: dict[str, dict] = {
    "lcl-tiny": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
                 "text_width": 32, "text_layers": 2, "text_heads": 2, "context_length": 64},
    "lcl-synth": {"image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 3, "vision_heads": 2,
                  "text_width": 64, "text_layers": 3, "text_heads": 2, "context_length": 96},
    "lcl-vit-b-32": {"image_size": 224, "patch_size": 32, "vision_width": 768, "vision_layers": 12,
                     "vision_heads": 12, "text_width": 512, "text_layers": 12, "text_heads": 8, "context_length": 128},
    "lcl-vit-b-32-mmc4": {"image_size": 224, "patch_size": 32, "vision_width": 768, "vision_layers": 12,
                          "vision_heads": 12, "text_width": 512, "text_layers": 12, "text_heads": 8,
                          "context_length": 2048},
    "lcl-vit-b-16": {"image_size": 224, "patch_size": 16, "vision_width": 768, "vision_layers": 12,
                     "vision_heads": 12, "text_width": 768, "text_layers": 12, "text_heads": 12, "context_length": 280},
}
REQUIRED = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers",
            "text_heads", "context_length")
OPTIONAL = {"pool_heads": None, "mlp_ratio": 4.0}  # pool_heads None: the LM's head count


# ---- settings -----------------------------------------------------------------------------------------------

def image_tokens(settings: dict) -> int:
    return (settings["image_size"] // settings["patch_size"]) ** 2


def check_settings(settings: dict, name: str) -> dict:
    """The settings with defaults filled in; ConfigError (one line) when they cannot make a model."""
    unknown = sorted(set(settings) - set(REQUIRED) - set(OPTIONAL))
    missing = [k for k in REQUIRED if k not in settings]
    if unknown or missing:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"missing key '{missing[0]}'"
        raise ConfigError(f"lcl model '{name}': {problem} (keys: {', '.join(REQUIRED + tuple(OPTIONAL))})")
    settings = {**OPTIONAL, **settings}
    for key in REQUIRED + ("pool_heads",):
        value = settings[key]
        if value is None and key == "pool_heads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"lcl model '{name}': '{key}' must be a positive integer, got {value!r}")
    if settings["image_size"] % settings["patch_size"]:
        raise ConfigError(f"lcl model '{name}': image_size {settings['image_size']} is not a multiple of "
                          f"patch_size {settings['patch_size']}")
    for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
        if settings[width] % settings[heads]:
            raise ConfigError(f"lcl model '{name}': {width} {settings[width]} is not a multiple of {heads} "
                              f"{settings[heads]}")
    pool_heads = settings["pool_heads"] or settings["text_heads"]
    if settings["vision_width"] % pool_heads:
        raise ConfigError(f"lcl model '{name}': vision_width {settings['vision_width']} is not a multiple of the "
                          f"pooler's {pool_heads} heads")
    block = image_tokens(settings) + 2
    if settings["context_length"] < block + 2:  # <sot>, one image block, one text token
        raise ConfigError(f"lcl model '{name}': context_length {settings['context_length']} cannot hold one image "
                          f"block ({block} tokens: <soi>, {block - 2} image tokens, <eoi>) and a text token; "
                          f"it needs at least {block + 2}")
    return settings


def variant_settings(name: str) -> dict:
    return variant_or_file_settings(name, VARIANTS, "lcl", lambda settings: check_settings(settings, name))


def resolve_name(name: str) -> None:
    variant_settings(name)


# ---- the model ------------------------------------------------------------------------------------------------

class AttentivePooler(nn.Module):
    """One learned query attends over the patch tokens (LCL's AttentivePoolingProjection).

    Query, keys and values have their own LayerNorm; q/k/v projections have biases, the output projection none.
    Returns (pooled [N, D], tokens [N, P, D]): the tokens are the output projection of the values, so the pooled
    latent is, per head, an attention-weighted mix of exactly the token embeddings the language model reads.
    """

    def __init__(self, width: int, out_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.norm_query, self.norm_key, self.norm_value = (nn.LayerNorm(width) for _ in range(3))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))  # with biases
        self.out_proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, p, width = patches.shape
        query = self.q_proj(self.norm_query(self.query)).expand(n, 1, width)  # [N, 1, W]
        keys = self.k_proj(self.norm_key(patches))  # [N, P, W]
        values = self.v_proj(self.norm_value(patches))  # [N, P, W]

        def split(x: torch.Tensor) -> torch.Tensor:  # [N, L, W] -> [N, heads, L, W / heads]
            return x.reshape(n, x.shape[1], self.heads, width // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(query), split(keys), split(values))  # [N, heads, 1, W/heads]
        pooled = mixed.transpose(1, 2).reshape(n, width)  # [N, W]
        return self.out_proj(pooled), self.out_proj(values)  # [N, D], [N, P, D]


class LclModel(nn.Module):
    def __init__(self, settings: dict):
        super().__init__()
        s = settings
        self.context_length = s["context_length"]
        self.image_tokens = image_tokens(s)
        width = s["text_width"]
        vision = {"image_size": s["image_size"], "patch_size": s["patch_size"], "width": s["vision_width"],
                  "layers": s["vision_layers"], "head_width": s["vision_width"] // s["vision_heads"],
                  "mlp_ratio": s["mlp_ratio"], "output_tokens": True}
        self.visual = _build_vision_tower(width, vision)
        self.visual.proj = None  # the pooler projects; the class token's pooled output is not used
        self.pooler = AttentivePooler(s["vision_width"], width, s["pool_heads"] or s["text_heads"])
        text = {"context_length": s["context_length"], "vocab_size": VOCAB_SIZE, "width": width,
                "heads": s["text_heads"], "layers": s["text_layers"], "mlp_ratio": s["mlp_ratio"]}
        self.text = _build_text_tower(width, text)  # its token/positional embeddings, causal blocks, ln_final, proj
        self.lm_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, VOCAB_SIZE, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def image_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled latents [N, D], image tokens [N, P, D]) of images [N, 3, S, S]."""
        _, patches = self.visual(images)  # [N, P, Wv] after ln_post, class token dropped
        return self.pooler(patches)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[N, P, Wv] the ViT's patch tokens (after ln_post, before the pooler): frozen-transfer tasks pool them."""
        return self.visual(images)[1]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        pooled, _ = self.image_latents(images)  # [N, D]
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def hidden_states(self, tokens: torch.Tensor, image_embeddings: torch.Tensor | None = None,
                      image_spans: torch.Tensor | None = None) -> torch.Tensor:
        """The causal LM over tokens [B, T]; image n's tokens [P, D] are written at image_spans[n] = (row, start,
        stop). Returns the last block's output [B, T, D] (before ln_final)."""
        batch, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.text.token_embedding(tokens)  # [B, T, D]
        if image_embeddings is not None and image_embeddings.shape[0]:
            offsets = torch.arange(self.image_tokens, device=tokens.device)  # [P]
            where = (image_spans[:, :1] * length + image_spans[:, 1:2] + offsets).reshape(-1)  # [N*P] flat positions
            flat = x.reshape(batch * length, -1)
            x = flat.index_put((where,), image_embeddings.reshape(-1, flat.shape[1]).to(flat.dtype)).view_as(x)
        x = x + self.text.positional_embedding[:length].to(x.dtype)
        return self.text.transformer(x, attn_mask=self.text.attn_mask[:length, :length])

    def text_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The contrastive text feature of LM states [..., D]: ln_final, then the text projection."""
        return self.text.ln_final(hidden) @ self.text.text_projection

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [..., V]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Prompts [B, L] (`<sot> text <eot> <pad>...`) posed as a caption before an image: the <eot> becomes <soi>
        (in a copy: the caller's tensor is left as it is) and the feature is read at that position."""
        query = tokens.clone()
        ends = (query == EOT) | (query == SOI)
        last = torch.full((query.shape[0],), query.shape[1] - 1, device=query.device)
        position = torch.where(ends.any(dim=1), ends.int().argmax(dim=1), last)  # [B] first <eot> (else the end)
        rows = torch.arange(query.shape[0], device=query.device)
        query[rows, position] = SOI
        hidden = self.hidden_states(query[:, : int(position.max()) + 1])  # nothing after <soi> is read
        features = self.text_features(hidden[rows, position])  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features


# ---- the tokenizer --------------------------------------------------------------------------------------------

@dataclass
class Layout:
    tokens: list[int]  # the sequence, at most context_length long
    images: list[int]  # the document's image numbers whose blocks are in it, in order
    starts: list[int]  # each kept block's first placeholder position (its <soi> is one before)


class LclTokenizer:
    """Captions and prompts -> [N, L] ids; interleaved documents -> DocumentBatch (specs §1.3).

    A document's sequence: `<sot>` if it starts with text, then each item in order (a text's BPE ids, an image's
    block `<soi> <img>xP <eoi>`), then `<eot>`. Longer than the context, it is cut at the context or, when that
    falls inside an image block, right before the block's <soi> (no <eot> then: the document did not end). A
    pair's caption is cut to context - P - 4 tokens first, so its image always fits (as the official 75 for
    B/32); it reads `<soi> img <eoi> caption <eot>` or `<sot> caption <soi> img <eoi> <eot>`.
    Targets are the next token, IGNORE_INDEX where that is an <img> placeholder or <eoi>, and at padding.
    """

    def __init__(self, context_length: int, image_tokens: int):
        self.context_length = context_length
        self.image_tokens = image_tokens
        self._bpe = SimpleTokenizer()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`; special-token strings typed in it (e.g. '<end_of_text>') are dropped."""
        return [i for i in self._bpe.encode(text) if i < SOT]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        rows = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)  # [N, L]
        for row, text in enumerate(texts):
            ids = [SOT] + self.encode(text)[: self.context_length - 2] + [EOT]
            rows[row, : len(ids)] = torch.tensor(ids)
        return rows

    def _text_tokens(self, item: dict, pair: bool) -> list[int]:
        ids = item["tokens"] if "tokens" in item else self.encode(item["text"])
        return ids[: self.context_length - self.image_tokens - 4] if pair else ids

    def lay_out(self, document: Document, image_first: bool = False) -> Layout:
        items, pair = document.items, is_pair(document)
        if pair:  # [image, caption] as pair_document made it; the order is chosen per sample (collate_documents)
            image, caption = items
            items = [image, caption] if image_first else [caption, image]
        tokens = [SOT] if "text" in items[0] else []
        numbers, starts = [], []
        for item in items:
            if "text" in item:
                tokens += self._text_tokens(item, pair)
                continue
            numbers.append(item["image"])
            starts.append(len(tokens) + 1)
            tokens += [SOI] + [IMAGE] * self.image_tokens + [EOI]
        tokens.append(EOT)
        if len(tokens) > self.context_length:
            cut = self.context_length
            for start in starts:  # the block [start - 1, start + P] may not be cut through
                if start - 1 < cut <= start + self.image_tokens:
                    cut = start - 1
            kept = sum(start + self.image_tokens < cut for start in starts)
            tokens, numbers, starts = tokens[:cut], numbers[:kept], starts[:kept]
        return Layout(tokens, numbers, starts)

    def fit_document(self, document: Document, counter: SkipCounter) -> Document | None:
        """Tokenise the texts once (kept in the items) and check the document fits: None, counted, when it has no
        text token or not even its first image block fits the context."""
        for item in document.items:
            if "text" in item and "tokens" not in item:
                item["tokens"] = self.encode(item["text"])
        if not any(item.get("tokens") for item in document.items):
            counter.skip("document_without_text", document.key)
            return None
        if not is_pair(document) and not self.lay_out(document).images:
            counter.skip("document_too_long", f"{document.key}: no image block fits in {self.context_length} tokens")
            return None
        return document

    def collate_documents(self, documents: list[Document], builder, image_first_prob: float = 0.5) -> DocumentBatch:
        layouts, images = [], []
        for document in documents:
            image_first = False  # evaluation order: caption first, so the pair gives a contrastive pair
            if is_pair(document) and builder.randomize:
                draw = random.Random(sample_seed(builder.seed, builder.epoch, document.key, "image_first"))
                image_first = draw.random() < image_first_prob
            layout = self.lay_out(document, image_first)
            layouts.append(layout)
            images += document_images(document, layout.images)
        if not images:
            raise DataError(f"no image of the documents {[d.key for d in documents][:3]} fits in "
                            f"{self.context_length} tokens")
        length = max(len(layout.tokens) for layout in layouts)
        tokens = torch.full((len(documents), length), PAD, dtype=torch.long)  # [B, T]
        targets = torch.full((len(documents), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(documents), length), dtype=torch.bool)  # [B, T]
        spans = []
        for row, layout in enumerate(layouts):
            sequence = torch.tensor(layout.tokens, dtype=torch.long)
            tokens[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = True
            following = sequence[1:]
            targets[row, : len(following)] = following.masked_fill((following == IMAGE) | (following == EOI),
                                                                   IGNORE_INDEX)
            spans += [(row, start, start + self.image_tokens) for start in layout.starts]
        return DocumentBatch(images=torch.stack([builder.image_tensor(image) for image in images]),  # [N, 3, S, S]
                             tokens=tokens, attention_mask=attention_mask, targets=targets,
                             image_spans=torch.tensor(spans, dtype=torch.long).reshape(-1, 3),  # [N, 3]
                             keys=[d.key for d in documents])


def document_tokenizer(model: LclModel) -> LclTokenizer:
    return LclTokenizer(model.context_length, model.image_tokens)


# ---- the family builder ---------------------------------------------------------------------------------------

def build_lcl(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
              saved: dict | None = None) -> ModelBundle:
    """An LCL model from a variant (or a settings file), or from a checkpoint's model.json (`saved`)."""
    if model_config.pretrained:
        raise ConfigError("lcl models train from scratch here: model.pretrained is not supported (resume a run, "
                          "or load its checkpoint folder for evaluation)")
    if model_config.lock_image or model_config.lock_text:
        raise ConfigError("model.lock_image / model.lock_text are not supported by the lcl family (LCL trains the "
                          "vision encoder and the language model together)")
    if saved is not None:
        name, settings = saved["name"], check_settings(dict(saved["settings"]), saved["name"])
    else:
        name, settings = model_config.name, variant_settings(model_config.name)
    model = LclModel(settings).to(device)
    if model_config.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
        model.text.set_grad_checkpointing(True)
    size = settings["image_size"]
    preprocess_train = open_clip.image_transform(size, is_train=True)  # OpenAI mean/std, as open_clip's models
    preprocess_val = open_clip.image_transform(size, is_train=False)
    tokenizer = LclTokenizer(settings["context_length"], image_tokens(settings))
    config = {"family": "lcl", "name": name, "settings": settings}
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, config=config,
                       no_weight_decay=frozenset({"logit_scale"}))


build_lcl.resolve_name = resolve_name
