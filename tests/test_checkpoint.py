"""Checkpoints: pickle refusal (a malicious file never runs), shape checks, optimizer/RNG round trips,
atomic layout with keep-last-N + best, model configs from files, tower locking."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from clipforge.config import ModelConfig
from clipforge.engine.checkpointing import (
    TrainingState,
    capture_rng,
    flatten_optimizer,
    read_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer,
)
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models import create_model, find_model_weights, load_model
from clipforge.models.checkpoint import save_model_weights
from clipforge.models.clip_family import MODEL_CONFIG_DIR

MICRO = ModelConfig(name="clipforge-vit-micro")


class Payload:
    """Unpickling this runs os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_a_malicious_pickle_is_refused_and_never_executes(tmp_path, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"weights{suffix}"
    write_malicious(evil, marker)
    config = ModelConfig(name="clipforge-vit-micro", pretrained=str(evil))
    with pytest.raises(CheckpointError) as caught:
        create_model(config)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    # trusting it still reads with torch's restricted unpickler, which rejects the payload without running it
    if suffix != ".safetensors":
        with pytest.raises(CheckpointError):
            create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(evil), trust_pickle=True))
        assert not marker.exists()


def test_a_trusted_plain_state_dict_pickle_loads(tmp_path):
    model = create_model(MICRO).model
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="trust_pickle"):
        create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(tmp_path / "weights.pt")))
    loaded = create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(tmp_path / "weights.pt"),
                                               trust_pickle=True)).model
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_weights_of_another_architecture_fail_with_one_line(tmp_path):
    model = create_model(MICRO).model
    save_model_weights(model, tmp_path / "micro.safetensors")
    with pytest.raises(CheckpointError) as caught:
        create_model(ModelConfig(name="clipforge-vit-tiny", pretrained=str(tmp_path / "micro.safetensors")))
    message = str(caught.value)
    assert "does not match model 'clipforge-vit-tiny'" in message and "shape mismatch" in message
    assert "\n" not in message


def test_missing_pretrained_file_and_unknown_model_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither a pretrained tag"):
        create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ConfigError, match="did you mean 'clipforge-vit-micro'"):
        create_model(ModelConfig(name="clipforge-vit-micr"))


def test_model_config_from_a_yaml_file_builds_the_same_architecture(tmp_path):
    config = json.loads((MODEL_CONFIG_DIR / "clipforge-vit-micro.json").read_text())
    path = tmp_path / "my-micro.yaml"
    path.write_text(yaml.safe_dump(config))
    _bundle = create_model(ModelConfig(name=str(path)))
    from_yaml, tokenizer = _bundle.model, _bundle.tokenizer
    reference = create_model(MICRO).model
    assert {k: v.shape for k, v in from_yaml.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}
    assert tokenizer(["a red circle"]).shape == (1, config["text_cfg"]["context_length"])


def test_lock_image_and_lock_text_freeze_one_tower():
    locked_image = create_model(ModelConfig(name="clipforge-vit-micro", lock_image=True)).model
    assert all(not p.requires_grad for n, p in locked_image.named_parameters() if n.startswith("visual."))
    assert locked_image.token_embedding.weight.requires_grad and locked_image.logit_scale.requires_grad
    locked_text = create_model(ModelConfig(name="clipforge-vit-micro", lock_text=True)).model
    assert not locked_text.token_embedding.weight.requires_grad
    assert not locked_text.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert all(p.requires_grad for n, p in locked_text.named_parameters() if n.startswith("visual."))


def adam_after_steps(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=True)
    for _ in range(steps):
        layer(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return layer, optimizer


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    layer, optimizer = adam_after_steps(3)
    tensors, meta = flatten_optimizer(optimizer)
    save_file(tensors, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file

    restored_layer = torch.nn.Linear(4, 3)
    restored_layer.load_state_dict(layer.state_dict())
    restored = torch.optim.AdamW(restored_layer.parameters(), lr=0.5, foreach=True)
    restored.load_state_dict(unflatten_optimizer(load_file(str(tmp_path / "state.safetensors")),
                                                 json.loads((tmp_path / "state.json").read_text())))
    assert restored.param_groups[0]["lr"] == 0.1 and restored.param_groups[0]["betas"] == (0.9, 0.999)
    x = torch.randn(5, 4)
    for model, opt in ((layer, optimizer), (restored_layer, restored)):
        model(x).square().mean().backward()
        opt.step()
    for a, b in zip(layer.parameters(), restored_layer.parameters()):
        assert torch.equal(a, b)  # the next step is bit-identical


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(state)
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def save_step(root: Path, bundle, optimizer, step: int, best: bool, keep_last: int = 2):
    state = TrainingState(step=step, epoch=0, batches_in_epoch=step, data_positions=[{"batches_done": step}],
                          best_loss=1.0 / step)
    return save_checkpoint(root, bundle, {"main": optimizer}, None, state, [capture_rng()], {"model_name": "x"},
                           keep_last=keep_last, is_best=best)


def test_checkpoints_keep_last_n_plus_best_and_resume_latest(tmp_path):
    bundle = create_model(MICRO)
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    root = tmp_path / "run" / "checkpoints"
    for step, best in ((1, True), (2, False), (3, False), (4, False)):
        save_step(root, bundle, optimizer, step, best)
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["step_00000001", "step_00000003", "step_00000004"]  # last 2 + best
    assert json.loads((root / "best.json").read_text())["path"] == "step_00000001"
    latest = resolve_resume(tmp_path / "run", "latest")
    assert latest == root / "step_00000004"
    loaded = read_checkpoint(latest)
    assert loaded.training.step == 4 and loaded.training.data_positions == [{"batches_done": 4}]
    assert resolve_resume(tmp_path / "run", str(root / "step_00000003")) == root / "step_00000003"
    assert find_model_weights(tmp_path / "run") == latest / "model.safetensors"
    assert resolve_resume(tmp_path / "empty", "latest") is None


def test_a_partial_checkpoint_is_never_pointed_at_and_is_cleaned_up(tmp_path):
    bundle = create_model(MICRO)
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    root = tmp_path / "checkpoints"
    save_step(root, bundle, optimizer, 1, True)
    partial = root / ".tmp-step_00000002"  # what a run killed while saving leaves behind
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"trunc")
    assert resolve_resume(tmp_path, "latest") == root / "step_00000001"
    remove_partial_checkpoints(root)
    assert not partial.exists()


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    bundle = create_model(MICRO)
    folder = save_step(tmp_path / "checkpoints", bundle, torch.optim.AdamW(bundle.model.parameters()), 1, True)
    (folder / "state.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_load_model_reads_a_run_folder_by_its_config(tmp_path):
    bundle = create_model(MICRO)
    model = bundle.model
    run = tmp_path / "run"
    save_step(run / "checkpoints", bundle, torch.optim.AdamW(model.parameters()), 1, True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "clipforge-vit-micro"}}))
    loaded, preprocess, tokenizer = load_model(None, checkpoint=run)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
