"""Evaluation hardening: the linear-probe protocol's splits, user mistakes that would give a silently wrong
number (checkpoint pointers, colliding dataset names, stale results, non-finite features, prompts the tokenizer
truncates into one), and one-line errors checked before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from clipforge.cli import main
from clipforge.config import EvalConfig, ExperimentConfig, save_config
from clipforge.errors import ClipforgeError, DataError
from clipforge.eval import EvalDataset, load_eval_datasets, run_suite, write_report
from clipforge.eval import linear_probe as lp
from clipforge.eval.fewshot import evaluate_fewshot, mean_and_ci95
from clipforge.eval.results import read_results
from clipforge.eval.templates import load_classnames, load_templates
from clipforge.eval.zeroshot import tokenize_prompts

open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")

CLASSNAMES = ["ant", "bee", "cat"]


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("clipforge: error:") and "\n" not in error, error
    return error


class LookupModel(torch.nn.Module):
    """Image id -> a row of `table`; a text -> the one-hot of the class it names (ones when none)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.texts = table, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, ids):
        return self.table[ids[:, 0]]

    def encode_text(self, ids):
        rows = []
        for i in ids[:, 0].tolist():
            named = [c for c, name in enumerate(CLASSNAMES) if name in self.texts[i]]
            rows.append(F.one_hot(torch.tensor(named[0]), self.table.shape[1]).float() if named
                        else torch.ones(self.table.shape[1]))
        return torch.stack(rows)


def preprocess(image_id):
    return torch.tensor([image_id])


def tokenizer_for(model: LookupModel):
    def tokenize(texts):
        model.texts.extend(texts)
        return torch.arange(len(model.texts) - len(texts), len(model.texts))[:, None]
    return tokenize


def labelled(per_class: int = 6, train_classes: int = 3) -> tuple[EvalDataset, LookupModel]:
    labels = [c for c in range(3) for _ in range(per_class)]
    train_labels = [c % train_classes for c in labels]
    count = len(labels)
    table = torch.cat([torch.eye(3)[labels], torch.eye(3)[train_labels]])
    dataset = EvalDataset(name="toy", images=list(range(count)), labels=labels, classnames=CLASSNAMES,
                          captions=[[f"an {CLASSNAMES[c]}"] for c in labels])
    dataset.train = EvalDataset(name="toy-train", images=list(range(count, 2 * count)), labels=train_labels,
                                classnames=CLASSNAMES)
    return dataset, LookupModel(table)


# ----------------------------------------------------------------------------------------------------------
# Linear probe protocol


def test_probe_chooses_C_on_the_validation_split_and_never_sees_a_test_row(monkeypatch):
    # training: 40 class-0 and 10 class-1 images, separable. A tiny C predicts the majority (val acc 0.8), a
    # large C separates (val acc 1.0). The test images look like class 1 but are labelled 0: only the tiny-C
    # classifier gets them right, so a C chosen on the test split would be the smallest one.
    generator = torch.Generator().manual_seed(0)
    basis = torch.eye(4)
    train_labels = torch.tensor([0] * 40 + [1] * 10)
    train = F.normalize(basis[train_labels] + 0.05 * torch.randn(50, 4, generator=generator), dim=-1)
    test = F.normalize(basis[torch.ones(20, dtype=torch.long)] + 0.05 * torch.randn(20, 4, generator=generator),
                       dim=-1)
    test_labels = torch.zeros(20, dtype=torch.long)
    fitted, scored = [], []
    real_fit, real_accuracy = lp.fit_logistic, lp.accuracy

    def recording_fit(features, labels, C):
        fitted.append(features.clone())
        return real_fit(features, labels, C)

    def recording_accuracy(classifier, features, labels):
        scored.append(features.clone())
        return real_accuracy(classifier, features, labels)

    monkeypatch.setattr(lp, "fit_logistic", recording_fit)
    monkeypatch.setattr(lp, "accuracy", recording_accuracy)
    with pytest.warns(UserWarning, match="1 of 2 classes have no images"):  # the test split is all class 0
        result = lp.linear_probe(train, train_labels, test, test_labels, num_classes=2)

    test_rows = {tuple(row) for row in test.tolist()}
    train_rows = {tuple(row) for row in train.tolist()}
    for rows in fitted + scored:
        seen = {tuple(row) for row in rows.tolist()}
        assert not seen & test_rows and seen <= train_rows  # the sweep and the fits only ever see training rows
    assert result.metrics["lp_val_acc1"] == 1.0
    on_test = {fit.C: real_accuracy(fit, test, test_labels) for fit in result.sweep}
    assert on_test[min(on_test)] == 1.0  # the test split would have chosen the smallest C ...
    assert result.metrics["C"] > min(on_test) and result.metrics["lp_acc1"] < 1.0  # ... validation did not


