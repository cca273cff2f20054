"""Hostile files: nothing a file contains may run code, escape its place, or exhaust memory.

- a pickled checkpoint whose unpickling runs a shell command is refused by every model-loading path unless the
  user passes the explicit trust option, and even then torch's restricted unpickler rejects it: the marker file
  the payload would create never appears;
- tar members named '../x', '/abs/x', 'a/../../x', links (symbolic and hard), devices and FIFOs are never
  extracted, written or followed: the reader skips and counts them (`unsafe_member`) and nothing appears on disk;
- YAML that would construct Python objects is refused wherever YAML is read (experiment configs, overrides,
  model configs, a run folder's config.yaml);
- an image whose header claims billions of pixels is rejected from its header, before any pixel is decoded, by
  every image reader (training samples and evaluation datasets).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import resource
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipforge.config import ModelConfig, load_config, parse_override, read_yaml
from clipforge.data.samples import SkipCounter, decode_sample
from clipforge.data.shards import iter_tar_samples
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError, DataError

SRC = Path(__file__).resolve().parents[1] / "src" / "clipforge"
MARKER = "PWNED"



class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / MARKER
    yield path
    assert not path.exists(), "a hostile payload ran"


# ----------------------------------------------------------------------------------------------------------
# Pickled checkpoints


def _write_pickles(folder: Path, marker: Path) -> dict[str, Path]:
    """Every shape of malicious weight file: raw pickles, torch's zip format, numpy, and mislabelled files."""
    payload = {"state_dict": Payload(marker)}
    files = {}
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        files[f"pickle{suffix}"] = folder / f"weights{suffix}"
        files[f"pickle{suffix}"].write_bytes(pickle.dumps(payload))
    files["torch_zip.pt"] = folder / "torch_zip.pt"
    torch.save(payload, files["torch_zip.pt"])  # torch's own container, pickle inside
    files["pickle_as.safetensors"] = folder / "disguised.safetensors"
    files["pickle_as.safetensors"].write_bytes(pickle.dumps(payload))
    files["pickle_as.npz"] = folder / "disguised.npz"
    files["pickle_as.npz"].write_bytes(pickle.dumps(payload))
    files["object_array.npy"] = folder / "objects.npy"
    np.save(files["object_array.npy"], np.array([Payload(marker)], dtype=object), allow_pickle=True)
    assert not marker.exists()  # writing them ran nothing
    return files


PICKLE_KINDS = ["pickle.pt", "pickle.pth", "pickle.bin", "pickle.ckpt", "torch_zip.pt", "pickle_as.safetensors",
                "pickle_as.npz", "object_array.npy"]


@pytest.mark.parametrize("kind", PICKLE_KINDS)
def test_a_malicious_weight_file_is_refused_by_create_model_and_never_runs(tmp_path, marker, kind):
    from clipforge.models.factory import create_model

    path = _write_pickles(tmp_path, marker)[kind]
    for trust in (False, True):  # trusting still goes through torch's restricted unpickler
        with pytest.raises(ClipforgeError) as caught:
            create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(path), trust_pickle=trust))
        assert "\n" not in str(caught.value)
        if not trust and kind.startswith(("pickle.", "torch_zip")):
            assert "trust_pickle" in str(caught.value)  # the message says how to opt in
        assert not marker.exists()


