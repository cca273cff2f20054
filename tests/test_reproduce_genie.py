"""`clipforge reproduce genie` end to end at toy sizes: a tiny random diffusers folder stands in for the trained
diffusion model and a 2-step CLIP for the backbone; every arm runs, the budgets are GeNIe's, a re-run reads every
result back, and the tables and figures are written. The protocols' maths is tested in test_genie_protocols.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipforge.config import load_config
from tests.test_diffusion_family import write_config
from tests.test_genie import build_tiny_diffusers

SIZES = dict(support_pool=2, query_pool=16, oracle_train=2, longtail_largest=4, longtail_target=3, longtail_few=1,
             longtail_sources=4, longtail_test=2, steps=4, guidance=2.0, batch_size=128)


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_shards):
    from clipforge.engine.loop import train
    from clipforge.reproduce import genie, genie_data

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reproduce_genie")
    model = build_tiny_diffusers(root / "tiny-sd")
    clip = train(load_config(write_config(root, tiny_shards, "clip", "clip", {"name": "clip"}, 2))).run_dir
    out = root / "out"
    out.mkdir()
    shutil.copytree(clip, out / "clip")
    original = genie_data.prepare_models
    genie_data.prepare_models = lambda out_dir, config_dir, progress, overrides=(): model
    messages: list[list[str]] = [[], []]
    try:
        sizes = genie_data.Sizes(**SIZES)
        payloads = [genie.reproduce_genie(out, seeds=[0], episodes=3, shots=[1, 2], sizes=sizes,
                                          progress=messages[i].append) for i in range(2)]
    finally:
        genie_data.prepare_models = original
        torch.set_num_threads(before)
    return out, payloads, messages


def test_every_arm_is_scored_on_every_episode_and_read_back_on_a_rerun(reproduced):
    from clipforge.reproduce.genie import ARMS

    out, (first, second), (_, rerun) = reproduced
    arms = first["per_seed"]["0"]["arms"]
    assert set(arms) == {arm.key for arm in ARMS}
    for result in arms.values():
        for k in ("1", "2"):
            assert len(result["fewshot"][k]["episodes"]) == 3
            assert all(0.0 <= a <= 1.0 for a in result["fewshot"][k]["episodes"])
        assert set(result["longtail"]) <= {"many", "medium", "few", "all"} and "all" in result["longtail"]
    assert sum(arms["genie_ada"]["fewshot"]["1"]["selected_ratios"].values()) == 3 * 5 * 4  # one r per edit used
    assert all(f"{arm.key} already done" in " ".join(rerun) for arm in ARMS)
    assert not [m for m in rerun if m.endswith(" edits")]  # no edit made again: every folder was finished
    assert second["fewshot_table"] == first["fewshot_table"]
    for arm in ARMS:
        assert f"| {arm.label} | 1 |" in first["fewshot_table"]
    assert Path(first["figures"]["flip_curve"]).is_file() and Path(first["figures"]["edits"]).is_file()
    assert json.loads((out / "results.json").read_text())["episodes"] == 3


def test_the_label_check_covers_every_ratio_and_its_fractions_sum_to_one(reproduced):
    _, (first, _), _ = reproduced
    curve = first["flip_curve"]
    assert list(curve) == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"]
    for fractions in curve.values():
        assert sum(fractions.values()) == pytest.approx(1.0)


def test_the_edits_are_genies_budget_and_keyed_by_source_target_and_ratio(reproduced):
    """Every support image (2 per class) edited toward every other novel class (15) at each ratio; img2img makes
    one copy per other class of an image's own class, labelled with it."""
    from clipforge.reproduce.genie_data import read_images

    out, _, _ = reproduced
    edits = out / "seed0" / "edits"
    genie = [meta for meta, _ in read_images(edits / "fewshot_genie_0.8")]
    assert len(genie) == 16 * 2 * 15
    assert len({(m["source_key"], m["target_class"]) for m in genie}) == len(genie)
    assert all(m["classname"] == m["target_class"] != m["source_class"] and m["ratio"] == 0.8 for m in genie)
    copies = [meta for meta, _ in read_images(edits / "fewshot_img2img_0.3")]
    assert all(m["classname"] == m["source_class"] != m["copy_for_class"] for m in copies)
    txt2img = [meta for meta, _ in read_images(edits / "fewshot_txt2img_1")]
    assert {m["ratio"] for m in txt2img} == {1.0} and len(txt2img) == len(genie)


def test_an_img2img_copy_and_a_genie_edit_of_the_same_pair_stay_apart():
    """Img2Img's copy of image s made for class o at r and GeNIe's edit of s toward o at r share (source, class,
    r): the mode keeps them apart, and a repeated key is refused rather than silently overwritten."""
    from clipforge.reproduce.genie_eval import EditTable

    table = EditTable()
    genie = {"mode": "genie", "source_key": "s", "target_class": "o", "ratio": 0.7}
    copy = {"mode": "img2img", "source_key": "s", "target_class": "c", "copy_for_class": "o", "ratio": 0.7}
    table.add([genie, copy], torch.tensor([[1.0], [2.0]]))
    assert table.lookup([("genie", "s", "o", 0.7), ("img2img", "s", "o", 0.7)]).flatten().tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="two edits share the key"):
        table.add([genie], torch.tensor([[3.0]]))
