"""Every registered model family and objective, in the style of timm's test_models.py.

For each objective (paired with the tiny variant of the first family it trains) and so for every family:
  1. build the tiny variant and run one training step: every trainable parameter gets a finite gradient,
     in every optimiser phase;
  2. SIGKILL a run right after a mid-epoch checkpoint and resume it: bit-identical weights (and objective
     state) to an uninterrupted run;
  3. reload the checkpoint from its folder alone (model.json): identical outputs.
A new family or objective joins by registering (clipforge.registry, models.family.TINY_VARIANTS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipforge.config import load_config
from clipforge.registry import FAMILIES, OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "helpers" / "train_until_killed.py"
THREADS = 1
STEPS, KILL_AT = 6, 3  # 8 batches per epoch: the kill lands mid-epoch, after the toy GAN's discriminator started


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


def combinations() -> list[tuple[str, str]]:
    """(objective, family): each objective with its first family, and every other family with an objective that
    trains it; every family must be covered."""
    from clipforge.objectives.registry import objective_class

    pairs = [(name, objective_class(name).families[0]) for name in OBJECTIVES.names()]
    for family in FAMILIES.names():  # a family that is no objective's first (lit, trained by clip): its first trainer
        if family not in {f for _, f in pairs}:
            trainers = [name for name in OBJECTIVES.names() if family in objective_class(name).families]
            assert trainers, f"no registered objective trains the family '{family}'"
            pairs.append((trainers[0], family))
    return pairs


@pytest.fixture
def shards(tiny_shards) -> Path:
    return tiny_shards


def write_config(folder: Path, shards: Path, name: str, objective: str, family: str) -> Path:
    from clipforge.models.family import TINY_VARIANTS

    body = {
        "name": name, "seed": 0, "output_dir": str(folder / name),
        "data": {"train": str(shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
        "model": {"family": family, "name": TINY_VARIANTS[family]},
        "objective": {"name": objective},
        "train": {"max_steps": STEPS, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "save_every_steps": KILL_AT,
                  "keep_last": 50, "tensorboard": False, "progress": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def build(config):
    from clipforge.engine.loop import ObjectiveModule
    from clipforge.models import create_model
    from clipforge.objectives import build_objective, objective_model_kwargs

    torch.manual_seed(0)
    bundle = create_model(config.model, model_kwargs=objective_model_kwargs(config))
    objective = build_objective(config, bundle.model)
    objective.prepare_model(bundle.model)
    return bundle, objective, ObjectiveModule(bundle.model, objective)


def first_batch(config, bundle, objective):
    from clipforge.data.pipeline import build_loader, prepare_data

    loader = build_loader(prepare_data(config).train, config, batch_type=objective.batch_type,
                          preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer)
    return next(iter(loader))


@torch.no_grad()
def outputs(model, tokenizer) -> dict[str, torch.Tensor]:
    """Every output the evaluation protocol can ask of the model, on fixed inputs."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    result = {"image": model.encode_image(images)}
    if tokenizer is not None:
        result["text"] = model.encode_text(tokenizer(["a red circle", "two blue squares", "a dotted star"]))
    return result


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]
    folder = run_dir / "checkpoints" / latest
    state = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    if (folder / "objective.safetensors").is_file():
        state.update({f"objective.{k}": v for k, v in load_file(str(folder / "objective.safetensors")).items()})
    state.update(load_file(str(folder / "state.safetensors")))  # every phase's Adam moments
    return state


@pytest.mark.parametrize(("objective_name", "family"), combinations())
def test_one_step_gives_every_trainable_parameter_a_finite_gradient(tmp_path, shards, objective_name, family):
    from clipforge.engine.optim import build_phase_optimizers

    config = load_config(write_config(tmp_path, shards, "step", objective_name, family))
    bundle, objective, module = build(config)
    batch = first_batch(config, bundle, objective)
    phases = build_phase_optimizers(module, objective.phases(bundle.model), config.train)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for phase in phases for p in phase.parameters}  # every one in exactly one phase
    for phase in phases:
        module.zero_grad(set_to_none=True)
        output = module(batch, phase.name if len(phases) > 1 else None)
        assert torch.isfinite(output.total)
        output.total.backward()
        names = {id(p): n for n, p in module.named_parameters()}
        missing = [names[id(p)] for p in phase.parameters if p.grad is None]
        assert not missing, f"phase '{phase.name}': no gradient for {missing[:3]}"
        assert all(bool(torch.isfinite(p.grad).all()) for p in phase.parameters)


