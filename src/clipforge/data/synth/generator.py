"""SynthScenes: scenes -> drawings -> webdataset records (img2dataset layout) and interleaved documents.

    gen = SynthScenes(image_size=64, seed=0, split="train", omit_fraction=0.3, long_tail=0.0)
    scene = gen.scene(123)                      # deterministic from (seed, split, index)
    image = gen.render(scene, "outline")        # PIL RGB image
    record = gen.record(123)                    # {"__key__", "png", "txt", "json"}

Same (seed, split, index, variant, image_size, omit_fraction, long_tail) gives byte-identical records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from PIL import Image

from clipforge.data.synth.attributes import CLASSNAMES, SPLITS, VARIANTS, class_label
from clipforge.data.synth.captions import global_captions, object_phrase, relation_list
from clipforge.data.synth.documents import document_items
from clipforge.data.synth.png import encode_png_array
from clipforge.data.synth.render import Drawing, draw
from clipforge.data.synth.scene import Scene, class_frequencies, sample_scene, split_id
from clipforge.errors import ConfigError

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048
_DOCUMENT_STREAM = 2  # rng stream tags (see scene.sample_scene); the variant stream uses 1
_DOCUMENT_IMAGE_STREAM = 3


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """Deterministic PNG bytes of an RGB image (PIL image or [H, W, 3] uint8 array)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    return encode_png_array(image)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown synth variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _is_real(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _dumps(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class SynthScenes:
    """A seeded generator of SynthScenes images with every annotation (see docs/synthscenes.md).

    split: "train" and "val" (base classes only, for every object; different scenes), "novel" (the main
    object is a novel colour + shape), "all" (any class). omit_fraction: chance that each secondary
    object is left out of the global caption. long_tail: Zipf exponent of main-class frequencies
    (0 = balanced; ignored by "novel").
    """

    def __init__(
        self,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        omit_fraction: float = 0.3,
        long_tail: float = 0.0,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
        ):
            raise ConfigError(f"synth image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
                              f"got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"synth seed must be a non-negative integer, got {seed!r}")
        if split not in SPLITS:
            raise ConfigError(f"synth split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not _is_real(omit_fraction) or not 0.0 <= omit_fraction <= 1.0:
            raise ConfigError(f"synth omit_fraction must be a number in [0, 1], got {omit_fraction!r}")
        if not _is_real(long_tail) or not long_tail >= 0.0:
            raise ConfigError(f"synth long_tail must be a number >= 0, got {long_tail!r}")
        self.image_size = image_size
        self.seed = int(seed)
        self.split = split
        self.omit_fraction = float(omit_fraction)
        self.long_tail = float(long_tail)

    def __repr__(self) -> str:
        return (f"SynthScenes(image_size={self.image_size}, seed={self.seed}, split={self.split!r}, "
                f"omit_fraction={self.omit_fraction}, long_tail={self.long_tail})")

    # ---- scenes and pixels -------------------------------------------------------------------------------

    def scene(self, index: int, stream: tuple[int, ...] = ()) -> Scene:
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        return sample_scene(self.seed, self.split, int(index), self.image_size, self.omit_fraction,
                            self.long_tail, stream)

    def draw(self, scene: Scene | int, variant: str = "original", with_masks: bool = False) -> Drawing:
        """The rendering plus each object's drawn box (and, on request, its [H, W] bool mask)."""
        _check_variant(variant)
        return draw(scene if isinstance(scene, Scene) else self.scene(int(scene)), variant, with_masks)

    def render(self, scene: Scene | int, variant: str = "original") -> Image.Image:
        return self.draw(scene, variant).image

    def class_frequencies(self) -> dict[int, float]:
        """Expected share of each main-object class: {label: probability}."""
        return class_frequencies(self.split, self.long_tail, self.seed)

    # ---- annotations and records -------------------------------------------------------------------------

    def key(self, index: int, variant: str = "original") -> str:
        return f"{self.split}-{index:09d}" + ("" if variant == "original" else f"-{variant}")

    def annotation(self, scene: Scene, drawing: Drawing, variant: str = "original") -> dict:
        """The record's JSON payload, computed from what was drawn."""
        objects = drawing.objects
        phrases = [object_phrase(o.size, o.fill, o.color, o.shape) for o in objects]
        boxes = [list(o.box) for o in objects]
        captions = global_captions(phrases, [o.in_caption for o in objects], boxes)
        size = scene.image_size
        return {
            "key": self.key(scene.index, variant),
            "split": scene.split,
            "variant": variant,
            "seed": scene.seed,
            "index": scene.index,
            "width": size,
            "height": size,
            "label": scene.label,
            "classname": scene.classname,
            "is_novel": scene.is_novel,
            "caption": captions[scene.caption_template],
            "captions": captions,
            "regions": [{"box": box, "caption": phrase} for box, phrase in zip(boxes, phrases)],
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "fill": o.fill, "box": box,
                 "in_caption": o.in_caption, "label": class_label(o.color, o.shape)}
                for o, box in zip(objects, boxes)
            ],
            "relations": relation_list(boxes),
            "background": drawing.background,
        }

    def record(self, index: int, variant: str = "original") -> dict:
        """A webdataset sample: {"__key__", "png": bytes, "txt": bytes, "json": bytes}."""
        _check_variant(variant)
        scene = self.scene(index)
        drawing = draw(scene, variant)
        annotation = self.annotation(scene, drawing, variant)
        return {
            "__key__": annotation["key"],
            "png": encode_png_array(drawing.pixels),
            "txt": annotation["caption"].encode("utf-8"),
            "json": _dumps(annotation),
        }

    def records(self, start: int, stop: int, variant: str = "original") -> Iterator[dict]:
        for index in range(start, stop):
            yield self.record(index, variant)

    # ---- interleaved documents ---------------------------------------------------------------------------

    def document(self, index: int, min_images: int = 2, max_images: int = 4) -> dict:
        """Interleaved document `index`: {"__key__": "doc-000000007", "0.png": bytes, ..., "json": bytes}
        with json {"items": [{"text"}|{"image"}...], "image_captions": [...], "images": [...]}."""
        if not 1 <= min_images <= max_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {min_images}, {max_images}")
        rng = np.random.default_rng([self.seed, split_id(self.split), index, _DOCUMENT_STREAM])
        count = min_images + int(rng.integers(max_images - min_images + 1))
        sample: dict = {"__key__": f"doc-{index:09d}"}
        captions, images = [], []
        for image_index in range(count):
            scene = self.scene(index, stream=(_DOCUMENT_IMAGE_STREAM, image_index + 1))
            drawing = draw(scene)
            caption = self.annotation(scene, drawing)["caption"]
            sample[f"{image_index}.png"] = encode_png_array(drawing.pixels)
            captions.append(caption)
            images.append({"label": scene.label, "classname": CLASSNAMES[scene.label], "is_novel": scene.is_novel})
        items, describing = document_items(captions, rng)
        for image, item_index in zip(images, describing):
            image["caption_item"] = item_index  # where in "items" the sentence describing this image is
        sample["json"] = _dumps({
            "key": sample["__key__"], "split": self.split, "seed": self.seed, "index": index,
            "width": self.image_size, "height": self.image_size,
            "items": items, "image_captions": captions, "images": images,
        })
        return sample

    def documents(self, start: int, stop: int, **kwargs) -> Iterator[dict]:
        for index in range(start, stop):
            yield self.document(index, **kwargs)


def render_documents(
    num: int,
    seed: int = 0,
    image_size: int = 64,
    split: str = "train",
    start: int = 0,
    omit_fraction: float = 0.3,
    long_tail: float = 0.0,
    min_images: int = 2,
    max_images: int = 4,
) -> list[dict]:
    """Documents start .. start + num - 1 as a list (use SynthScenes(...).documents() to stream)."""
    generator = SynthScenes(image_size=image_size, seed=seed, split=split, omit_fraction=omit_fraction,
                            long_tail=long_tail)
    return list(generator.documents(start, start + num, min_images=min_images, max_images=max_images))
