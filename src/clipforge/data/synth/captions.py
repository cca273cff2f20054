"""Region captions, spatial relations and global captions, all computed from what was drawn.

A region caption names every attribute of one object: "a large striped red circle". The global caption
names the main object and the secondary objects marked in_caption, each tied to the main object by a
spatial relation computed from the drawn boxes' centres. Several phrasings of the same content give
retrieval several captions per image.
"""

from __future__ import annotations

from collections.abc import Sequence

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUM_TEMPLATES = 4

_FILL_WORDS = {"solid": "solid", "striped": "striped", "dotted": "dotted", "outline": "outlined"}

Box = Sequence[int]  # (x0, y0, x1, y1), end-exclusive pixels


def object_phrase(size: str, fill: str, color: str, shape: str) -> str:
    """'a large striped red circle'. Sizes are consonant-initial, so the article is always 'a'."""
    return f"a {size} {_FILL_WORDS[fill]} {color} {shape}"


def box_center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def spatial_relation(subject_box: Box, object_box: Box) -> str:
    """Where the subject is relative to the object, along the axis on which their centres differ most
    (ties go to left/right). Image y grows downwards, so a smaller y is "above"."""
    subject_x, subject_y = box_center(subject_box)
    object_x, object_y = box_center(object_box)
    dx, dy = object_x - subject_x, object_y - subject_y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def relation_list(boxes: Sequence[Box]) -> list[dict]:
    """One relation per unordered pair (i < j); the reverse is implied."""
    return [
        {"subject": i, "relation": spatial_relation(boxes[i], boxes[j]), "object": j}
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
    ]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def global_captions(phrases: Sequence[str], in_caption: Sequence[bool], boxes: Sequence[Box]) -> list[str]:
    """NUM_TEMPLATES phrasings naming the main object (index 0) and every object with in_caption set.

    Template 0: "<main> left of <a>, above <b> and below <c>"
    Template 1: "a picture of <main>, which is left of <a> and above <b>"
    Template 2: "<a> is right of <main> and <b> is below it"
    Template 3: "an image of <main> with <a> right of it and with <b> below it"
    """
    main = phrases[0]
    named = [k for k in range(1, len(phrases)) if in_caption[k]]
    if not named:
        return [main, f"a picture of {main}", f"there is {main}", f"an image of {main}"]
    main_to = [f"{spatial_relation(boxes[0], boxes[k])} {phrases[k]}" for k in named]
    to_main = [spatial_relation(boxes[k], boxes[0]) for k in named]
    return [
        f"{main} {_join(main_to)}",
        f"a picture of {main}, which is {_join(main_to)}",
        _join([f"{phrases[k]} is {rel} {main if n == 0 else 'it'}" for n, (k, rel) in enumerate(zip(named, to_main))]),
        f"an image of {main} " + _join([f"with {phrases[k]} {rel} it" for k, rel in zip(named, to_main)]),
    ]