@pytest.mark.parametrize(("objective_name", "family"), combinations())
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, shards, objective_name, family):
    from clipforge.engine.loop import train

    killed = write_config(tmp_path, shards, "killed", objective_name, family)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, str(KILLER), str(killed), str(KILL_AT)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-2000:]  # SIGKILL, right after the step-3 checkpoint
    run_dir = tmp_path / "killed"
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == KILL_AT
    assert not (run_dir / "summary.json").exists()
    resumed = train(load_config(killed), resume="latest")
    assert resumed.steps == STEPS
    reference = train(load_config(write_config(tmp_path, shards, "straight", objective_name, family)))
    state = final_state(run_dir)
    assert_identical(state, final_state(reference.run_dir))
    from clipforge.objectives.registry import objective_class

    if len(objective_class(objective_name)().phases(None)) > 1:  # every phase's optimiser state was resumed
        assert any(k.startswith("optimizer@") for k in state)


@pytest.mark.parametrize(("objective_name", "family"), combinations())
def test_a_checkpoint_reloads_from_its_folder_alone(tmp_path, shards, objective_name, family):
    from clipforge.engine.checkpointing import TrainingState, save_checkpoint
    from clipforge.engine.optim import build_phase_optimizers
    from clipforge.models import load_model

    config = load_config(write_config(tmp_path, shards, "reload", objective_name, family))
    bundle, objective, module = build(config)
    batch = first_batch(config, bundle, objective)
    phases = build_phase_optimizers(module, objective.phases(bundle.model), config.train)
    for phase in phases:  # one real step, so the weights differ from any fresh initialisation
        module(batch, phase.name if len(phases) > 1 else None).total.backward()
        phase.optimizer.step()
        module.zero_grad(set_to_none=True)
    folder = save_checkpoint(tmp_path / "checkpoints", bundle, {p.name: p.optimizer for p in phases}, None,
                             TrainingState(step=1), [], {}, keep_last=1, is_best=False)
    assert json.loads((folder / "model.json").read_text())["family"] == family
    loaded, _, tokenizer = load_model(None, checkpoint=folder)  # no name, no config: model.json alone
    bundle.model.eval()
    assert_identical(outputs(loaded, tokenizer), outputs(bundle.model, bundle.tokenizer))


def test_frozen_pretrained_parts_are_referenced_not_copied(tmp_path):
    from clipforge.config import ModelConfig
    from clipforge.engine.checkpointing import TrainingState, save_checkpoint
    from clipforge.models import create_model, load_model

    bundle = create_model(ModelConfig(family="toy", name="toy-classifier-frozen-stem"))
    assert bundle.frozen == ("stem",) and not any(p.requires_grad for p in bundle.model.stem.parameters())
    with torch.no_grad():  # the trained part moves away from its initialisation
        for param in bundle.model.body.parameters():
            param.add_(0.5)
    optimizer = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad])
    folder = save_checkpoint(tmp_path, bundle, {"main": optimizer}, None, TrainingState(step=1), [], {},
                             keep_last=1, is_best=False)
    stored = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("stem.") for k in stored) and "body.4.weight" in stored
    loaded, _, _ = load_model(None, checkpoint=folder)
    bundle.model.eval()
    assert_identical(outputs(loaded, None), outputs(bundle.model, None))  # the stem rebuilt from its source


def test_an_unknown_family_is_one_config_line():
    from clipforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model family 'nope'.*did you mean") as caught:
        load_config(overrides=["model.family=nope"])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="not a toy variant"):
        from clipforge.config import ModelConfig
        from clipforge.models import resolve_model_name

        resolve_model_name(ModelConfig(family="toy", name="clipforge-vit-micro"))
