"""Every kind of bad input is skipped and counted by kind (or repaired and counted), never a crash, never
silent; data.strict turns each skip into a DataError. The counts reach the loader's batches."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import load_config
from clipforge.data.batches import RegionBatch
from clipforge.data.pipeline import build_loader
from clipforge.data.samples import SkipCounter, decode_sample
from clipforge.data.shards import write_shards
from clipforge.data.sources import open_source
from clipforge.errors import DataError


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _noise_png(size=(32, 32), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels))


def _scrambled_png() -> bytes:
    """A PNG whose compressed pixel data is damaged (complete file, bad content)."""
    data = bytearray(_noise_png())
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 200):
        data[i] ^= 0x5A
    return bytes(data)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (a decompression bomb's header, no payload)."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr_at = data.index(b"IHDR")
    data[ihdr_at + 4 : ihdr_at + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_at : ihdr_at + 17])) & 0xFFFFFFFF
    data[ihdr_at + 17 : ihdr_at + 21] = struct.pack(">I", crc)
    return bytes(data)


def _record(key="k", image: bytes | None = None, txt: bytes | None = b"a caption", meta: dict | None = None,
            json_bytes: bytes | None = None) -> dict:
    raw = {"__key__": key, "__url__": "test.tar"}
    raw["png"] = _noise_png() if image is None else image
    if txt is not None:
        raw["txt"] = txt
    if json_bytes is not None:
        raw["json"] = json_bytes
    elif meta is not None:
        raw["json"] = json.dumps(meta).encode()
    return raw


def _bad_records() -> dict[str, dict]:
    """kind -> a record that must be skipped as that kind."""
    png = _noise_png()
    jpeg = _encode(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG", quality=90)
    no_image = _record()
    del no_image["png"]
    return {
        "corrupt_image": _record(image=_scrambled_png()),
        "not_an_image": _record(image=b"hello, I am a text file" * 10),
        "truncated_image": _record(image=png[: len(png) // 2]),
        "zero_byte_image": _record(image=b""),
        "image_too_large": _record(image=_png_with_header_size(100_000, 100_000)),
        "missing_image": no_image,
        "missing_caption": _record(txt=None),
        "empty_caption": _record(txt=b"  \n "),
        "caption_not_utf8": _record(txt=b"caf\xe9 \xff"),
        "malformed_json": _record(json_bytes=b'{"label": 3, "regions": ['),
        "bad_label": _record(meta={"label": "seven"}),
        "truncated_jpeg": _record(image=jpeg[: len(jpeg) // 2]),
    }


ALIASES = {"truncated_jpeg": "truncated_image", "not_an_image": "corrupt_image"}  # test case -> counted kind


@pytest.mark.parametrize("kind", list(_bad_records()))
def test_each_bad_sample_kind_is_skipped_and_counted(kind):
    raw = _bad_records()[kind]
    counter = SkipCounter()
    assert decode_sample(raw, counter) is None
    expected = ALIASES.get(kind, kind)
    assert counter == {expected: 1}
    with pytest.raises(DataError, match=expected) as info:
        decode_sample(raw, SkipCounter(strict=True))
    assert "\n" not in str(info.value)


def test_malformed_json_top_level_and_json_not_utf8():
    counter = SkipCounter()
    assert decode_sample(_record(json_bytes=b"[1, 2]"), counter) is None
    assert decode_sample(_record(json_bytes=b'{"a": "\xff"}'), counter) is None
    assert counter == {"malformed_json": 2}


def test_pixel_limit_is_checked_before_decoding_and_pillow_bombs_are_caught(monkeypatch):
    counter = SkipCounter()
    raw = _record(image=_noise_png((40, 40)))
    assert decode_sample(raw, counter, max_pixels=40 * 40 - 1) is None
    assert decode_sample(raw, counter, max_pixels=40 * 40) is not None
    # Pillow's own guard (warning above MAX_IMAGE_PIXELS, error above twice that) is also turned into the kind
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_sample(_record(image=_noise_png((40, 40))), counter) is None  # 1600 px: warning
    assert decode_sample(_record(image=_noise_png((50, 50))), counter) is None  # 2500 px: error
    assert counter == {"image_too_large": 3}


def test_missing_caption_falls_back_to_json_caption():
    counter = SkipCounter()
    sample = decode_sample(_record(txt=None, meta={"caption": "from json"}), counter)
    assert sample.caption == "from json" and counter == {}


# ----------------------------------------------------------------------------------------------------------
# Non-RGB images: converted and counted


def _decode_image(image: Image.Image, **save) -> tuple[np.ndarray, dict]:
    counter = SkipCounter(strict=True)  # conversions are repairs: never fatal
    fmt = save.pop("fmt", "PNG")
    sample = decode_sample(_record(image=_encode(image, fmt, **save)), counter)
    assert sample.image.mode == "RGB"
    return np.asarray(sample.image), dict(counter)


def test_grey_and_bilevel_images_are_converted():
    grey = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), "L")
    pixels, counts = _decode_image(grey)
    assert counts == {"converted_L": 1}
    assert np.array_equal(pixels, np.repeat(np.asarray(grey)[..., None], 3, axis=2))
    pixels, counts = _decode_image(grey.convert("1"))
    assert counts == {"converted_1": 1} and set(np.unique(pixels)) <= {0, 255}


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue
    pixels, counts = _decode_image(rgba)
    assert counts == {"converted_RGBA": 1}
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    half = 255 - round(255 * 128 / 255)  # white * (1 - a) + blue * a, a = 128/255
    assert tuple(pixels[0, 1]) == pytest.approx((half, half, 255), abs=1)

    la = Image.new("LA", (1, 1), (0, 0))  # transparent black -> white
    pixels, counts = _decode_image(la)
    assert counts == {"converted_LA": 1} and tuple(pixels[0, 0]) == (255, 255, 255)


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    pixels, counts = _decode_image(palette)
    assert counts == {"converted_P": 1}
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 1]) == (0, 255, 0)
    pixels, _ = _decode_image(palette, transparency=0)  # index 0 transparent -> white
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 1]) == (0, 255, 0)


def test_cmyk_and_16_bit_images():
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    pixels, counts = _decode_image(cmyk, fmt="JPEG", quality=100)
    assert counts == {"converted_CMYK": 1}
    assert pixels[0, 0, 0] > 200 and pixels[0, 0, 1] < 60 and pixels[0, 0, 2] < 60

    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    deep = Image.fromarray(values)
    assert deep.mode == "I;16"
    counter = SkipCounter()
    sample = decode_sample(_record(image=_encode(deep)), counter)
    assert counter == {"converted_I16": 1}
    assert np.asarray(sample.image)[0, :, 0].tolist() == [0, 100, 255]  # 16-bit scaled to 8-bit


# ----------------------------------------------------------------------------------------------------------
# Regions: bad boxes dropped (sample kept), partly-outside boxes clipped


def test_bad_boxes_and_captionless_regions():
    image = _encode(Image.new("RGB", (40, 30), (9, 9, 9)))
    regions = [
        {"box": [2, 3, 12, 13], "caption": "good"},
        {"box": [10, 5, 4, 9], "caption": "negative width"},
        {"box": [float("nan"), 1, 5, 5], "caption": "nan"},
        {"box": [5, 5, 5, 9], "caption": "zero area"},
        {"box": [50, 0, 60, 10], "caption": "outside"},
        {"box": [-4, 20, 8, 40], "caption": "partly outside"},
        {"box": [1, 2, 3], "caption": "three numbers"},
        {"box": [1, 1, 5, 5]},
        {"box": [1, 1, 5, 5], "caption": "   "},
        "not a region",
    ]
    counter = SkipCounter()
    raw = _record(image=image, json_bytes=json.dumps({"regions": regions}, allow_nan=True).encode())
    sample = decode_sample(raw, counter)
    assert sample is not None
    assert [(r.box, r.caption) for r in sample.regions] == [
        ((2.0, 3.0, 12.0, 13.0), "good"), ((0.0, 20.0, 8.0, 30.0), "partly outside")]
    assert counter == {"box_negative": 1, "box_nan": 1, "box_zero_area": 1, "box_outside": 1,
                       "box_clipped": 1, "box_malformed": 2, "region_no_caption": 2}
    with pytest.raises(DataError, match="box_negative"):  # strict: the first dropped region raises
        decode_sample(raw, SkipCounter(strict=True))
    clipped_only = _record(image=image, meta={"regions": [{"box": [-4, 20, 8, 40], "caption": "c"}]})
    assert decode_sample(clipped_only, SkipCounter(strict=True)).regions[0].box == (0.0, 20.0, 8.0, 30.0)


# ----------------------------------------------------------------------------------------------------------
# Counts reach the loader's batches


def _tokenizer(texts):
    return torch.tensor([[len(t) % 50, sum(map(ord, t)) % 1000] for t in texts])


def _preprocess(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


class _Compose:  # a torchvision-like Compose so region batches accept it
    def __init__(self):
        self.transforms = [_preprocess]

    def __call__(self, image):
        return _preprocess(image)


def _mixed_shards(tmp_path):
    records = [_record(f"good{i:02d}", image=_noise_png(seed=i), meta={"label": i % 3}) for i in range(20)]
    bad = _bad_records()
    for i, raw in enumerate(bad.values()):
        records.insert(2 * i + 1, dict(raw, __key__=f"bad{i:02d}"))
    write_shards(records, tmp_path, shard_size=8)
    return open_source(str(tmp_path)), bad


def test_loader_counts_every_skip_and_strict_stops(tmp_path):
    source, bad = _mixed_shards(tmp_path)
    config = load_config(None, ["data.batch_size=5", "data.shuffle_buffer=4", "seed=1"])
    loader = build_loader(source, config, preprocess=_preprocess, tokenizer=_tokenizer)
    assert len(loader) == source.num_samples // 5
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(loader) * 5
    assert all(k.startswith("good") for b in batches for k in b.keys)
    totals: dict = {}
    for batch in batches:
        for kind, n in batch.skipped.items():
            totals[kind] = totals.get(kind, 0) + n
    assert totals == loader.skipped
    expected: dict = {}
    for kind in bad:
        expected[ALIASES.get(kind, kind)] = expected.get(ALIASES.get(kind, kind), 0) + 1
    # the stream wraps around for the skipped samples: each bad record is met at least once
    assert set(totals) == set(expected) and all(totals[k] >= n for k, n in expected.items())

    for workers in (0, 2):
        strict = load_config(None, ["data.batch_size=5", "data.strict=true", f"data.workers={workers}"])
        with pytest.raises(DataError) as info:
            list(build_loader(source, strict, preprocess=_preprocess, tokenizer=_tokenizer))
        assert "\n" not in str(info.value) and "data.strict" in str(info.value)


def test_region_batch_counts_box_problems(tmp_path):
    regions = [{"box": [1, 1, 9, 9], "caption": "ok"}, {"box": [4, 4, 2, 2], "caption": "inverted"}]
    records = [_record(f"r{i}", meta={"regions": regions}) for i in range(4)]
    write_shards(records, tmp_path, shard_size=4)
    config = load_config(None, ["data.batch_size=4", "data.shuffle_buffer=0"])
    batch = next(iter(build_loader(open_source(str(tmp_path)), config, RegionBatch, _Compose(), _tokenizer,
                                   shuffle=False, image_size=8)))
    assert batch.skipped == {"box_negative": 4}
    assert batch.region_valid.sum(1).tolist() == [1, 1, 1, 1]
