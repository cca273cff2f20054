"""Every ranged config key against a hand-written table of its bounds.

The bad-config generator (test_reliability_configs.py) builds its out-of-range cases from the range metadata it
tests, so a range widened in config.py (`objective.fineclip.crop_scale` accepting 0.5) widens the test with it.
The bounds here are written by hand: a range changed in the code fails below until the table is changed too,
and a new ranged key fails `test_the_table_names_every_ranged_key` until it is added here.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from clipforge.config import ExperimentConfig, load_config
from clipforge.errors import ConfigError

MAX_SEED = 2**63 - 1

# key: (type, low, high, inclusion) -- None: no bound on that side; inclusion as in interval notation:
# "[]" both bounds allowed, "(]" / "()" the low bound refused, "[)" / "()" the high bound refused.
BOUNDS: dict[str, tuple[type, float | None, float | None, str]] = {
    "seed": (int, 0, MAX_SEED, "[]"),
    "data.synth.num_train": (int, 0, None, "()"),
    "data.synth.num_val": (int, 0, None, "()"),
    "data.synth.image_size": (int, 16, 1024, "[]"),
    "data.synth.seed": (int, 0, MAX_SEED, "[]"),
    "data.synth.shard_size": (int, 0, None, "()"),
    "data.synth.omit_fraction": (float, 0.0, 1.0, "[]"),
    "data.synth.long_tail": (float, 0.0, None, "[)"),
    "data.batch_size": (int, 0, None, "()"),
    "data.workers": (int, 0, None, "[)"),
    "data.shuffle_buffer": (int, 0, None, "[)"),
    "data.max_regions": (int, 0, None, "()"),
    "objective.fineclip.w_global": (float, 0.0, None, "[)"),
    "objective.fineclip.w_distill": (float, 0.0, None, "[)"),
    "objective.fineclip.w_region": (float, 0.0, None, "[)"),
    "objective.fineclip.crop_scale": (float, 1.0, 4.0, "[]"),
    "objective.fineclip.teacher_resolution": (int, 0, None, "()"),
    "objective.vq.codebook_weight": (float, 0.0, None, "[)"),
    "objective.vq.commitment_weight": (float, 0.0, None, "[)"),
    "objective.vq.disc_weight": (float, 0.0, None, "[)"),
    "objective.vq.disc_start": (int, 0, None, "[)"),
    "objective.vq.disc_lr": (float, 0.0, None, "()"),
    "objective.vq.disc_width": (int, 0, None, "()"),
    "objective.vq.disc_layers": (int, 1, 6, "[]"),
    "objective.vq.collapse_threshold": (float, 0.0, 100.0, "[]"),
    "objective.lgvq.max_length": (int, 4, 512, "[]"),
    "objective.lgvq.gsa_weight": (float, 0.0, None, "[)"),
    "objective.lgvq.mtp_weight": (float, 0.0, None, "[)"),
    "objective.lgvq.ras_weight": (float, 0.0, None, "[)"),
    "objective.lgvq.gsa_temperature": (float, 0.0, None, "()"),
    "objective.lgvq.mask_ratio_min": (float, 0.0, 1.0, "[]"),
    "objective.lgvq.mask_ratio_max": (float, 0.0, 1.0, "[]"),
    "objective.lgvq.label_smoothing": (float, 0.0, 1.0, "[)"),
    "objective.lgvq.code_width": (int, 0, None, "()"),
    "objective.lgvq.code_layers": (int, 0, None, "()"),
    "objective.lgvq.code_heads": (int, 0, None, "()"),
    "objective.lgvq.decoder_layers": (int, 0, None, "()"),
    "objective.lgvq.decoder_heads": (int, 0, None, "()"),
    "objective.lgvq.dropout": (float, 0.0, 1.0, "[)"),
    "objective.lcl.generation_weight": (float, 0.0, None, "[)"),
    "objective.lcl.contrastive_weight": (float, 0.0, None, "[)"),
    "objective.lcl.max_images": (int, 0, None, "()"),
    "objective.lcl.image_first_prob": (float, 0.0, 1.0, "[]"),
    "objective.code_ar.caption_dropout": (float, 0.0, 1.0, "[]"),
    "objective.autoencoder.kl_weight": (float, 0.0, None, "[]"),
    "objective.diffusion.caption_dropout": (float, 0.0, 1.0, "[]"),
    "train.epochs": (int, 0, None, "()"),
    "train.max_steps": (int, 0, None, "()"),
    "train.lr": (float, 0.0, None, "()"),
    "train.weight_decay": (float, 0.0, None, "[)"),
    "train.beta1": (float, 0.0, 1.0, "[)"),  # torch's Adam refuses beta = 1.0
    "train.beta2": (float, 0.0, 1.0, "[)"),
    "train.eps": (float, 0.0, None, "()"),
    "train.warmup_steps": (int, 0, None, "[)"),
    "train.grad_clip_norm": (float, 0.0, None, "()"),
    "train.accum_steps": (int, 0, None, "()"),
    "train.log_every": (int, 0, None, "()"),
    "train.save_every_steps": (int, 0, None, "()"),
    "train.keep_last": (int, 0, None, "()"),
    "eval.num_eval": (int, 0, None, "()"),
    "eval.batch_size": (int, 0, None, "()"),
    "eval.fewshot_ways": (int, 0, None, "()"),
    "eval.fewshot_episodes": (int, 0, None, "()"),
    "eval.seed": (int, 0, MAX_SEED, "[]"),
    "eval.transfer_epochs": (int, 0, None, "()"),
    "eval.transfer_lr": (float, 0.0, None, "()"),
    "eval.transfer_heads": (int, 0, None, "()"),
    "eval.transfer_queries": (int, 0, None, "()"),
    "eval.caption_steps": (int, 0, None, "()"),
    "eval.caption_lr": (float, 0.0, None, "()"),
    "eval.generate_per_class": (int, 0, None, "()"),
    "eval.genie_sources": (int, 0, None, "()"),
    "eval.probe_steps": (int, 0, None, "()"),
    "eval.probe_width": (int, 0, None, "()"),
    "eval.lit_steps": (int, 0, None, "()"),
    "eval.lit_batch_size": (int, 0, None, "()"),
    "eval.lit_lr": (float, 0.0, None, "()"),
}

# other keys a value needs to be valid on its own (train.max_steps=1 with the default 100 warmup steps is refused
# for the warmup, not for the range)
CONTEXT = {"train.max_steps": ["train.warmup_steps=0"],
           # cross-key check: min <= max
           "objective.lgvq.mask_ratio_min": ["objective.lgvq.mask_ratio_max=1.0"],
           "objective.lgvq.mask_ratio_max": ["objective.lgvq.mask_ratio_min=0.0"]}


def ranged_keys(cls: type = ExperimentConfig, prefix: str = "") -> set[str]:
    """Keys whose field declares a range (positive / non_negative / between / seed_field in config.py)."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= ranged_keys(hints[f.name], f"{prefix}{f.name}.")
        elif "lo" in f.metadata or "hi" in f.metadata:
            keys.add(f"{prefix}{f.name}")
    return keys


