"""The `lit` family: a locked image encoder, tuned text (LiT-style frozen transfer for retrieval).

    images [B, 3, S, S] -> FROZEN image encoder -> tokens [B, N, W]    (clipforge.models.tokens, no grad)
                        -> attention pool (one learned query; open_clip's AttentionalPooler) [B, W]
                        -> linear projection (no bias) -> image features [B, D]
    texts [B, L] (open_clip's CLIP BPE) -> open_clip TextTransformer trained from scratch -> text features [B, D]

The image encoder is any model with the `image_tokens` capability: a clipforge CLIP, FineCLIP or LCL run, so
their encoders compare in one table. Only the pool, the projection, the text tower and `logit_scale` train;
`encode_image` / `encode_text` / `logit_scale` are what the `clip` objective uses, so a LiT model trains under
`objective.name: clip` through the ordinary loop, and the `zeroshot` and `retrieval` tasks run on it unchanged.

Where the frozen encoder comes from (settings key `image_run`):
    a folder path        a clipforge run or checkpoint folder (`load_model(None, checkpoint=PATH)`); the
                         resolved checkpoint folder and its weight file's sha256 are recorded
    "memory:<id>"        an in-memory model lent with `lend_image_encoder(model, preprocess)` (the
                         lit_retrieval task lends the model under evaluation); its weights' fingerprint is recorded
    None                 the `random_encoder` settings: a tiny seeded random open_clip ViT, rebuilt from its seed
                         (lit-tiny, so the registry-wide tests need no run folder)
`create_model(..., model_kwargs={"image_encoder": model, "image_preprocess": preprocess})` hands one over too.
The encoder is a `ModelBundle.frozen` part: checkpoints record where it came from instead of copying it, and a
reload refuses weights that changed since. Images are preprocessed with the encoder's own preprocess.

Variants (`model.name`; or a JSON/YAML file of settings, whose missing keys take lit-small's values):
    lit-tiny     its own random 32 px ViT (patch 8, width 32, 2 layers); text 32 wide, 2 layers; D 32
    lit-small    text 64 wide, 2 layers, 4 heads, context 32; D 64    (the lit_retrieval default; needs image_run)
    lit-base     text 512 wide, 12 layers, 8 heads, context 77; D 512 (needs image_run)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from collections.abc import Callable, Iterator

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import AttentionalPooler
from PIL import Image
from torch import nn

from clipforge.config import ModelConfig
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.family import ModelBundle, variant_or_file_settings
from clipforge.models.tokens import encode_image_tokens, serves_image_tokens

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # as CLIP; the clip objective clamps it to [0, ln 100] after each step
MEMORY_PREFIX = "memory:"
TINY_RANDOM_ENCODER = {"seed": 0, "image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}

VARIANTS: dict[str, dict] = {
    "lit-tiny": {"embed_dim": 32, "text_width": 32, "text_layers": 2, "text_heads": 2, "context_length": 32,
                 "random_encoder": TINY_RANDOM_ENCODER},
    "lit-small": {"embed_dim": 64, "text_width": 64, "text_layers": 2, "text_heads": 4, "context_length": 32},
    "lit-base": {"embed_dim": 512, "text_width": 512, "text_layers": 12, "text_heads": 8, "context_length": 77},
}
REQUIRED = ("embed_dim", "text_width", "text_layers", "text_heads", "context_length")
OPTIONAL = {"image_run": None, "image_sha256": None, "random_encoder": None, "pool_heads": None}
MODEL_KWARGS = ("image_encoder", "image_preprocess")


# ---- settings -----------------------------------------------------------------------------------------------

def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_settings(settings: dict, name: str) -> dict:
    """The settings with defaults filled in; ConfigError (one line) when they cannot make a model."""
    unknown = sorted(set(settings) - set(REQUIRED) - set(OPTIONAL))
    missing = [k for k in REQUIRED if k not in settings]
    if unknown or missing:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"missing key '{missing[0]}'"
        raise ConfigError(f"lit model '{name}': {problem} (keys: {', '.join(REQUIRED + tuple(OPTIONAL))})")
    settings = {**OPTIONAL, **settings}
    for key in REQUIRED + ("pool_heads",):
        if not (settings[key] is None and key == "pool_heads") and not _positive_int(settings[key]):
            raise ConfigError(f"lit model '{name}': '{key}' must be a positive integer, got {settings[key]!r}")
    if settings["text_width"] % settings["text_heads"]:
        raise ConfigError(f"lit model '{name}': text_width {settings['text_width']} is not a multiple of "
                          f"text_heads {settings['text_heads']}")
    for key in ("image_run", "image_sha256"):
        if settings[key] is not None and not isinstance(settings[key], str):
            raise ConfigError(f"lit model '{name}': '{key}' must be a string, got {settings[key]!r}")
    random_encoder = settings["random_encoder"]
    if random_encoder is not None:
        if not isinstance(random_encoder, dict) or set(random_encoder) != set(TINY_RANDOM_ENCODER):
            raise ConfigError(f"lit model '{name}': 'random_encoder' must be a mapping with the keys "
                              f"{', '.join(TINY_RANDOM_ENCODER)}")
        bad = [k for k, v in random_encoder.items() if not (_positive_int(v) or (k == "seed" and v == 0))]
        if bad or random_encoder["image_size"] % random_encoder["patch_size"] or \
                random_encoder["width"] % random_encoder["heads"]:
            raise ConfigError(f"lit model '{name}': 'random_encoder' {random_encoder} cannot make a ViT (positive "
                              f"integers; image_size a multiple of patch_size, width of heads)")
    return settings


def variant_settings(name: str) -> dict:
    """The checked settings `name` stands for: a registered variant or a JSON/YAML file of settings (keys it leaves
    out take lit-small's values)."""
    return variant_or_file_settings(name, VARIANTS, "lit", lambda settings: check_settings(settings, name),
                                    defaults=VARIANTS["lit-small"])


def resolve_name(name: str) -> None:
    variant_settings(name)


# ---- the frozen image encoder: from a run, lent from memory, or random ------------------------------------

_LENT: dict[str, tuple[nn.Module, Callable]] = {}


@contextlib.contextmanager
def lend_image_encoder(model: nn.Module, preprocess: Callable) -> Iterator[str]:
    """Lend an in-memory image encoder to the `lit` models built inside this block: yields the `image_run`
    value ("memory:<id>") that names it. Its requires_grad flags and train/eval mode are restored on exit."""
    if not serves_image_tokens(model):
        raise ConfigError(f"{type(model).__name__} has no image tokens (needs encode_image_tokens or an open_clip "
                          f"ViT image tower)")
    key = f"{MEMORY_PREFIX}{uuid.uuid4().hex[:16]}"
    flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    _LENT[key] = (model, preprocess)
    try:
        yield key
    finally:
        del _LENT[key]
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values): the same weights, the same string."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def random_encoder(spec: dict) -> nn.Module:
    """A seeded random open_clip ViT (the same weights from the same spec; the global RNG is left as it was)."""
    vision = {"image_size": spec["image_size"], "patch_size": spec["patch_size"], "width": spec["width"],
              "layers": spec["layers"], "head_width": spec["width"] // spec["heads"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        return _build_vision_tower(spec["width"], vision)


def _resolve_image_encoder(settings: dict, kwargs: dict, saved: bool) -> tuple[nn.Module, Callable, dict]:
    """(encoder, its preprocess, the settings that record where it came from)."""
    from clipforge.models.factory import find_model_weights, load_model
    from clipforge.models.text_prior import file_sha256

    run, recorded = settings["image_run"], settings["image_sha256"] if saved else None
    if kwargs.get("image_encoder") is not None:
        if kwargs.get("image_preprocess") is None:
            raise ConfigError("lit: model_kwargs image_encoder needs image_preprocess (its PIL -> tensor transform)")
        encoder, preprocess = kwargs["image_encoder"], kwargs["image_preprocess"]
        source = {"image_run": run if saved else f"{MEMORY_PREFIX}given", "random_encoder": None}
        sha = weights_fingerprint(encoder)
    elif run is not None and run.startswith(MEMORY_PREFIX):
        if run not in _LENT:
            raise CheckpointError(f"this lit model's image encoder was an in-memory model ('{run}') that is no "
                                  f"longer lent; rebuild it with create_model(..., saved=model_json, "
                                  f"model_kwargs={{'image_encoder': model, 'image_preprocess': preprocess}})")
        encoder, preprocess = _LENT[run]
        source, sha = {"image_run": run, "random_encoder": None}, weights_fingerprint(encoder)
    elif run is not None:
        weights = find_model_weights(run)  # a run folder: its latest checkpoint, pinned below
        encoder, preprocess, _ = load_model(None, checkpoint=weights.parent)
        source = {"image_run": str(weights.parent.resolve()), "random_encoder": None}
        sha = file_sha256(weights)
    elif settings["random_encoder"] is not None:
        spec = settings["random_encoder"]
        encoder = random_encoder(spec)
        preprocess = open_clip.image_transform(spec["image_size"], is_train=False)  # OpenAI mean/std
        source, sha = {}, weights_fingerprint(encoder)
    else:
        raise ConfigError("lit: no image encoder: set 'image_run' (a clipforge run folder) in a settings file "
                          "given as model.name (e.g. lit.yaml holding 'image_run: runs/my_clip')")
    if recorded is not None and recorded != sha:
        raise CheckpointError(f"the image encoder this lit model was trained on (sha256 {recorded[:12]}...) is not "
                              f"the one found now at '{run}' ({sha[:12]}...): its weights changed")
    if not serves_image_tokens(encoder):
        raise ConfigError(f"lit: the image encoder ({type(encoder).__name__}) has no image tokens (needs "
                          f"encode_image_tokens or an open_clip ViT image tower)")
    return encoder, preprocess, {**source, "image_sha256": sha}


def _default_pool_heads(width: int) -> int:
    """CLIP's 64-wide heads where the width allows, else the most heads up to that which divide it."""
    return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)


