"""SynthScenes: determinism, annotations that agree with the pixels, the class split, documents."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from clipforge.data.synth import (
    BACKGROUNDS,
    BASE_CLASSES,
    CLASSNAMES,
    COLOR_RGB,
    COLORS,
    NOVEL_CLASSES,
    RELATIONS,
    SHAPES,
    VARIANTS,
    SynthScenes,
    class_attributes,
    render_documents,
)
from clipforge.data.synth.attributes import SHIFT_BACKGROUNDS
from clipforge.data.synth.render import SHADE_RGB
from clipforge.data.synth.shapes import outline_mask, shape_mask
from clipforge.errors import ConfigError

NOVEL_NAMES = [CLASSNAMES[label] for label in NOVEL_CLASSES]
PIXEL_EXACT_VARIANTS = ("original", "background", "outline", "scale")  # no noise or blur on top


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB"
    return np.asarray(image)


def mask_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# ---- class list and split -----------------------------------------------------------------------------


def test_class_list_and_base_novel_split():
    assert len(CLASSNAMES) == len(COLORS) * len(SHAPES) == 64 and len(set(CLASSNAMES)) == 64
    assert len(NOVEL_CLASSES) == 16 and sorted(BASE_CLASSES + NOVEL_CLASSES) == list(range(64))
    novel_pairs = [class_attributes(label) for label in NOVEL_CLASSES]
    base_pairs = [class_attributes(label) for label in BASE_CLASSES]
    for color in COLORS:  # every colour and every shape is seen in training and appears in novel pairs
        assert sum(c == color for c, _ in novel_pairs) == 2 and sum(c == color for c, _ in base_pairs) == 6
    for shape in SHAPES:
        assert sum(s == shape for _, s in novel_pairs) == 2 and sum(s == shape for _, s in base_pairs) == 6
    for label in range(64):
        assert CLASSNAMES[label] == " ".join(class_attributes(label))


# ---- determinism ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_gives_identical_bytes_in_any_order(variant):
    first = list(SynthScenes(seed=3).records(0, 12, variant))
    again = [SynthScenes(seed=3).record(i, variant) for i in reversed(range(12))][::-1]
    assert first == again


def test_different_seed_or_split_differs():
    base = [SynthScenes(seed=0).record(i) for i in range(8)]
    other_seed = [SynthScenes(seed=1).record(i) for i in range(8)]
    other_split = [SynthScenes(seed=0, split="val").record(i) for i in range(8)]
    for a, b, c in zip(base, other_seed, other_split):
        assert a["png"] != b["png"] and a["json"] != b["json"]
        assert a["png"] != c["png"]


def test_documents_are_deterministic():
    assert render_documents(3, seed=5) == render_documents(3, seed=5)
    assert render_documents(3, seed=5) != render_documents(3, seed=6)


# ---- record schema --------------------------------------------------------------------------------------


def test_record_schema_and_png_round_trip():
    gen = SynthScenes(seed=0)
    for index in range(10):
        record = gen.record(index)
        meta = json.loads(record["json"])
        assert record["__key__"] == meta["key"] == f"train-{index:09d}"
        assert record["txt"].decode() == meta["caption"] and meta["caption"] in meta["captions"]
        assert len(set(meta["captions"])) == len(meta["captions"]) >= 3
        assert (meta["width"], meta["height"], meta["split"], meta["index"]) == (64, 64, "train", index)
        assert meta["label"] == CLASSNAMES.index(meta["classname"]) and meta["is_novel"] is False
        main = meta["objects"][0]
        assert meta["classname"] == f"{main['color']} {main['shape']}" and main["in_caption"]
        assert 1 <= len(meta["objects"]) <= 4 and meta["background"] in BACKGROUNDS
        assert [r["box"] for r in meta["regions"]] == [o["box"] for o in meta["objects"]]
        assert np.array_equal(decode(record["png"]), np.asarray(gen.render(index)))
    assert gen.record(4, "blur")["__key__"] == "train-000000004-blur"


# ---- annotations agree with the pixels ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_boxes_are_tight_around_each_objects_pixels(variant):
    gen = SynthScenes(seed=11)
    for index in range(40):
        drawing = gen.draw(index, variant, with_masks=True)
        meta = json.loads(gen.record(index, variant)["json"])
        pixels = decode(gen.record(index, variant)["png"])
        union = np.zeros(pixels.shape[:2], dtype=bool)
        for obj, mask in zip(meta["objects"], drawing.masks):
            assert obj["box"] == mask_box(mask)  # tight box of the drawn pixels
            assert not (union & mask).any()  # no object covers another
            union |= mask
            if variant in PIXEL_EXACT_VARIANTS:  # every drawn pixel shows the object's colour or shade
                shown = pixels[mask]
                allowed = np.array([COLOR_RGB[obj["color"]], SHADE_RGB[obj["color"]]])
                assert (shown[:, None, :] == allowed[None]).all(-1).any(-1).all()
        if variant in PIXEL_EXACT_VARIANTS:  # nothing of any object's colour outside the objects
            palette = np.array(list(COLOR_RGB.values()) + list(SHADE_RGB.values()))
            outside = pixels[~union]
            assert not (outside[:, None, :] == palette[None]).all(-1).any()


def _fill_from_pixels(pixels: np.ndarray, mask: np.ndarray, color: str) -> str:
    shade = (pixels == np.array(SHADE_RGB[color])).all(-1) & mask
    if not shade.any():
        return "solid"
    # Stripes are diagonal: along every anti-diagonal (x + y constant) a stripe is all shade or none.
    rows, cols = np.nonzero(mask)
    diagonal = rows + cols
    for value in np.unique(diagonal):
        states = shade[rows[diagonal == value], cols[diagonal == value]]
        if states.any() and not states.all():
            return "dotted"
    return "striped"


def test_region_captions_name_the_drawn_attributes():
    gen = SynthScenes(seed=2)
    size = gen.image_size
    for index in range(60):
        scene = gen.scene(index)
        drawing = gen.draw(scene, with_masks=True)
        meta = json.loads(gen.record(index)["json"])
        pixels = np.asarray(drawing.image)
        # the main object, whose colour + shape is the label, is the largest object in the picture
        extents = [max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in meta["objects"]]
        assert all(extent < extents[0] for extent in extents[1:])
        for obj, region, mask, placed in zip(meta["objects"], meta["regions"], drawing.masks, scene.objects):
            size_word, fill, color, shape = re.fullmatch(r"a (\w+) (\w+) (\w+) (\w+)", region["caption"]).groups()
            assert (size_word, fill, color, shape) == (obj["size"], obj["fill"], obj["color"], obj["shape"])
            # colour: the most common drawn value is nearest to the named colour
            values, counts = np.unique(pixels[mask], axis=0, return_counts=True)
            dominant = values[counts.argmax()].astype(int)
            nearest = min(COLORS, key=lambda c: np.abs(np.array(COLOR_RGB[c]) - dominant).sum())
            assert nearest == color
            assert _fill_from_pixels(pixels, mask, color) == fill
            # shape: of all eight shapes, the named one matches the drawn silhouette best
            window = mask[placed.y:placed.y + placed.side, placed.x:placed.x + placed.side]
            ious = {s: (window & shape_mask(s, placed.side)).sum() / (window | shape_mask(s, placed.side)).sum()
                    for s in SHAPES}
            assert max(ious, key=ious.get) == shape and ious[shape] == 1.0
            # size: a small object's box spans at most 0.21 of the image, a large one at least 0.245
            box = obj["box"]
            extent = max(box[2] - box[0], box[3] - box[1]) / size
            assert (extent >= 0.245) if size_word == "large" else (extent <= 0.21)


def test_outline_variant_draws_outlines_and_keeps_the_scene():
    gen = SynthScenes(seed=4)
    for index in range(20):
        scene = gen.scene(index)
        original = json.loads(gen.record(index)["json"])
        outlined = json.loads(gen.record(index, "outline")["json"])
        drawing = gen.draw(scene, "outline", with_masks=True)
        assert outlined["label"] == original["label"]
        for before, after, mask, placed in zip(original["objects"], outlined["objects"], drawing.masks,
                                               scene.objects):
            assert after["fill"] == "outline" and "outlined" in outlined["regions"][0]["caption"]
            assert {k: v for k, v in before.items() if k != "fill"} == {k: v for k, v in after.items() if k != "fill"}
            window = mask[placed.y:placed.y + placed.side, placed.x:placed.x + placed.side]
            assert np.array_equal(window, outline_mask(placed.shape, placed.side))
            assert window.sum() < shape_mask(placed.shape, placed.side).sum()  # hollow


def test_variants_show_the_same_scene():
    gen = SynthScenes(seed=8)
    for index in range(20):
        original = json.loads(gen.record(index)["json"])
        for variant in VARIANTS[1:]:
            meta = json.loads(gen.record(index, variant)["json"])
            assert meta["variant"] == variant and meta["key"] == f"train-{index:09d}-{variant}"
            assert meta["label"] == original["label"]
            assert [(o["shape"], o["color"], o["size"], o["in_caption"]) for o in meta["objects"]] == [
                (o["shape"], o["color"], o["size"], o["in_caption"]) for o in original["objects"]]
            if variant in ("noise", "blur"):
                assert meta["objects"] == original["objects"] and meta["caption"] == original["caption"]
                assert gen.record(index, variant)["png"] != gen.record(index)["png"]
            if variant == "background":
                assert meta["background"] in SHIFT_BACKGROUNDS and meta["objects"] == original["objects"]


def test_scale_variant_rescales_boxes_about_their_centres():
    gen = SynthScenes(seed=9)
    grown = shrunk = 0
    for index in range(40):
        original = json.loads(gen.record(index)["json"])["objects"]
        scaled = json.loads(gen.record(index, "scale")["json"])["objects"]
        ratios = []
        for before, after in zip(original, scaled):
            b, a = before["box"], after["box"]
            assert 0 <= a[0] < a[2] <= 64 and 0 <= a[1] < a[3] <= 64
            assert max(abs(p - q) for p, q in zip(centre(a), centre(b))) <= 1.5
            ratios.append((a[2] - a[0]) / (b[2] - b[0]))
        grown += all(r > 1.0 for r in ratios if r != 1.0) and max(ratios) > 1.1
        shrunk += all(r <= 1.0 for r in ratios) and min(ratios) < 0.85
    assert grown + shrunk == 40 and grown > 0 and shrunk > 0


# ---- captions and relations ------------------------------------------------------------------------------


def test_relations_and_captions_follow_box_centres():
    gen = SynthScenes(seed=6, omit_fraction=0.0)
    seen = set()
    for index in range(60):
        meta = json.loads(gen.record(index)["json"])
        boxes = [o["box"] for o in meta["objects"]]
        n = len(boxes)
        assert len(meta["relations"]) == n * (n - 1) // 2
        for relation in meta["relations"]:
            (sx, sy), (ox, oy) = centre(boxes[relation["subject"]]), centre(boxes[relation["object"]])
            word = relation["relation"]
            seen.add(word)
            horizontal = abs(ox - sx) >= abs(oy - sy)
            expected = {"left of": horizontal and sx < ox, "right of": horizontal and sx > ox,
                        "above": not horizontal and sy < oy, "below": not horizontal and sy > oy}
            assert expected[word], (relation, boxes)
        # template 0 ties every named object to the main one: "<main> <relation> <object>"
        relation_of = {(r["subject"], r["object"]): r["relation"] for r in meta["relations"]}
        phrases = [r["caption"] for r in meta["regions"]]
        first = meta["captions"][0]
        for k in range(1, n):
            assert f"{relation_of[(0, k)]} {phrases[k]}" in first
    assert seen == set(RELATIONS)


def test_omit_fraction_controls_which_objects_the_caption_names():
    for omit, expect_named in ((0.0, True), (1.0, False)):
        gen = SynthScenes(seed=1, omit_fraction=omit)
        for index in range(40):
            meta = json.loads(gen.record(index)["json"])
            phrases = [r["caption"] for r in meta["regions"]]
            assert meta["objects"][0]["in_caption"]
            for caption in meta["captions"]:
                assert phrases[0] in caption
                for obj, phrase in zip(meta["objects"][1:], phrases[1:]):
                    assert obj["in_caption"] is expect_named and (phrase in caption) is expect_named
    gen = SynthScenes(seed=1, omit_fraction=0.3)
    flags = [o.in_caption for i in range(1500) for o in gen.scene(i).objects[1:]]
    assert abs(1 - np.mean(flags) - 0.3) < 0.05


# ---- class split and frequencies -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_novel_classes_never_appear_in_train_or_val(split):
    gen = SynthScenes(seed=0, split=split)
    novel = set(NOVEL_CLASSES)
    for index in range(1500):
        assert not novel & {o.label for o in gen.scene(index).objects}
    for index in range(150):
        meta = json.loads(gen.record(index)["json"])
        texts = meta["captions"] + [r["caption"] for r in meta["regions"]]
        assert not any(name in text for name in NOVEL_NAMES for text in texts)
    for document in render_documents(20, seed=0, split=split):
        text = " ".join(item.get("text", "") for item in json.loads(document["json"])["items"]).lower()
        assert not any(name in text for name in NOVEL_NAMES)


def test_novel_split_main_objects_are_novel():
    gen = SynthScenes(seed=0, split="novel")
    labels = set()
    for index in range(400):
        scene = gen.scene(index)
        assert scene.is_novel and scene.label in NOVEL_CLASSES
        assert all(o.label in BASE_CLASSES for o in scene.objects[1:])  # one novel object: the label
        labels.add(scene.label)
    assert labels == set(NOVEL_CLASSES)
    assert json.loads(gen.record(0)["json"])["is_novel"] is True


def test_long_tail_gives_a_decreasing_class_histogram():
    gen = SynthScenes(seed=5, long_tail=1.0)
    expected = gen.class_frequencies()
    order = sorted(expected, key=expected.get, reverse=True)
    assert set(order) == set(BASE_CLASSES) and abs(sum(expected.values()) - 1) < 1e-9
    assert expected[order[0]] / expected[order[-1]] == pytest.approx(48.0)  # Zipf(1): p(1) / p(48)
    counts = np.bincount([gen.scene(i).label for i in range(6000)], minlength=64)[order]
    groups = counts.reshape(6, 8).sum(axis=1)  # ranks 1-8, 9-16, ...
    assert all(a > b for a, b in zip(groups, groups[1:]))
    # and the balanced default is flat: no class far from 1/48
    flat = np.bincount([SynthScenes(seed=5).scene(i).label for i in range(4800)], minlength=64)[BASE_CLASSES]
    assert flat.min() > 60 and flat.max() < 145
    # train and val share the tail order
    assert SynthScenes(seed=5, split="val", long_tail=1.0).class_frequencies() == expected


# ---- documents ----------------------------------------------------------------------------------------------


def test_documents_put_each_description_next_to_its_image():
    gen = SynthScenes(seed=3)
    before = after = 0
    for index in range(25):
        document = gen.document(index)
        meta = json.loads(document["json"])
        items, captions = meta["items"], meta["image_captions"]
        positions = [i for i, item in enumerate(items) if "image" in item]
        assert [items[p]["image"] for p in positions] == list(range(len(captions)))
        assert 2 <= len(captions) <= 4 and set(document) == {"__key__", "json"} | {f"{i}.png" for i in range(len(captions))}
        assert document["__key__"] == meta["key"] == f"doc-{index:09d}"
        texts = [item["text"] for item in items if "text" in item]
        for image_index, position in enumerate(positions):
            sentence = captions[image_index][0].upper() + captions[image_index][1:] + "."
            neighbours = [items[p].get("text") for p in (position - 1, position + 1) if 0 <= p < len(items)]
            assert sentence in neighbours and texts.count(sentence) == 1
            assert items[meta["images"][image_index]["caption_item"]]["text"] == sentence
            before += items[position - 1].get("text") == sentence if position > 0 else 0
            after += items[position + 1].get("text") == sentence if position + 1 < len(items) else 0
            # the caption describes the image stored beside it
            scene = gen.scene(index, stream=(3, image_index + 1))
            assert np.array_equal(decode(document[f"{image_index}.png"]), np.asarray(gen.render(scene)))
            assert meta["images"][image_index]["label"] == scene.label
        # the other sentences name no colour or shape: only the adjacent one describes an image
        fillers = [t for t in texts if t not in {c[0].upper() + c[1:] + "." for c in captions}]
        assert len(fillers) >= len(captions) - 1
        words = set(" ".join(fillers).lower().replace(".", "").split())
        assert not words & (set(COLORS) | set(SHAPES))
    assert before > 10 and after > 10


# ---- sizes and bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 37, 128, 512])
def test_image_size_is_configurable(size):
    gen = SynthScenes(image_size=size, seed=1)
    for index in range(3):
        record = gen.record(index, "scale" if index == 2 else "original")
        pixels = decode(record["png"])
        meta = json.loads(record["json"])
        assert pixels.shape == (size, size, 3) and (meta["width"], meta["height"]) == (size, size)
        drawing = gen.draw(index, meta["variant"], with_masks=True)
        for obj, mask in zip(meta["objects"], drawing.masks):
            assert obj["box"] == mask_box(mask)
            assert (pixels[mask] == np.array(COLOR_RGB[obj["color"]])).all(-1).any()


@pytest.mark.parametrize("kwargs", [{"image_size": 8}, {"image_size": 64.0}, {"seed": -1}, {"split": "test"},
                                    {"omit_fraction": 1.5}, {"omit_fraction": "half"},
                                    {"long_tail": -0.5}, {"long_tail": float("nan")}])
def test_bad_arguments_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SynthScenes(**kwargs)


def test_unknown_variant_raises_config_error():
    with pytest.raises(ConfigError, match="variant"):
        SynthScenes().record(0, "sepia")