def _step(kind: type, bound: float) -> float:
    return 1 if kind is int else 1e-6 * max(1.0, abs(bound))


def edge_values(kind: type, low, high, inclusion: str) -> tuple[list, list]:
    """(values that must be accepted, values that must be refused): each bound, and the nearest value past it."""
    accepted, refused = [], []
    if low is not None:
        step = _step(kind, low)
        if inclusion[0] == "[":
            accepted.append(low)
            refused.append(low - step)
        else:
            refused.append(low)
            accepted.append(low + step)
    if high is not None:
        step = _step(kind, high)
        if inclusion[1] == "]":
            accepted.append(high)
            refused.append(high + step)
        else:
            refused.append(high)
            accepted.append(high - step)
    else:
        accepted.append(10**6 if kind is int else 1e6)  # no upper bound: a large value passes
    return accepted, refused


def _load(key: str, value) -> None:
    text = repr(float(value)) if isinstance(value, float) else str(value)
    load_config(None, [*CONTEXT.get(key, []), f"{key}={text}"])


def test_the_table_names_every_ranged_key():
    in_code = ranged_keys()
    assert in_code - BOUNDS.keys() == set(), "ranged keys missing from BOUNDS: add their bounds by hand"
    assert BOUNDS.keys() - in_code == set(), "keys in BOUNDS that no longer declare a range"


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_each_ranged_key_accepts_its_bounds_and_refuses_just_past_them(key):
    accepted, refused = edge_values(*BOUNDS[key])
    for value in accepted:
        _load(key, value)  # raises ConfigError if refused
    for value in refused:
        with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
            _load(key, value)


def test_the_edges_catch_a_widened_range():
    """The check itself: crop_scale's refused edge is below 1 (so a lower bound of 0.5 lets it through), and
    beta1 = 1.0 is among the refused values (Adam refuses it)."""
    accepted, refused = edge_values(*BOUNDS["objective.fineclip.crop_scale"])
    assert 1.0 in accepted and 4.0 in accepted and any(0.5 < v < 1.0 for v in refused)
    assert 1.0 in edge_values(*BOUNDS["train.beta1"])[1]