# ---- the model ------------------------------------------------------------------------------------------------

class LitModel(nn.Module):
    capabilities = frozenset({"encode_image", "encode_text", "image_tokens"})

    def __init__(self, image_encoder: nn.Module, token_width: int, settings: dict):
        super().__init__()
        s = settings
        self.image_encoder = image_encoder
        self.image_encoder.requires_grad_(False)
        self.image_encoder.eval()
        heads = s["pool_heads"] or _default_pool_heads(token_width)
        if token_width % heads:
            raise ConfigError(f"lit: pool_heads {heads} does not divide the image tokens' width {token_width}")
        self.pool = AttentionalPooler(token_width, token_width, n_head=heads, n_queries=1)
        self.image_projection = nn.Linear(token_width, s["embed_dim"], bias=False)
        text = {"context_length": s["context_length"], "width": s["text_width"], "heads": s["text_heads"],
                "layers": s["text_layers"]}
        self.text = _build_text_tower(s["embed_dim"], text)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def train(self, mode: bool = True) -> LitModel:
        super().train(mode)
        self.image_encoder.eval()  # locked: no dropout, no batch statistics, whatever the loop asks
        return self

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, W] the frozen encoder's tokens (no gradient)."""
        return encode_image_tokens(self.image_encoder, images)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = self.encode_image_tokens(images)  # [B, N, W]
        features = self.image_projection(self.pool(tokens)[:, 0])  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(texts)  # [B, D] the <eot> state, projected
        return F.normalize(features, dim=-1) if normalize else features


