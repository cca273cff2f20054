"""The `code_prior` family: a text-conditioned autoregressive prior over a frozen image tokenizer's codes.

    caption tokens [B, L] (CLIP BPE, open_clip's tokenizer, context L)  +  codes [B, h*w] in raster order
        -> token / code embeddings + learned positions -> pre-LN causal transformer -> LN -> head [.., K]
    the last caption position predicts code 0, code i predicts code i+1: logits [B, h*w, K] (codes only)

The frozen part is a trained `vq` tokenizer (models/vq.py), referenced by its run folder, never copied into
checkpoints (`ModelBundle.frozen`): model.json records the run, the checkpoint folder read, and the weights'
sha256 and model.json digest (models/tokenize.py's fingerprint); loading rebuilds it from there and refuses
other weights. Without a run (`tokenizer: null`) the family builds an untrained `vq-tiny` from a seed, a
stand-in so the registry-wide tests and smoke runs need no trained tokenizer. Batches are encoded to codes on
the fly (no gradient); the tokenizer stays in eval mode whatever the loop asks.

`generate(prompts, num_per_prompt, temperature, top_k, guidance, seed)` -> images [N, 3, S, S] in [-1, 1]
(prompt-major: every sample of prompt 0, then prompt 1, ...). Classifier-free guidance mixes the logits of
the caption with those of the empty caption: uncond + guidance * (cond - uncond); guidance 1 is the caption
alone. Sample n draws its codes from uniforms seeded by (seed, prompt, n), through the inverse CDF of the
(temperature, top-k) distribution, so an image depends on its prompt, its index and the seed only, not on the
other prompts in the call. Decoding keeps a key/value cache (one position per step).

`encode_text` (the state at the last caption position) and `encode_image` (the mean code-position state,
empty caption) are the prior's own features, for inspection; they are not declared capabilities.

Variants (one small config dict each; `model.name` may also be a JSON/YAML file of such settings):
    code-prior-tiny    width 32, 2 layers, 2 heads, context 24 (the registered tiny one)
    code-prior-small   width 128, 4 layers, 4 heads, context 24 (configs/code_prior_synth_tiny.yaml)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.family import ModelBundle, family_settings, variant_or_file_settings

_TINY = {"context_length": 24, "width": 32, "layers": 2, "heads": 2, "temperature": 1.0, "top_k": 0,
         "guidance": 2.0, "tokenizer": None}
VARIANTS: dict[str, dict] = {
    "code-prior-tiny": _TINY,
    "code-prior-small": {**_TINY, "width": 128, "layers": 4, "heads": 4},
}
STAND_IN = {"kind": "seeded", "name": "vq-tiny", "seed": 0}  # the tokenizer when no run is given


# ---- settings ------------------------------------------------------------------------------------------------

def check_settings(settings: dict, where: str) -> dict:
    unknown = sorted(set(settings) - set(_TINY))
    if unknown:
        raise ConfigError(f"{where}: unknown code_prior setting '{unknown[0]}' (known: {', '.join(_TINY)})")
    merged = {**_TINY, **settings}

    def fail(key: str, problem: str):
        raise ConfigError(f"{where}: code_prior setting '{key}' {problem}")

    for key in ("context_length", "width", "layers", "heads"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (3 if key == "context_length" else 1):
            fail(key, f"must be a positive integer{' >= 3' if key == 'context_length' else ''}, got {value!r}")
    if merged["width"] % merged["heads"]:
        fail("heads", f"({merged['heads']}) must divide the width ({merged['width']})")
    for key in ("temperature", "guidance"):
        if isinstance(merged[key], bool) or not isinstance(merged[key], int | float) or merged[key] < 0:
            fail(key, f"must be a number >= 0, got {merged[key]!r}")
    if isinstance(merged["top_k"], bool) or not isinstance(merged["top_k"], int) or merged["top_k"] < 0:
        fail("top_k", f"must be an integer >= 0 (0: every code), got {merged['top_k']!r}")
    if merged["tokenizer"] is not None and not isinstance(merged["tokenizer"], str | dict):
        fail("tokenizer", f"must be a vq run folder or null, got {merged['tokenizer']!r}")
    return merged


def variant_settings(name: str) -> dict:
    return variant_or_file_settings(name, VARIANTS, "code_prior",
                                    lambda settings: check_settings(settings, f"model '{name}'"))


def resolve_name(name: str) -> None:
    variant_settings(name)


# ---- the frozen tokenizer --------------------------------------------------------------------------------------

def build_image_tokenizer(spec, device, saved: bool) -> tuple[nn.Module, object, dict]:
    """(frozen tokenizer in eval mode, its preprocess, the spec model.json records). `spec`: None (the seeded
    stand-in), a run folder, or a recorded spec (saved: the weights must be the recorded ones)."""
    if spec is None or (isinstance(spec, dict) and spec.get("kind") == "seeded"):
        from clipforge.models.factory import create_model

        spec = dict(spec or STAND_IN)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            torch.manual_seed(int(spec["seed"]))
            bundle = create_model(ModelConfig(family="vq", name=spec["name"]), device=device)
        model, preprocess = bundle.model, bundle.preprocess_val
    else:
        from clipforge.models.tokenize import describe_tokenizer, load_image_tokenizer, tokenizer_identity

        if isinstance(spec, dict):  # recorded: the exact checkpoint folder, else the run's latest
            where = spec["checkpoint"] if Path(spec.get("checkpoint", "")).is_dir() else spec["run"]
        else:
            where = spec
        if not Path(where).exists():
            raise ConfigError(f"the code prior's tokenizer run '{where}' does not exist")
        tokenizer = load_image_tokenizer(where, device=device)
        if saved and tokenizer_identity(spec) != tokenizer_identity(tokenizer.fingerprint):
            raise CheckpointError(f"this code prior was trained over tokenizer {describe_tokenizer(spec)}, but "
                                  f"'{where}' now holds {describe_tokenizer(tokenizer.fingerprint)}")
        run = spec["run"] if isinstance(spec, dict) else str(Path(spec).resolve())
        spec = {"kind": "run", "run": run, **{k: v for k, v in tokenizer.fingerprint.items() if k != "model_json"}}
        model, preprocess = tokenizer.model, tokenizer.preprocess
    model.eval().requires_grad_(False)
    if getattr(model, "text_prior", None) is not None:  # an lgvq tokenizer's text prior plays no part in codes
        model.text_prior = None
    return model, preprocess, spec


@lru_cache(maxsize=4)
def caption_tokenizer(context_length: int):
    """open_clip's CLIP BPE tokenizer: list[str] -> [N, context_length] int64 (truncated, EOT kept)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