def test_final_probe_is_refit_on_train_plus_validation_at_the_chosen_C():
    # overlapping classes with a noisy nuisance direction: the sweep settles on a middling C (17.8), where a fit
    # on the training part alone differs clearly from one on all training images
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    labels = torch.arange(3).repeat(20)
    nuisance = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1])
    train = F.normalize(centers[labels] + 0.5 * torch.randn(60, 8, generator=generator) * nuisance, dim=-1)
    result = lp.linear_probe(train, labels, train[:6], labels[:6], num_classes=3)
    C = result.metrics["C"]
    assert 1e-2 < C < 1e4
    everything = LogisticRegression(C=C, max_iter=lp.MAX_ITER, solver="lbfgs").fit(train.double().numpy(),
                                                                                      labels.numpy())
    torch.testing.assert_close(result.classifier.weight, torch.from_numpy(everything.coef_), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.classifier.bias, torch.from_numpy(everything.intercept_), atol=1e-6, rtol=1e-6)
    train_part, _ = lp.stratified_split(labels, lp.VAL_FRACTION, seed=0)
    part_only = LogisticRegression(C=C, max_iter=lp.MAX_ITER, solver="lbfgs").fit(
        train[train_part].double().numpy(), labels[train_part].numpy())
    assert np.abs(part_only.coef_ - everything.coef_).max() > 0.1  # the comparison can tell the two apart


# ----------------------------------------------------------------------------------------------------------
# Checkpoint pointers (the reader is models.checkpoint.read_checkpoint_pointer; this is the eval side)


def _synth_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder (synth, micro model) with no checkpoint of its own, and a valid step folder outside it."""
    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    config = ExperimentConfig(name="mine")
    config.model.name = "clipforge-vit-micro"
    config.eval = EvalConfig(tasks=["zeroshot"], num_eval=4, batch_size=4)
    save_config(config, run / "config.yaml")
    other = tmp_path / "runs" / "other" / "checkpoints" / "step_5"
    other.mkdir(parents=True)
    model = open_clip.create_model("clipforge-vit-micro")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other / "model.safetensors"))
    return run, other


@pytest.mark.parametrize("target", ["../../other/checkpoints/step_5", "absolute", 123])
def test_eval_refuses_a_checkpoint_pointer_that_leaves_the_run(tmp_path, capsys, target):
    run, other = _synth_run(tmp_path)
    target = str(other) if target == "absolute" else target
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"path": target}))
    assert main(["eval", str(run), "--no-progress", "--no-report"]) == 2
    one_line_error(capsys)
    assert not (run / "eval").exists()


# ----------------------------------------------------------------------------------------------------------
# Result files: unique dataset names, no stale results


class ColourModel(torch.nn.Module):
    """A PIL image -> its mean colour; a text -> a fixed vector."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, colours):
        return colours + 0.01

    def encode_text(self, ids):
        return torch.ones(len(ids), 3)


def colour_preprocess(image: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255)


def _csv(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (20 * i, 100, 50)).save(folder / f"{i}.png")
    (folder / "val.csv").write_text("filepath,caption\n" + "".join(f"{i}.png,picture {i}\n" for i in range(count)))
    return folder / "val.csv"


