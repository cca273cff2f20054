"""Field helpers of the typed configs: ranges in the dataclass field metadata, which `clipforge.config` checks
(and tests/test_config_bounds.py lists)."""

from __future__ import annotations

from dataclasses import field


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


def positive(default, **kw):
    return field(default=default, metadata=_range(0, None, lo_open=True), **kw)


def non_negative(default, **kw):
    return field(default=default, metadata=_range(0, None), **kw)


def between(default, lo, hi, *, hi_open: bool = False, **kw):
    return field(default=default, metadata=_range(lo, hi, hi_open=hi_open), **kw)


MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; a few are left for the per-rank offsets


def seed_field(default=0, **kw):
    return field(default=default, metadata=_range(0, MAX_SEED), **kw)


# ----------------------------------------------------------------------------------------------------------
# The config tree
