"""transformers' and huggingface_hub's progress bars and log warnings off for a block: the library does not print."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def transformers_quiet():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars, bars, verbosity = (not are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled(),
                                 hf_logging.get_verbosity())
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()