def test_two_datasets_with_one_file_stem_keep_their_own_results(tmp_path):
    first, second = _csv(tmp_path / "a", 2), _csv(tmp_path / "b", 3)
    datasets = load_eval_datasets([str(first), str(second)])
    assert [d.name for d in datasets] == ["a-val", "b-val"]
    run_suite(ColourModel(), colour_preprocess, lambda texts: torch.zeros(len(texts), 1), EvalConfig(
        tasks=["retrieval"]), datasets, tmp_path / "out", model_name="m", templates=["a {}."])
    sizes = {r["dataset"]: r["data"]["num_images"] for r in read_results(tmp_path / "out" / "eval")}
    assert sizes == {"a-val": 2, "b-val": 3}
    twins = [EvalDataset(name="val", images=[0]), EvalDataset(name="val", images=[1])]
    with pytest.raises(DataError, match="two evaluation datasets are named 'val' and 'val'"):
        run_suite(ColourModel(), preprocess, None, EvalConfig(tasks=["fewshot"]), twins)


def test_a_second_checkpoint_into_the_same_folder_leaves_no_stale_results(tmp_path):
    dataset, model = labelled()
    fewshot = {"fewshot_ways": 3, "fewshot_shots": [1], "fewshot_episodes": 3}
    run_suite(model, preprocess, tokenizer_for(model), EvalConfig(tasks=["zeroshot", "fewshot"], **fewshot),
              dataset, tmp_path, model_name="m", pretrained="step_1.safetensors", templates=["a {}."])
    run_suite(model, preprocess, tokenizer_for(model), EvalConfig(tasks=["zeroshot"], **fewshot), dataset,
              tmp_path, model_name="m", pretrained="step_2.safetensors", templates=["a {}."])
    results = read_results(tmp_path / "eval")
    assert [(r["clipforge_task"], r["pretrained"]) for r in results] == [("zeroshot", "step_2.safetensors")]
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "step_1" not in page and "Few-shot" not in page and "step_2.safetensors" in page


# ----------------------------------------------------------------------------------------------------------
# Silent wrong numbers: non-finite features, prompts the tokenizer makes identical


def test_non_finite_image_features_are_refused_naming_the_dataset():
    dataset, model = labelled()
    model.table[4] = float("nan")
    with pytest.raises(ClipforgeError, match=r"dataset 'toy' image features: .*non-finite.* for 1 of 18") as info:
        run_suite(model, preprocess, tokenizer_for(model), EvalConfig(tasks=["zeroshot"]), dataset,
                  templates=["a {}."])
    assert "\n" not in str(info.value)


class NoTextPass(LookupModel):
    def encode_text(self, ids):
        raise AssertionError("the text tower ran before the prompts were checked")


@pytest.mark.parametrize("names, template", [
    (CLASSNAMES, "word " * 100 + "a photo of a {}."),  # truncation cuts every class name off
    (["red circle", "red  circle", "cat"], "a {}."),  # the tokenizer's whitespace cleaning merges two names
])
def test_prompts_that_tokenize_to_the_same_tokens_are_refused_before_the_text_pass(names, template):
    model = NoTextPass(torch.eye(3)[[0, 1, 2]])
    dataset = EvalDataset(name="toy", images=[0, 1, 2], labels=[0, 1, 2], classnames=names)
    with pytest.raises(DataError, match=r"template 1 .* gives classes .* identical tokens") as info:
        run_suite(model, preprocess, open_clip.get_tokenizer("clipforge-vit-micro"),
                  EvalConfig(tasks=["zeroshot"]), dataset, templates=[template])
    assert "\n" not in str(info.value)


def test_truncated_prompts_warn_and_fitting_ones_do_not(recwarn):
    tokenizer = open_clip.get_tokenizer("clipforge-vit-micro")  # 24-token context
    with pytest.warns(UserWarning, match="3 of 6 zero-shot prompts are longer than the tokenizer's 24 tokens"):
        tokenize_prompts(tokenizer, CLASSNAMES, ["a {}.", "a photo of a {} " + "and more " * 12])
    recwarn.clear()
    prompts, tokens = tokenize_prompts(tokenizer, CLASSNAMES, ["a {}.", "a photo of a {}."])
    assert not [w for w in recwarn if "truncated" in str(w.message)] and tokens.shape == (6, 24)


# ----------------------------------------------------------------------------------------------------------
# One-line errors, checked before any work


