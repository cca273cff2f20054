"""`clipforge data synth` and `clipforge data inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.data.inspect import inspect_data
from clipforge.data.shards import write_shards
from clipforge.data.synth import SynthScenes


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["data", "synth", "--out", str(out), "--num", "30", "--shard-size", "8", "--seed", "4",
            "--image-size", "32", "--split", "val", "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [8, 8, 8, 6]
    assert manifest["meta"]["split"] == "val" and manifest["meta"]["seed"] == 4
    first = (out / "val-000000.tar").read_bytes()
    assert main(args) == 0  # same settings: left as it is
    assert "up to date" in capsys.readouterr().err
    assert (out / "val-000000.tar").read_bytes() == first

    assert main(["data", "inspect", str(out), "--classes", "100"]) == 0
    printed = capsys.readouterr().out
    report = inspect_data(str(out))
    assert report.num_valid == report.num_read == 30 and report.skipped == {}
    expected = {}
    for record in SynthScenes(image_size=32, seed=4, split="val").records(0, 30):
        name = json.loads(record["json"])["classname"]
        expected[name] = expected.get(name, 0) + 1
    assert report.classes == expected
    assert all(name in printed for name in expected)
    assert report.examples[0] == ("val-000000000", SynthScenes(image_size=32, seed=4, split="val")
                                  .record(0)["txt"].decode())
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 4 * 32 * 4  # 4 columns of images upscaled 8x to 256 px
    # the first tile is the first sample, upscaled with nearest-neighbour: its corner pixel matches
    corner = np.asarray(sheet)[8 + 2, 8 + 2]
    original = np.asarray(Image.open(__import__("io").BytesIO(
        SynthScenes(image_size=32, seed=4, split="val").record(0)["png"])))[0, 0]
    assert tuple(corner) == tuple(original)


def test_inspect_reports_bad_input_and_writes_where_asked(tmp_path, capsys):
    records = list(SynthScenes(image_size=32, seed=0).records(0, 6))
    records[1] = dict(records[1], png=b"")
    records[2] = dict(records[2], txt=b"\xff\xfe")
    write_shards(records, tmp_path / "d", shard_size=4)
    sheet = tmp_path / "elsewhere" / "sheet.png"
    assert main(["data", "inspect", str(tmp_path / "d" / "shard-{000000..000001}.tar"), "--out", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "zero_byte_image" in printed and "caption_not_utf8" in printed
    assert sheet.is_file()
    report = inspect_data(str(tmp_path / "d"))
    assert report.skipped == {"zero_byte_image": 1, "caption_not_utf8": 1} and report.num_valid == 4


def test_documents_are_written_and_inspected(tmp_path, capsys):
    out = tmp_path / "docs"
    assert main(["data", "synth", "--out", str(out), "--num", "3", "--documents", "--image-size", "32",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["doc-000000.tar"]
    report = inspect_data(str(out))
    assert report.num_documents == 3 and report.skipped == {}
    assert main(["data", "inspect", str(out)]) == 0
    assert (out / "contact_sheet.png").is_file()


@pytest.mark.parametrize("argv", [
    ["data", "inspect", "/nonexistent/folder"],
    ["data", "synth", "--out", "x", "--num", "0"],
    ["data", "synth", "--out", "x", "--num", "5", "--variant", "sepia"],
])
def test_user_errors_are_one_line_with_status_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error:") and "\n" not in err and "Traceback" not in err


def test_help_texts(capsys):
    for argv in (["data", "synth", "--help"], ["data", "inspect", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--documents" in text and "contact-sheet" in text and "brace pattern" in text
