"""Interleaved image-text documents (for LCL), in the OBELICS layout.

A document is an ordered list of items, {"text": ...} or {"image": i}. Each image's describing sentence
(its global caption as a sentence) sits immediately before or immediately after it, with even odds, as
LCL places an image beside its matched sentence. Between image blocks, and at either end, come
unrelated sentences from a small grammar that uses no colour or shape word, so only the adjacent
sentence says what an image shows.
"""

from __future__ import annotations

import numpy as np

_SUBJECTS = ("The committee", "My neighbour", "The small bakery", "The museum", "Our team", "The river",
             "The old library", "A local farmer", "The morning train", "Every student", "The orchestra",
             "Her grandfather")
_VERBS = ("opened", "reviewed", "postponed", "celebrated", "discussed", "visited", "repaired", "announced",
          "finished", "described", "welcomed", "planned")
_OBJECTS = ("the annual report", "a new schedule", "the weekly meeting", "the garden", "a long letter",
            "the harvest", "the bridge", "an exhibition", "the budget", "a short story", "the concert",
            "the village fair")
_TIMES = ("on Tuesday", "last spring", "after lunch", "before dawn", "this week", "in the evening",
          "during the holidays", "yesterday", "at noon", "next month")


def filler_sentence(rng: np.random.Generator) -> str:
    """An unrelated sentence, e.g. 'The museum repaired the bridge after lunch.'"""
    words = [options[int(rng.integers(len(options)))] for options in (_SUBJECTS, _VERBS, _OBJECTS, _TIMES)]
    return " ".join(words) + "."


def caption_sentence(caption: str) -> str:
    """A caption as a sentence: capitalised, full stop."""
    return caption[:1].upper() + caption[1:] + "."


def document_items(captions: list[str], rng: np.random.Generator) -> tuple[list[dict], list[int]]:
    """Lay out images and sentences: returns (items, index in items of each image's describing sentence).

    One or two unrelated sentences separate consecutive image blocks, so a describing sentence is never
    adjacent to another image; zero or one open and close the document.
    """
    items: list[dict] = []
    describing: list[int] = []

    def add_fillers(count: int) -> None:
        items.extend({"text": filler_sentence(rng)} for _ in range(count))

    add_fillers(int(rng.integers(2)))
    for image_index, caption in enumerate(captions):
        if image_index > 0:
            add_fillers(1 + int(rng.integers(2)))
        sentence_first = rng.random() < 0.5
        if sentence_first:
            describing.append(len(items))
            items.append({"text": caption_sentence(caption)})
        items.append({"image": image_index})
        if not sentence_first:
            describing.append(len(items))
            items.append({"text": caption_sentence(caption)})
    add_fillers(int(rng.integers(2)))
    return items, describing