def test_load_model_refuses_a_pickle_in_a_file_a_checkpoint_folder_and_a_run_folder(tmp_path, marker):
    from clipforge.models.factory import load_model

    evil = _write_pickles(tmp_path, marker)["pickle.pt"]
    with pytest.raises(CheckpointError, match="pickled checkpoint"):
        load_model("clipforge-vit-micro", checkpoint=evil)
    # a checkpoint folder / run folder whose model.safetensors is really a pickle
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(evil.read_bytes())
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(json.dumps({"path": step.name, "step": 4}))
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: clipforge-vit-micro\n")
    for where in (step, tmp_path / "run"):
        with pytest.raises(CheckpointError, match="not a readable safetensors"):
            load_model(None if where.name == "run" else "clipforge-vit-micro", checkpoint=where)
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_whose_state_files_are_pickles(tmp_path, marker):
    """--resume reads state.json (JSON) and state.safetensors: a pickle in either is refused, never unpickled."""
    from clipforge.engine.checkpointing import read_checkpoint

    evil = pickle.dumps({"state_dict": Payload(marker)})
    step = tmp_path / "step_00000004"
    step.mkdir()
    save_file({"optimizer.0.exp_avg": torch.zeros(2)}, str(step / "state.safetensors"))
    (step / "state.json").write_bytes(evil)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        read_checkpoint(step)
    (step / "state.json").write_text(json.dumps({"format_version": 1, "training": {}, "optimizer": {}}))
    (step / "state.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        read_checkpoint(step)
    assert not marker.exists()


UNSAFE_CALLS = {
    r"\byaml\.(load|unsafe_load|full_load)\(": "yaml loader that can build objects",
    r"\bLoader\s*=\s*yaml\.(Loader|UnsafeLoader|FullLoader)": "unsafe yaml Loader",
    r"\bpickle\.loads?\(": "pickle.load",
    r"\bdill\.|\bcloudpickle\.loads?": "pickle-like loader",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
    r"\.extractall\(|\.extract\(": "tar/zip extraction",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval/exec",
    r"shell\s*=\s*True|\bos\.system\(": "shell command",
}


def test_the_library_source_has_no_unsafe_loader_calls():
    """A static guard: no loader that can run code, and every torch.load is weights_only=True."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE_CALLS.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(SRC)}:{line}: {what}")
        for match in re.finditer(r"\btorch\.load\(", text):
            call = text[match.start(): text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(SRC)}: torch.load without weights_only=True")
    assert not found, found


# ----------------------------------------------------------------------------------------------------------
# Tar members that try to leave their place


def _png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "",
         size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


HOSTILE_MEMBERS = [  # (name, type, link target): every one must be skipped as 'unsafe_member'
    ("../escape.png", tarfile.REGTYPE, ""),
    ("../escape.txt", tarfile.REGTYPE, ""),
    ("/tmp/clipforge-absolute-escape/abs.png", tarfile.REGTYPE, ""),
    ("sub/../../escape2.png", tarfile.REGTYPE, ""),
    ("..\\windows.png", tarfile.REGTYPE, ""),
    ("C:/drive.png", tarfile.REGTYPE, ""),
    ("link.png", tarfile.SYMTYPE, "/etc/passwd"),
    ("link.txt", tarfile.SYMTYPE, "../../outside.txt"),
    ("good1.json", tarfile.SYMTYPE, "/etc/passwd"),  # a link hiding among a good sample's members
    ("hard.png", tarfile.LNKTYPE, "/etc/passwd"),
    ("hard2.txt", tarfile.LNKTYPE, "good0.txt"),
    ("device.png", tarfile.CHRTYPE, ""),
    ("fifo.png", tarfile.FIFOTYPE, ""),
]


def _hostile_shard(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "good0.png", _png(0))
        _add(tar, "good0.txt", b"a red square")
        for name, kind, link in HOSTILE_MEMBERS[:6]:
            _add(tar, name, _png(9) if name.endswith(".png") else b"escaped", kind, link)
        _add(tar, "good1.png", _png(1))
        _add(tar, "good1.txt", b"a blue circle")
        for name, kind, link in HOSTILE_MEMBERS[6:]:
            _add(tar, name, b"", kind, link)
        _add(tar, "good2.png", _png(2))
        _add(tar, "good2.txt", b"a green star")


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_tar_members_that_escape_or_link_are_skipped_counted_and_never_written(tmp_path):
    shard_dir = tmp_path / "deep" / "shards"
    shard_dir.mkdir(parents=True)
    shard = shard_dir / "hostile-000000.tar"
    _hostile_shard(shard)
    with tarfile.open(shard) as tar:  # the archive really holds these names and types
        assert {m.name for m in tar.getmembers()} >= {name for name, _, _ in HOSTILE_MEMBERS}
    before = _tree(tmp_path)
    counter = SkipCounter()
    records = list(iter_tar_samples(str(shard), counter))
    assert [r["__key__"] for r in records] == ["good0", "good1", "good2"]
    assert counter == {"unsafe_member": len(HOSTILE_MEMBERS)}
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").is_file() else b"\0never"
    for record in records:
        assert set(record) - {"__key__", "__url__", "__index__"} == {"png", "txt"}  # good1.json (a link) is not there
        assert all(value != passwd and value != b"escaped" for value in record.values())
    assert _tree(tmp_path) == before  # nothing written, beside the shard or above it
    assert not Path("/tmp/clipforge-absolute-escape").exists()
    for sample in (decode_sample(r, counter) for r in records):
        assert sample is not None and sample.image.size == (16, 16)


def test_a_member_claiming_a_huge_size_is_not_read_into_memory(tmp_path):
    """A header that claims 300 MB in a 10 kB file: counted, never allocated."""
    shard = tmp_path / "liar.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "good0.png", _png(0))
        _add(tar, "good0.txt", b"fine")
    body = bytearray(shard.read_bytes())
    header = tarfile.TarInfo("liar.png")
    header.size = 300 * 1024 * 1024
    liar = header.tobuf(tarfile.USTAR_FORMAT)
    end = 512 * 2 + 512 * ((len(_png(0)) + 511) // 512) + 512  # after good0.png and good0.txt
    shard.write_bytes(bytes(body[:end]) + liar + b"\0" * 8192)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counter = SkipCounter()
    records = list(iter_tar_samples(str(shard), counter))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert [r["__key__"] for r in records] == ["good0"]
    # refused from its header; the tar then ends inside the claimed data, which is counted as truncation
    assert counter == {"member_too_large": 1, "shard_truncated": 1}
    assert grown_mb < 100


# ----------------------------------------------------------------------------------------------------------
# YAML that would construct objects


def _tagged(marker: Path) -> list[str]:
    return [
        f"!!python/object/apply:os.system ['touch {marker}']\n",
        f"name: !!python/object/apply:os.system ['touch {marker}']\n",
        f"name: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
        "name: !!python/name:os.system\n",
        "model: !!python/object:clipforge.config.ModelConfig {name: x}\n",
    ]


def test_experiment_configs_and_overrides_refuse_object_tags(tmp_path, marker):
    for i, text in enumerate(_tagged(marker)):
        path = tmp_path / f"tagged{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="refused a YAML tag") as caught:
            read_yaml(path)
        assert "\n" not in str(caught.value)
    key, value = parse_override(f"name=!!python/object/apply:os.system ['touch {marker}']")
    assert key == "name" and isinstance(value, str)  # kept as text, never constructed
    assert load_config(None, [f"name=!!python/object/apply:os.system ['touch {marker}']"]).name.startswith("!!")


def test_model_config_yaml_files_refuse_object_tags(tmp_path, marker):
    from clipforge.models.factory import resolve_model_name

    path = tmp_path / "hostile-model.yaml"
    path.write_text(f"embed_dim: !!python/object/apply:os.system ['touch {marker}']\nvision_cfg: {{}}\n"
                    f"text_cfg: {{}}\n")
    with pytest.raises(ConfigError) as caught:
        resolve_model_name(str(path))
    assert "\n" not in str(caught.value)


def test_a_run_folders_tagged_config_yaml_is_refused_with_one_line(tmp_path, marker):
    from clipforge.models.factory import load_model

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(step / "model.safetensors"))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"path": step.name}))
    (run / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    try:
        with pytest.raises(ConfigError) as caught:
            load_model(None, checkpoint=run)
        assert "\n" not in str(caught.value) and "refused" in str(caught.value)
    finally:
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Images that claim billions of pixels


def _crc(chunk: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (the pixel data is a few bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"IHDR")
    data[at + 4: at + 12] = struct.pack(">II", width, height)
    data[at + 17: at + 21] = _crc(bytes(data[at: at + 17]))
    return bytes(data)


def jpeg_bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def bmp_bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    offset = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[offset: offset + 2])[0]
    for i in range(count):  # rewrite ImageWidth (256) and ImageLength (257) as LONGs
        entry = offset + 2 + 12 * i
        tag = struct.unpack("<H", data[entry: entry + 2])[0]
        if tag in (256, 257):
            data[entry + 2: entry + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(data)


BOMBS = {"png": png_bomb(100_000, 100_000), "jpeg": jpeg_bomb(65_000, 65_000), "gif": gif_bomb(65_535, 65_535),
         "bmp": bmp_bomb(200_000, 100_000), "tiff": tiff_bomb(100_000, 100_000)}


@pytest.mark.parametrize("fmt", list(BOMBS))
def test_a_pixel_bomb_is_rejected_from_its_header_before_decoding(fmt, monkeypatch):
    data = BOMBS[fmt]
    assert len(data) < 2000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # prove our own limit works without Pillow's guard
    with Image.open(io.BytesIO(data)) as probe:  # the header really claims > 4 billion pixels
        assert probe.size[0] * probe.size[1] >= 4 * 10**9
    loads = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original_load(self))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counter = SkipCounter()
    record = {"__key__": "bomb", "__url__": "hostile.tar", fmt: data, "txt": b"a caption"}
    assert decode_sample(record, counter) is None
    assert counter == {"image_too_large": 1}
    assert loads == []  # no pixel was decoded
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024 < 50  # MB
    with pytest.raises(DataError, match="image_too_large"):
        decode_sample(record, SkipCounter(strict=True))


@pytest.mark.parametrize("fmt", list(BOMBS))
@pytest.mark.parametrize("reader", ["encoded", "files"])
def test_evaluation_image_readers_reject_a_pixel_bomb_before_decoding(tmp_path, monkeypatch, reader, fmt):
    from clipforge.eval.datasets import EncodedImages, ImageFiles

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our own limit, not Pillow's guard
    loads = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original_load(self))
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(BOMBS[fmt])
    images = EncodedImages([BOMBS[fmt]]) if reader == "encoded" else ImageFiles([path])
    with pytest.raises(DataError) as caught:
        images[0]
    assert "\n" not in str(caught.value)
    assert loads == []
