"""`clipforge train`: what a run folder holds afterwards, and bad input stopping before the first step
with one line and exit status 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from clipforge.cli import main

THREADS = 1


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def write_config(tmp_path, **sections) -> str:
    body = {
        "name": "cli",
        "output_dir": str(tmp_path / "run"),
        "data": {"batch_size": 16, "synth": {"num_train": 64, "num_val": 16, "image_size": 32, "shard_size": 64}},
        "model": {"name": "clipforge-vit-micro"},
        "train": {"epochs": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 2, "progress": False},
        "eval": {"num_eval": 32, "batch_size": 32},
    }
    for section, values in sections.items():
        body[section] = {**body.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_train_writes_config_metrics_tensorboard_plots_checkpoint_and_summary(tmp_path, capsys):
    config = write_config(tmp_path, eval={"num_eval": 32, "batch_size": 32, "tasks": ["zeroshot"], "at_end": True})
    assert main(["train", config, "train.lr=2e-3", "--no-progress"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 2e-3  # the resolved config, override applied
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "event" not in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]  # 4 steps per epoch, logged every 2
    for key in ("loss", "loss/contrastive", "lr", "logit_scale", "samples_per_s", "i2t_acc", "epoch"):
        assert key in train_records[0]
    # warm-up of 1 step, then cosine over the remaining 7: the 4th step (index 3) is 2/7 of the way down
    assert train_records[1]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 7)))
    assert list((run / "tb").glob("events.out.tfevents.*"))
    for name in ("loss", "lr", "logit_scale"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["samples_seen"] == 8 * 16
    assert summary["final_metrics"]["logit_scale"] == train_records[-1]["logit_scale"]  # from the objective
    assert (run / "checkpoints" / "step_00000008" / "model.safetensors").is_file()
    # eval.at_end: the configured tasks ran through the evaluation harness on the run's SynthScenes splits
    results = [json.loads(p.read_text()) for p in (run / "eval").glob("*zeroshot*.json")]
    assert results and all(0.0 <= r["metrics"]["acc1"] <= 1.0 for r in results)
    assert (run / "report.html").is_file()
    err = capsys.readouterr().err
    assert "evaluation at the end of training" in err and "step 8/8" in err


def test_unknown_override_key_is_one_line_with_a_suggestion(tmp_path, capsys):
    assert main(["train", write_config(tmp_path), "train.lrr=1e-3"]) == 2
    assert "did you mean 'train.lr'" in one_error_line(capsys)


def test_missing_data_path(tmp_path, capsys):
    config = write_config(tmp_path, data={"train": str(tmp_path / "no-such-shards")})
    assert main(["train", config]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    config = write_config(tmp_path, data={"train": str(tmp_path / "empty.csv")})
    assert main(["train", config]) == 2
    assert "no samples" in one_error_line(capsys)


def test_batch_larger_than_the_dataset(tmp_path, capsys):
    from PIL import Image

    rows = ["filepath,caption"]
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'},a red square number {i}")
    (tmp_path / "small.csv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, data={"train": str(tmp_path / "small.csv"), "batch_size": 8})
    assert main(["train", config]) == 2
    assert "larger than the training set" in one_error_line(capsys)


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(tmp_path, output_dir=str(tmp_path / "a-file" / "run"))
    assert main(["train", config]) == 2
    assert "is not writable" in one_error_line(capsys)


def test_resume_path_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["train", write_config(tmp_path), "--resume", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in one_error_line(capsys)


def test_one_accumulated_step_equals_adamw_on_the_mean_of_two_micro_batch_gradients(tmp_path):
    from safetensors.torch import load_file

    from clipforge.config import load_config
    from clipforge.data.pipeline import build_loader, prepare_data
    from clipforge.engine.loop import ObjectiveModule, seed_everything, train
    from clipforge.engine.optim import build_phase_optimizers, learning_rate
    from clipforge.models import create_model
    from clipforge.objectives import build_objective

    config = load_config(write_config(tmp_path), ["train.accum_steps=2", "train.max_steps=1",
                                                  "train.warmup_steps=1", "train.tensorboard=false"])
    result = train(config)
    trained = load_file(str(result.checkpoint / "model.safetensors"))

    # the same step by hand: the first two batches of epoch 0, gradients of (loss_1 + loss_2) / 2, one AdamW step
    seed_everything(config.seed)
    _bundle = create_model(config.model)
    model, preprocess, tokenizer = _bundle.model, _bundle.preprocess_val, _bundle.tokenizer
    module = ObjectiveModule(model, build_objective(config, model))
    loader = build_loader(prepare_data(config).train, config, preprocess=preprocess, tokenizer=tokenizer)
    batches = iter(loader)
    for _ in range(2):
        (module(next(batches)).total / 2).backward()
    optimizer = build_phase_optimizers(module, module.objective.phases(model), config.train,
                                       frozenset(f"model.{n}" for n in _bundle.no_weight_decay))[0].optimizer
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = learning_rate(0, 1e-3, 1, 1, "cosine")
    optimizer.step()
    module.objective.after_step(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