@pytest.fixture
def no_work(monkeypatch):
    from clipforge.eval import suite

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation started before the flags were checked")

    monkeypatch.setattr(suite, "evaluate_model", refuse)
    monkeypatch.setattr(suite, "evaluate_run", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--out", "FILE"], "is a file, not a folder"),
    (["--out", "FILE/inside"], "is a file, not a folder"),
    (["--csv-separator", ";;"], "--csv-separator must be one character"),
    (["--templates", "missing.txt"], "does not exist"),
])
def test_eval_flag_mistakes_are_one_line_before_any_work(tmp_path, capsys, no_work, flags, message):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / f) if f.startswith("FILE") or f.endswith(".txt") else f for f in flags]
    assert main(["eval", "--model", "clipforge-vit-micro", "--no-progress", *flags]) == 2
    assert message in one_line_error(capsys)


def test_report_into_a_missing_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "missing" / "report.html")]) == 2
    assert "folder" in one_line_error(capsys) and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------------------------------------
# Datasets the default task list cannot fully serve; file formats


def test_a_single_class_training_set_skips_the_probe_with_a_reason_and_the_rest_runs(tmp_path):
    dataset, model = labelled(train_classes=1)
    dataset.variants["same"] = EvalDataset(name="toy-same", images=dataset.images, labels=dataset.labels,
                                           classnames=CLASSNAMES)
    with pytest.warns(UserWarning, match="cannot run on any dataset"):
        summary = run_suite(model, preprocess, tokenizer_for(model), EvalConfig(), dataset, tmp_path,
                            templates=["a {}."])
    assert {r["clipforge_task"] for r in summary["results"]} == {"zeroshot", "retrieval"}
    reasons = {s["task"]: s["reason"] for s in summary["skipped"]}
    assert reasons["linear_probe"] == "needs training images of at least two classes and 'toy-train' has 1"
    assert reasons["robustness"] == reasons["linear_probe"]
    assert "Not evaluated" in write_report(tmp_path).read_text(encoding="utf-8")


def test_tsv_is_read_with_tabs_and_csv_separator_is_a_flag(tmp_path, capsys):
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.tsv").write_text("filepath\tcaption\n" + "".join(f"{i}.png\tred, number {i}\n"
                                                                         for i in range(3)))
    [dataset] = load_eval_datasets(str(tmp_path / "pairs.tsv"))
    assert dataset.captions == [["red, number 0"], ["red, number 1"], ["red, number 2"]]
    (tmp_path / "pairs.csv").write_text("filepath;caption\n" + "".join(f"{i}.png;a, b {i}\n" for i in range(3)))
    out = tmp_path / "out"
    assert main(["eval", "--model", "clipforge-vit-micro", "--dataset", str(tmp_path / "pairs.csv"),
                 "--csv-separator", ";", "--tasks", "retrieval", "--out", str(out), "--no-progress",
                 "--no-report"]) == 0, capsys.readouterr().err
    [record] = read_results(out / "eval")
    assert record["dataset"] == "pairs" and record["data"]["num_captions"] == 3


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    (tmp_path / "names.txt").write_bytes("\ufeffant\nbee\n".encode())
    (tmp_path / "templates.txt").write_bytes("\ufeffa {}.\n".encode())
    assert load_classnames(tmp_path / "names.txt") == ["ant", "bee"]
    assert load_templates(tmp_path / "templates.txt") == ["a {}."]


def test_a_single_episode_has_no_confidence_interval_anywhere(tmp_path):
    from rich.console import Console

    from clipforge.cli.eval import results_table

    assert mean_and_ci95([0.5]) == (0.5, None)
    features = torch.eye(3)[torch.arange(3).repeat_interleave(4)]
    assert evaluate_fewshot(features, torch.arange(3).repeat_interleave(4), 3, 1, episodes=1, queries=2)["ci95"] \
        is None
    dataset, model = labelled()
    summary = run_suite(model, preprocess, None, EvalConfig(tasks=["fewshot"], fewshot_ways=3, fewshot_shots=[1],
                                                            fewshot_episodes=1), dataset, tmp_path)
    console = Console(record=True, width=200)
    console.print(results_table(summary))
    table = console.export_text()
    assert "±n/a" in table and "nan" not in table
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "±nan" not in page and "nan%" not in page and '<span class="muted">n/a</span>' in page
    assert math.isnan(read_results(tmp_path / "eval")[0]["metrics"]["fewshot_ci95@3way1shot"])  # null on disk
