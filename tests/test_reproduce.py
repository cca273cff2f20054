"""The reproduction machinery shared by `clipforge reproduce METHOD`: resumable evaluation, tables, arm selection,
LCL's mined pairs and its equal-images bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.config import load_config
from clipforge.errors import ConfigError
from clipforge.reproduce import common


def test_an_evaluation_is_computed_once_per_settings_and_read_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"acc": 0.5 * len(calls)}

    first = common.cached_evaluation(tmp_path, "eval", {"tasks": ["a"]}, compute, lambda m: None)
    again = common.cached_evaluation(tmp_path, "eval", {"tasks": ["a"]}, compute, lambda m: None)
    changed = common.cached_evaluation(tmp_path, "eval", {"tasks": ["a", "b"]}, compute, lambda m: None)
    assert first == again == {"acc": 0.5} and changed == {"acc": 1.0} and len(calls) == 2
    assert json.loads((tmp_path / "eval.json").read_text())["key"] == {"tasks": ["a", "b"]}


def test_a_run_is_finished_only_when_every_step_ran(tmp_path):
    assert not common.is_finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3, "total_steps": 5}))
    assert not common.is_finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 5, "total_steps": 5}))
    assert common.is_finished(tmp_path)


def test_tables_show_mean_and_sample_std_and_the_seed_count():
    arms = [common.Arm("a", "arm A", "x"), common.Arm("b", "arm B", "x"), common.Arm("c", "arm C", "x")]
    results = {"a": [{"m": 0.25, "n": 2.0}, {"m": 0.75, "n": 4.0}], "b": [{"m": float("nan"), "n": 1.0}]}
    table = common.results_table(arms, results, ["m", "n"], {"n": lambda mean, std: f"{mean:.1f}/{std:.2f}"})
    rows = table.splitlines()
    assert rows[2] == "| arm A | 2 | 50.0 +- 35.4 | 3.0/1.41 |"
    assert rows[3] == "| arm B | 1 | n/a | 1.0/0.00 |"
    assert len(rows) == 4  # arm C has no results: no row
    with pytest.raises(ConfigError, match="unknown arm 'z'"):
        common.select_arms(arms, ["a", "z"])
    assert [a.key for a in common.select_arms(arms, ["c", "a"])] == ["a", "c"]  # the method's order


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from clipforge.data.generate import generate_synth_shards

    folder = tmp_path_factory.mktemp("docs")
    generate_synth_shards(folder, num=40, image_size=32, shard_size=16, documents=True)
    return folder


def test_mined_pairs_are_each_image_with_its_describing_sentence(documents, tmp_path):
    from clipforge.data.documents import mine_document_pairs
    from clipforge.data.samples import SkipCounter
    from clipforge.data.shards import iter_tar_samples, resolve_shards
    from clipforge.data.synth import SynthScenes
    from clipforge.data.synth.documents import caption_sentence

    count, skipped = mine_document_pairs(documents, tmp_path / "pairs", shard_size=25)
    generator = SynthScenes(image_size=32)
    expected = {}
    for index in range(40):
        raw = generator.document(index)
        meta = json.loads(raw["json"])
        for number, caption in enumerate(meta["image_captions"]):
            expected[f"{raw['__key__']}-{number}"] = (caption_sentence(caption), raw[f"{number}.png"])
    mined = {}
    for shard in resolve_shards(str(tmp_path / "pairs")):
        for raw in iter_tar_samples(shard.url, SkipCounter()):
            mined[raw["__key__"]] = (raw["txt"].decode(), raw["png"])
    assert count == len(expected) == len(mined) and skipped == {}
    assert mined == expected


def test_the_share_of_images_described_after_them_is_counted_from_the_items(documents):
    from clipforge.data.synth import SynthScenes
    from clipforge.reproduce.lcl import sentence_after_share

    after = total = 0
    for raw in SynthScenes(image_size=32).documents(0, 40):
        meta = json.loads(raw["json"])
        for number, image in enumerate(meta["images"]):
            position = next(k for k, item in enumerate(meta["items"]) if item.get("image") == number)
            after += image["caption_item"] == position + 1  # SynthScenes puts the sentence right before or after
            total += 1
    assert sentence_after_share(documents) == pytest.approx(after / total) and 0 < after < total


def test_equal_images_counts_the_blocks_that_fit_the_context(documents, tmp_path):
    from clipforge.reproduce.lcl import images_per_document

    wide = tmp_path / "wide.json"  # a context every document fits in whole
    wide.write_text(json.dumps({"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
                                "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2,
                                "context_length": 1024}))
    config = load_config("configs/lcl_synth_tiny.yaml", [f"model.name={wide}", "objective.lcl.max_images=8"])
    from clipforge.data.synth import SynthScenes

    generator_counts = [len(json.loads(raw["json"])["images"]) for raw in SynthScenes(image_size=32).documents(0, 40)]
    assert images_per_document(documents, config) == pytest.approx(sum(generator_counts) / 40)
    narrow = load_config("configs/lcl_synth_tiny.yaml")  # context 96: about two 18-token blocks fit
    assert 1.0 <= images_per_document(documents, narrow) < sum(generator_counts) / 40


def test_every_reproduction_has_a_help_and_rejects_an_unknown_arm(capsys):
    from clipforge.cli import main

    for method in ("fineclip", "lcl", "lgvq", "genie"):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", method, "--help"])
        assert exit_info.value.code == 0
        assert "--seeds" in capsys.readouterr().out
    for method in ("lgvq", "genie"):
        assert main(["reproduce", method, "--arms", "nope", "--out", "/nonexistent/x", "--train-only"]) == 2
        assert "unknown arm 'nope'" in capsys.readouterr().err
    assert not Path("/nonexistent/x").exists()


def test_the_end_of_training_is_the_mean_of_the_last_records_that_have_the_metric(tmp_path):
    rows = [{"step": 10, "acc": 0.1}, {"step": 20, "acc": 0.2, "other": 5}, {"step": 30, "acc": 0.4},
            {"event": "eval", "step": 30, "acc": 0.9}, {"step": 40, "acc": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut by a cra')
    ended = common.final_logged(tmp_path, ["acc", "other", "missing"], last=3)
    assert ended["acc"] == pytest.approx((0.2 + 0.4 + 0.6) / 3) and ended["other"] == 5
    assert ended["missing"] != ended["missing"]  # NaN


def test_arms_may_run_fewer_seeds_and_the_plan_goes_seed_by_seed():
    arms = [common.Arm("a", "A", "x"), common.Arm("sweep", "S", "x")]
    arm_seeds = common.parse_arm_seeds(["sweep=0"], arms)
    plan = [(arm.key, seed) for arm, seed in common.seed_plan(arms, [0, 1, 2], arm_seeds)]
    assert plan == [("a", 0), ("sweep", 0), ("a", 1), ("a", 2)]
    for bad in (["nope=0"], ["sweep=x"], ["sweep="]):
        with pytest.raises(ConfigError):
            common.parse_arm_seeds(bad, arms)
