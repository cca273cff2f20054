"""What a model can do for evaluation: a fixed vocabulary of capabilities, which each task declares it needs.

| capability     | what the model has                                                                 | used by |
| -------------- | ---------------------------------------------------------------------------------- | ------- |
| `encode_image` | `encode_image(images [B, 3, H, W]) -> [B, D]`                                      | zero-shot, retrieval, linear probe, few-shot, robustness |
| `encode_text`  | `encode_text(tokens) -> [B, D]` (and a tokenizer)                                  | zero-shot, retrieval, robustness, regions |
| `dense`        | region features: its own `encode_regions` / `encode_dense`, or an open_clip ViT image tower that clipforge.models.dense reads a dense map from | regions |
| `image_tokens` | `encode_image_tokens(images) -> [B, N, W]`, or an open_clip ViT image tower (clipforge.models.tokens) | frozen transfer (attentive probe, LiT retrieval, captioning) |
| `codes`        | `encode_codes` and `decode_codes` (a VQ image tokenizer)                            | code tasks |
| `generate`     | `generate` (image generation)                                                      | generation tasks |
| `edit`         | `edit(images, prompts, ratios, seeds)` (text-guided image editing, GeNIe's sampler) | genie_edits |

A model may state what it serves with a `capabilities` attribute (names from this vocabulary); otherwise
`model_capabilities` infers it from the callables the model has. A task whose capability a model lacks is
skipped with the reason (`missing_capabilities`), never run into an AttributeError.
"""

from __future__ import annotations

from collections.abc import Iterable

from clipforge.errors import ConfigError

CAPABILITIES = ("encode_image", "encode_text", "dense", "image_tokens", "codes", "generate", "edit")


def _callable(model, name: str) -> bool:
    return callable(getattr(model, name, None))


def _serves_dense(model) -> bool:
    if _callable(model, "encode_regions") or _callable(model, "encode_dense"):
        return True
    from clipforge.models.dense import vision_transformer  # imported here: open_clip is only needed for ViTs

    try:
        vision_transformer(model)
    except ConfigError:
        return False
    return True


def model_capabilities(model) -> frozenset[str]:
    """The capabilities `model` declares (its `capabilities` attribute) or, without one, those its callables
    give: `encode_image`, `encode_text`, `dense`, `codes` (`encode_codes` + `decode_codes`), `generate`, `edit`."""
    declared = getattr(model, "capabilities", None)
    if declared is not None:
        names = frozenset([declared] if isinstance(declared, str) else declared)
        unknown = sorted(names - set(CAPABILITIES))
        if unknown:
            raise ConfigError(f"{type(model).__name__}.capabilities names an unknown capability '{unknown[0]}' "
                              f"(known: {', '.join(CAPABILITIES)})")
        return names
    found = {name for name in ("encode_image", "encode_text", "generate", "edit") if _callable(model, name)}
    if _callable(model, "encode_codes") and _callable(model, "decode_codes"):
        found.add("codes")
    if _serves_dense(model):
        found.add("dense")
    from clipforge.models.tokens import serves_image_tokens

    if serves_image_tokens(model):
        found.add("image_tokens")
    return frozenset(found)


def _in_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [c for c in CAPABILITIES if c in names] + sorted(names - set(CAPABILITIES))


def missing_capabilities(needs: Iterable[str], has: Iterable[str], note: str = "") -> str | None:
    """None when `has` covers `needs`, else the reason: 'needs encode_text; model has encode_image only'."""
    missing = _in_order(set(needs) - set(has))
    if not missing:
        return None
    present = _in_order(has)
    owned = f"model has {', '.join(present)} only" if present else "model has none of " + ", ".join(CAPABILITIES)
    return f"needs {' and '.join(missing)}; {owned}{note}"