# ---- the model ---------------------------------------------------------------------------------------------------

class CausalBlock(nn.Module):
    """Pre-LN block: causal multi-head self-attention, then a GELU MLP. `past` (keys, values) [B, H, T', Dh]
    extends the attention to earlier positions (one new position at a time when decoding)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        batch, length, width = x.shape
        qkv = self.qkv(self.ln_1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, Dh] each
        if past is not None:
            if length != 1:
                raise ValueError("a cached forward takes one new position at a time")
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)  # [B, H, T, Dh]
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln_2(x)), (k, v)


def sample_codes(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """[B, K] logits, [B] uniforms in [0, 1) -> [B] codes by the inverse CDF (temperature 0: the argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double() / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # [B, K]
    draw = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)


class CodePrior(nn.Module):
    capabilities = frozenset({"generate"})

    def __init__(self, image_tokenizer: nn.Module, context_length: int, width: int, layers: int, heads: int,
                 temperature: float, top_k: int, guidance: float):
        super().__init__()
        self.image_tokenizer = image_tokenizer  # frozen
        self.text_tokenizer = caption_tokenizer(context_length)
        self.context_length = context_length
        self.codebook_size, self.grid_size = int(image_tokenizer.codebook_size), int(image_tokenizer.grid_size)
        self.num_codes = self.grid_size ** 2
        self.sampling = {"temperature": float(temperature), "top_k": int(top_k), "guidance": float(guidance)}
        self.token_embedding = nn.Embedding(len(self.text_tokenizer.encoder), width)
        self.code_embedding = nn.Embedding(self.codebook_size, width)
        # positions: L caption tokens, then h*w - 1 codes (the last code is predicted, never read)
        self.positional_embedding = nn.Parameter(torch.randn(context_length + self.num_codes - 1, width) * 0.01)
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.codebook_size)
        for embedding in (self.token_embedding, self.code_embedding):
            nn.init.normal_(embedding.weight, std=0.02)
        self.register_buffer("empty_caption", self.text_tokenizer([""]), persistent=False)  # [1, L]

    def train(self, mode: bool = True) -> CodePrior:
        super().train(mode)
        self.image_tokenizer.eval()  # frozen: its quantiser never updates, whatever the loop asks
        return self

    @torch.no_grad()
    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (the tokenizer's preprocess) -> codes [B, h, w] int64."""
        return self.image_tokenizer.encode_codes(images)

    def _blocks(self, x: torch.Tensor, caches: list | None = None) -> tuple[torch.Tensor, list]:
        caches = caches or [None] * len(self.blocks)
        updated = []
        for block, past in zip(self.blocks, caches):
            x, kv = block(x, past)
            updated.append(kv)
        return x, updated

    def hidden_states(self, texts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """texts [B, L], codes [B, T <= h*w - 1] read as inputs -> [B, L + T, W] (after ln_final)."""
        if texts.shape[1] != self.context_length:
            raise ValueError(f"captions of {texts.shape[1]} tokens, the prior's context is {self.context_length}")
        x = torch.cat([self.token_embedding(texts), self.code_embedding(codes)], dim=1)
        x = x + self.positional_embedding[: x.shape[1]]
        return self.ln_final(self._blocks(x)[0])

    def forward(self, texts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """texts [B, L], codes [B, h*w] -> next-code logits [B, h*w, K]: position i predicts codes[:, i] from
        the caption and codes[:, :i] only."""
        hidden = self.hidden_states(texts, codes[:, :-1])  # [B, L + hw - 1, W]
        return self.head(hidden[:, self.context_length - 1:])  # [B, hw, K]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.hidden_states(tokens, tokens.new_zeros(tokens.shape[0], 0))[:, -1]  # [B, W]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        codes = self.image_codes(images).flatten(1)  # [B, hw]
        empty = self.empty_caption.expand(codes.shape[0], -1)
        features = self.hidden_states(empty, codes[:, :-1])[:, self.context_length - 1:].mean(dim=1)  # [B, W]
        return F.normalize(features, dim=-1) if normalize else features

    # ---- generation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_codes(self, prompts: list[str], num_per_prompt: int = 1, temperature: float | None = None,
                       top_k: int | None = None, guidance: float | None = None, seed: int = 0,
                       batch_size: int = 256) -> torch.Tensor:
        """[len(prompts) * num_per_prompt, h, w] codes (prompt-major); None settings: the model's defaults."""
        from clipforge.data.transforms import sample_seed

        temperature = self.sampling["temperature"] if temperature is None else float(temperature)
        top_k = self.sampling["top_k"] if top_k is None else int(top_k)
        guidance = self.sampling["guidance"] if guidance is None else float(guidance)
        if temperature < 0 or top_k < 0 or guidance < 0 or num_per_prompt < 1:
            raise ValueError(f"temperature, top_k and guidance must be >= 0 and num_per_prompt >= 1, got "
                             f"{temperature}, {top_k}, {guidance}, {num_per_prompt}")
        rows = [(str(prompt), n) for prompt in prompts for n in range(num_per_prompt)]
        if not rows:
            return torch.zeros(0, self.grid_size, self.grid_size, dtype=torch.long)
        device = self.positional_embedding.device
        uniforms = torch.stack([torch.rand(self.num_codes, dtype=torch.float64, generator=torch.Generator().manual_seed(
            sample_seed(seed, "generate", prompt, n))) for prompt, n in rows]).to(device)  # [N, hw]
        texts = self.text_tokenizer([prompt for prompt, _ in rows]).to(device)  # [N, L]
        was_training = self.training
        self.eval()
        try:
            codes = torch.cat([self._sample(texts[i:i + batch_size], uniforms[i:i + batch_size], temperature, top_k,
                                            guidance) for i in range(0, len(rows), batch_size)])
        finally:
            self.train(was_training)
        return codes.view(-1, self.grid_size, self.grid_size)

    def _sample(self, texts: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int,
                guidance: float) -> torch.Tensor:
        batch, guided = texts.shape[0], guidance != 1.0
        if guided:  # rows B..2B-1 read the empty caption
            texts = torch.cat([texts, self.empty_caption.expand(batch, -1)])
        x, caches = self._blocks(self.token_embedding(texts) + self.positional_embedding[: self.context_length])
        codes = []
        for index in range(self.num_codes):
            logits = self.head(self.ln_final(x[:, -1])).double()  # [B or 2B, K]
            if guided:
                logits = logits[batch:] + guidance * (logits[:batch] - logits[batch:])
            code = sample_codes(logits, uniforms[:, index], temperature, top_k)  # [B]
            codes.append(code)
            if index + 1 < self.num_codes:
                step = code.repeat(2) if guided else code
                position = self.positional_embedding[self.context_length + index]
                x, caches = self._blocks(self.code_embedding(step)[:, None] + position, caches)
        return torch.stack(codes, dim=1)  # [B, hw]

    @torch.no_grad()
    def generate(self, prompts: list[str], num_per_prompt: int = 1, temperature: float | None = None,
                 top_k: int | None = None, guidance: float | None = None, seed: int = 0) -> torch.Tensor:
        """Images [len(prompts) * num_per_prompt, 3, S, S] in [-1, 1] (prompt-major), deterministic per seed."""
        codes = self.generate_codes(prompts, num_per_prompt, temperature, top_k, guidance, seed)
        return self.image_tokenizer.decode_codes(codes).clamp(-1, 1)


def build_code_prior(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
                     saved: dict | None = None) -> ModelBundle:
    """`model_kwargs` may carry {"tokenizer": RUN} (the code_ar objective's); `saved` is a model.json."""
    name, settings = family_settings(model_config, saved, model_kwargs, VARIANTS, "code_prior", check_settings)
    tokenizer, preprocess, settings["tokenizer"] = build_image_tokenizer(settings["tokenizer"], device,
                                                                         saved=saved is not None)
    arguments = {k: v for k, v in settings.items() if k != "tokenizer"}
    model = CodePrior(tokenizer, **arguments).to(device)
    config = {"family": "code_prior", "name": name, "settings": settings}
    return ModelBundle(model, preprocess, preprocess, model.text_tokenizer, config=config, frozen=("image_tokenizer",))


build_code_prior.resolve_name = resolve_name