@torch.no_grad()
def token_width(encoder: nn.Module, preprocess: Callable) -> int:
    """W of the encoder's tokens, from one blank image through its own preprocess."""
    try:
        device = next(encoder.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        image = preprocess(Image.new("RGB", (64, 64)))[None].to(device)  # [1, 3, S, S]
        return int(encode_image_tokens(encoder, image).shape[-1])
    finally:
        encoder.train(was_training)


# ---- the family builder ---------------------------------------------------------------------------------------

def build_lit(model_config: ModelConfig, device="cpu", model_kwargs: dict | None = None,
              saved: dict | None = None) -> ModelBundle:
    """A LiT model from a variant or settings file, or from a checkpoint's model.json (`saved`). `model_kwargs`
    may hand over the image encoder itself: {"image_encoder": model, "image_preprocess": preprocess}."""
    if model_config.pretrained:
        raise ConfigError("lit models take their image encoder from 'image_run' (a settings file as model.name); "
                          "model.pretrained is not supported")
    if model_config.lock_image or model_config.lock_text:
        raise ConfigError("model.lock_image / model.lock_text do not apply to the lit family (its image encoder is "
                          "always locked, its text tower always trains)")
    kwargs = dict(model_kwargs or {})
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise ConfigError(f"the lit family takes model_kwargs {', '.join(MODEL_KWARGS)}, not '{unknown[0]}' (is the "
                          f"objective one that trains a lit model? use objective.name: clip)")
    if saved is not None:
        name, settings = saved["name"], check_settings(dict(saved["settings"]), saved["name"])
    else:
        name, settings = model_config.name, variant_settings(model_config.name)
    encoder, preprocess, source = _resolve_image_encoder(settings, kwargs, saved is not None)
    settings = {**settings, **source}
    model = LitModel(encoder, token_width(encoder, preprocess), settings).to(device)
    if model_config.grad_checkpointing:
        model.text.set_grad_checkpointing(True)
    tokenizer = SimpleTokenizer(context_length=settings["context_length"])  # open_clip's CLIP BPE
    config = {"family": "lit", "name": name, "settings": settings}
    return ModelBundle(model, preprocess, preprocess, tokenizer, config=config, frozen=("image_encoder",),
                       no_weight_decay=frozenset({"logit_scale"}))


build_lit.resolve_name = resolve_name
