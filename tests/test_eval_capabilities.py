"""The evaluation model protocol: tasks declare the capabilities they need and a model without one skips them
with the reason (never calling what it lacks); run folders are evaluated by one implementation; class names
given in another order than the dataset's labels are matched by name, never taken silently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipforge.cli import main
from clipforge.config import EvalConfig, ExperimentConfig, save_config
from clipforge.errors import ConfigError, DataError
from clipforge.eval import EvalDataset, load_eval_datasets, run_suite
from clipforge.eval.capabilities import missing_capabilities, model_capabilities
from clipforge.eval.results import read_results
from clipforge.eval.suite import evaluate_run
from clipforge.models.tokens import encode_image_tokens

open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")

NUM_CLASSES, PER_CLASS = 3, 6
CLASSNAMES = ["ant", "bee", "cat"]


class ImageOnlyModel(torch.nn.Module):
    """Image id -> a hand-made embedding; no text side at all (an LCL encoder, a user's backbone)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, ids):  # [B, 1] -> [B, D]
        return self.table[ids[:, 0]]


class ImageTextModel(ImageOnlyModel):
    """Adds a text side: a prompt's embedding is the one-hot of the class it names."""

    def __init__(self, table: torch.Tensor):
        super().__init__(table)
        self.texts: list[str] = []

    def encode_text(self, ids):
        rows = []
        for i in ids[:, 0].tolist():
            named = [c for c, name in enumerate(CLASSNAMES) if name in self.texts[i].lower()]
            rows.append(torch.eye(NUM_CLASSES)[named[0]] if named else torch.ones(NUM_CLASSES))
        return torch.stack(rows)


class DeclaresImageOnly(ImageTextModel):
    """Has an encode_text but says it serves images only: the suite must believe it."""

    capabilities = frozenset({"encode_image"})

    def encode_text(self, ids):
        raise AssertionError("encode_text was called on a model that declares encode_image only")


def preprocess(image_id: int) -> torch.Tensor:
    return torch.tensor([image_id])


def recording_tokenizer(model=None, calls=None):
    def tokenize(texts):
        if calls is not None:
            calls.append(list(texts))
        start = len(model.texts) if model is not None else 0
        if model is not None:
            model.texts.extend(texts)
        return torch.arange(start, start + len(texts))[:, None]
    return tokenize


def labelled_dataset(predicted: list[int] | None = None) -> tuple[EvalDataset, torch.Tensor]:
    """Test ids 0..N-1 (image i looks like class predicted[i]), train ids N..2N-1 (one-hot of their class),
    a variant, captions: every field any task asks for."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    count = len(labels)
    predicted = labels.tolist() if predicted is None else predicted
    table = torch.cat([torch.eye(NUM_CLASSES)[predicted], torch.eye(NUM_CLASSES)[labels],
                       torch.eye(NUM_CLASSES)[labels]])
    dataset = EvalDataset(name="toy", images=list(range(count)), labels=labels.tolist(), classnames=CLASSNAMES,
                          captions=[[f"a photo of {CLASSNAMES[label]} {i}"] for i, label in enumerate(labels.tolist())])
    dataset.train = EvalDataset(name="toy-train", images=list(range(count, 2 * count)), labels=labels.tolist(),
                                classnames=CLASSNAMES)
    dataset.variants["shifted"] = EvalDataset(name="toy-shifted", images=list(range(2 * count, 3 * count)),
                                              labels=labels.tolist(), classnames=CLASSNAMES)
    return dataset, table


ALL_TASKS = ["zeroshot", "retrieval", "linear_probe", "fewshot", "robustness", "regions"]
CONFIG = EvalConfig(tasks=ALL_TASKS, fewshot_ways=3, fewshot_shots=[1], fewshot_episodes=5, batch_size=8)


# ----------------------------------------------------------------------------------------------------------
# Capabilities


def test_capabilities_are_inferred_from_callables_or_declared():
    model = open_clip.create_model("clipforge-vit-micro")
    assert model_capabilities(model) == {"encode_image", "encode_text", "dense", "image_tokens"}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = encode_image_tokens(model.eval(), images)
    model.visual.output_tokens = True  # open_clip's own token output is the reference
    _, reference = model.visual(images)
    assert tokens.shape == (2, 16, model.visual.conv1.out_channels) and torch.equal(tokens, reference)
    assert model_capabilities(ImageOnlyModel(torch.eye(2))) == {"encode_image"}

    class Tokenizer(torch.nn.Module):
        def encode_codes(self, images): ...
        def decode_codes(self, codes): ...
        def generate(self, prompt): ...

    assert model_capabilities(Tokenizer()) == {"codes", "generate"}

    class HalfTokenizer(torch.nn.Module):
        def encode_codes(self, images): ...

    assert model_capabilities(HalfTokenizer()) == frozenset()  # codes need both directions
    assert model_capabilities(DeclaresImageOnly(torch.eye(2))) == {"encode_image"}

    class Typo(torch.nn.Module):
        capabilities = {"encode_images"}

    with pytest.raises(ConfigError, match="unknown capability 'encode_images'"):
        model_capabilities(Typo())
    assert missing_capabilities(("encode_image", "encode_text"), {"encode_image"}) == \
        "needs encode_text; model has encode_image only"
    assert missing_capabilities(("encode_image",), {"encode_image", "dense"}) is None


@pytest.mark.parametrize("model_class, tokenizer_given", [(ImageOnlyModel, False), (DeclaresImageOnly, True)])
def test_image_only_model_runs_probe_and_fewshot_and_skips_text_tasks_with_the_reason(
        tmp_path, model_class, tokenizer_given):
    dataset, table = labelled_dataset()
    model = model_class(table)
    calls: list = []
    tokenizer = recording_tokenizer(model, calls) if tokenizer_given else None
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(model, preprocess, tokenizer, CONFIG, dataset, tmp_path, model_name="image-only",
                            templates=["a {}."])
    assert calls == []  # no prompt or caption was even tokenized
    metrics = {r["clipforge_task"]: r["metrics"] for r in summary["results"]}
    assert set(metrics) == {"linear_probe", "fewshot"}
    assert metrics["linear_probe"]["lp_acc1"] == 1.0  # one-hot class features: separable
    assert metrics["fewshot"]["fewshot_acc1@3way1shot"] == 1.0
    skipped = {s["task"]: s["reason"] for s in summary["skipped"]}
    for task in ("zeroshot", "retrieval", "robustness"):
        assert skipped[task].startswith("needs encode_text; model has encode_image only"), skipped[task]
    assert skipped["regions"].startswith("needs encode_text and dense; model has encode_image only")
    assert summary["capabilities"] == ["encode_image"]
    assert {r["clipforge_task"] for r in read_results(tmp_path / "eval")} == {"linear_probe", "fewshot"}


def test_requested_text_task_on_image_only_model_is_one_line_refusal():
    dataset, table = labelled_dataset()
    config = EvalConfig(tasks=["zeroshot"])
    with pytest.raises(DataError, match=r"task 'zeroshot' cannot run on any dataset \(needs encode_text; model "
                                        r"has encode_image only\)$"):
        run_suite(ImageOnlyModel(table), preprocess, None, config, dataset, strict=True)


def test_text_model_without_a_tokenizer_says_so():
    dataset, table = labelled_dataset()
    with pytest.warns(UserWarning):
        summary = run_suite(ImageTextModel(table), preprocess, None, EvalConfig(tasks=["zeroshot", "fewshot"],
                            fewshot_ways=3, fewshot_shots=[1], fewshot_episodes=2), dataset)
    assert summary["skipped"] == [{"task": "zeroshot", "dataset": "toy", "reason": "needs encode_text; model has "
                                   "encode_image only (no tokenizer was given)"}]


def test_image_and_text_model_runs_every_text_task_with_the_analytic_answer():
    predicted = [0, 0, 0, 0, 1, 2] + [1] * 6 + [2, 2, 2, 0, 0, 1]  # 4 + 6 + 3 right of 18
    dataset, table = labelled_dataset(predicted)
    model = ImageTextModel(table)
    with pytest.warns(UserWarning, match=r"task 'regions' cannot run on any dataset \(needs dense; model has "
                                         r"encode_image, encode_text only\)"):
        summary = run_suite(model, preprocess, recording_tokenizer(model), CONFIG, dataset, templates=["a {}."])
    metrics = {r["clipforge_task"]: r["metrics"] for r in summary["results"]}
    assert set(metrics) == {"zeroshot", "retrieval", "linear_probe", "fewshot", "robustness"}
    assert metrics["zeroshot"]["acc1"] == pytest.approx(13 / 18)
    assert metrics["zeroshot"]["mean_per_class_recall"] == pytest.approx((4 / 6 + 1 + 3 / 6) / 3)
    assert metrics["robustness"]["acc1@shifted"] == 1.0  # the variant looks like its labels
    assert [s["task"] for s in summary["skipped"]] == ["regions"]  # a stub has no dense map


# ----------------------------------------------------------------------------------------------------------
# Run folders: one implementation, the run's own data and CSV settings


def _write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        Image.new("RGB", (32, 32), (30 * i % 256, 80, 200 - 10 * i)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def _file_run(tmp_path: Path, val: bool = True) -> Path:
    """A run trained on a ';'-separated CSV with columns image;text, its data.val in the same format."""
    data = tmp_path / "data"
    names = _write_images(data, 6)
    rows = "".join(f"{name};caption number {i}\n" for i, name in enumerate(names))
    (data / "train.csv").write_text("image;text\n" + rows)
    (data / "val.csv").write_text("image;text\n" + rows[: rows.index("img4")])  # 4 images
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    config = ExperimentConfig(name="file-run")
    config.model.name = "clipforge-vit-micro"
    config.data.train = str(data / "train.csv")
    config.data.val = str(data / "val.csv") if val else None
    config.data.csv_image_key, config.data.csv_caption_key, config.data.csv_separator = "image", "text", ";"
    config.data.batch_size = 2
    config.eval = EvalConfig(tasks=["retrieval"], batch_size=8)
    save_config(config, run / "config.yaml")
    torch.manual_seed(3)
    model = open_clip.create_model("clipforge-vit-micro")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"path": step.name}))
    return run


def test_run_trained_on_files_is_evaluated_on_its_val_with_its_csv_settings_by_library_and_cli(tmp_path, capsys):
    run = _file_run(tmp_path)
    summary = evaluate_run(run)
    [record] = summary["results"]
    assert record["dataset"] == "val" and record["data"]["num_images"] == 4 and record["data"]["num_captions"] == 4
    assert record["pretrained"].endswith("step_00000002/model.safetensors")
    out = tmp_path / "cli-out"
    assert main(["eval", str(run), "--out", str(out), "--no-progress", "--no-report"]) == 0, capsys.readouterr().err
    [from_cli] = read_results(out / "eval")
    assert from_cli["dataset"] == "val" and from_cli["metrics"] == record["metrics"]
    assert from_cli["pretrained"] == record["pretrained"]


def test_run_trained_on_files_without_val_says_what_to_pass(tmp_path, capsys):
    run = _file_run(tmp_path, val=False)
    with pytest.raises(DataError, match="no data.val.*--dataset PATH"):
        evaluate_run(run)
    assert main(["eval", str(run), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clipforge: error:") and "\n" not in error and "--dataset" in error
    # --dataset on the run: read with the run's column names; a .tsv with a tab
    rows = "".join(f"img{i}.png\tcaption {i}\n" for i in range(3))
    (tmp_path / "data" / "extra.tsv").write_text("image\ttext\n" + rows)
    assert main(["eval", str(run), "--dataset", str(tmp_path / "data" / "extra.tsv"), "--no-progress",
                 "--no-report"]) == 0, capsys.readouterr().err
    [record] = read_results(run / "eval")
    assert record["dataset"] == "extra" and record["data"]["num_captions"] == 3


# ----------------------------------------------------------------------------------------------------------
# Class names in another order than the folders' labels


def _folder(root: Path) -> None:
    for c, name in enumerate(CLASSNAMES):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (10 + 100 * c, i, 0)).save(root / name / f"{i}.png")


class ColourModel(ImageTextModel):
    """Image: the one-hot of its class, read off the red channel (10 + 100 * class)."""

    def encode_image(self, ids):
        return torch.eye(NUM_CLASSES)[ids[:, 0]]


def colour_preprocess(image: Image.Image) -> torch.Tensor:
    return torch.tensor([(image.getpixel((0, 0))[0] - 10) // 100])


def test_classnames_in_another_order_are_matched_to_the_folders_by_name(tmp_path):
    _folder(tmp_path / "pets")
    (tmp_path / "names.txt").write_text("Cat\nant\nbee\n")  # the folders, listed in another order
    with pytest.warns(UserWarning, match="matched to 'pets''s labels by name"):
        [dataset] = load_eval_datasets(str(tmp_path / "pets"), classnames_file=tmp_path / "names.txt")
    assert dataset.classnames == ["ant", "bee", "Cat"] and dataset.labels == [0, 0, 1, 1, 2, 2]
    model = ColourModel(torch.eye(NUM_CLASSES))
    summary = run_suite(model, colour_preprocess, recording_tokenizer(model), EvalConfig(tasks=["zeroshot"]),
                        dataset, templates=["a {}."])
    assert summary["results"][0]["metrics"]["acc1"] == 1.0  # not 0: each name sits at its folder's label


def test_classnames_that_contradict_the_folders_are_refused_and_new_names_are_taken_in_order(tmp_path):
    _folder(tmp_path / "pets")
    names = tmp_path / "names.txt"
    names.write_text("cat\nant\ndog\n")  # two folder names at other labels, and a stranger
    with pytest.raises(DataError, match=r"name 1 'cat' is class 3 of dataset 'pets'"):
        load_eval_datasets(str(tmp_path / "pets"), classnames_file=names)
    names.write_text("ant\nbee\n")
    with pytest.raises(DataError, match="2 class names but dataset 'pets' has 3 classes"):
        load_eval_datasets(str(tmp_path / "pets"), classnames_file=names)
    names.write_text("formica\napis\nfelis\n")  # other words for the folders (e.g. WordNet ids): label order
    [dataset] = load_eval_datasets(str(tmp_path / "pets"), classnames_file=names)
    assert dataset.classnames == ["formica", "apis", "felis"]


def test_fewshot_metrics_need_no_text_and_nan_is_never_a_ci():
    dataset, table = labelled_dataset()
    config = EvalConfig(tasks=["fewshot"], fewshot_ways=3, fewshot_shots=[1], fewshot_episodes=1)
    summary = run_suite(ImageOnlyModel(table), preprocess, None, config, dataset)
    metrics = summary["results"][0]["metrics"]
    assert metrics["fewshot_ci95@3way1shot"] is None and not math.isnan(metrics["fewshot_acc1@3way1shot"])


def test_eval_settings_from_the_command_line_are_checked_like_config_keys(capsys):
    assert main(["eval", "--model", "clipforge-vit-micro", "--set", "feature_rn=runs/x", "--no-progress"]) == 2
    assert "key 'eval.feature_rn' is unknown; did you mean 'eval.feature_run'?" in capsys.readouterr().err
    assert main(["eval", "--model", "clipforge-vit-micro", "--set", "eval.lit_steps=0", "--no-progress"]) == 2
    assert "eval.lit_steps" in capsys.readouterr().err


def test_eval_settings_from_the_command_line_reach_the_evaluation(tmp_path):
    from clipforge.cli import build_parser
    from clipforge.cli.eval import _settings

    args = build_parser().parse_args(["eval", "--model", "clipforge-vit-micro", "--out", str(tmp_path / "out"),
                                      "--set", "lit_steps=7", "eval.feature_run=runs/judge"])
    config = _settings(args)["config"]
    assert config.lit_steps == 7 and config.feature_run == "runs/judge"
