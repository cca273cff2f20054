"""The `vq` family and objective: analytic codebook statistics, settings that do not fit, exact encode/decode
round trips, a trained tiny tokenizer against a trivial baseline, the discriminator phase's exact resume, and
the codebook under DDP (2 gloo ranks, a step skipped as non-finite on one of them)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from clipforge.config import ModelConfig, load_config
from clipforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "helpers" / "train_until_killed.py"
TINY_VARIANTS = ["vq-tiny", "vq-tiny-learned", "vq-tiny-fsq", "vq-tiny-simvq"]


def run_config(folder: Path, shards: Path, name: str, steps: int, model: str = "vq-tiny", objective: dict | None = None,
               data: dict | None = None, config_file: str | None = None, **train) -> Path:
    body = {
        "name": name, "seed": 0, "output_dir": str(folder / name),
        "data": {"train": str(shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32, **(data or {})},
        "model": {"family": "vq", "name": model},
        "objective": {"name": "vq", **(objective or {})},
        "train": {"max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "weight_decay": 0.0,
                  "keep_last": 50, "tensorboard": False, "progress": False, **train},
    }
    path = folder / (config_file or f"{name}.yaml")
    path.write_text(yaml.safe_dump(body))
    return path


# ---- codebook statistics: known answers ------------------------------------------------------------------------

def test_usage_and_perplexity_of_hand_made_histograms():
    from clipforge.objectives.vq import code_histogram, codebook_usage

    size = 16
    uniform = torch.full((size,), 5.0)
    usage, perplexity = codebook_usage(uniform)
    assert usage.item() == pytest.approx(100.0) and perplexity.item() == pytest.approx(size)
    one_code = torch.zeros(size)
    one_code[3] = 40
    usage, perplexity = codebook_usage(one_code)
    assert usage.item() == pytest.approx(100.0 / size) and perplexity.item() == pytest.approx(1.0)
    half = torch.tensor([2.0] * 8 + [0.0] * 8)
    usage, perplexity = codebook_usage(half)
    assert usage.item() == pytest.approx(50.0) and perplexity.item() == pytest.approx(8.0)
    skewed = torch.zeros(size)
    skewed[:2] = torch.tensor([3.0, 1.0])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_usage(skewed)[1].item() == pytest.approx(math.exp(entropy))
    codes = torch.tensor([[0, 0, 1], [3, 3, 3]])  # the histogram a batch of codes gives
    assert code_histogram(codes, 5).tolist() == [2, 1, 0, 3, 0]


def test_a_collapsed_codebook_is_flagged_in_the_metrics():
    from types import SimpleNamespace

    from clipforge.models import create_model
    from clipforge.objectives.vq import VqObjective

    model = create_model(ModelConfig(family="vq", name="vq-tiny")).model
    images = torch.zeros(2, 3, 32, 32)
    quantized = SimpleNamespace(codes=torch.zeros(2, 8, 8, dtype=torch.long), codebook_loss=torch.zeros(()),
                                commitment_loss=torch.zeros(()))
    output = SimpleNamespace(reconstruction=images, quantized=quantized)
    _, metrics = VqObjective().tokenizer_losses(model, images, output)  # one code of 64 in use: 1.6%
    assert metrics["codebook_collapse"].item() == 1.0 and metrics["codebook_usage"].item() == pytest.approx(100 / 64)
    quantized.codes = torch.arange(128).reshape(2, 8, 8) % 64  # every code
    _, metrics = VqObjective().tokenizer_losses(model, images, output)
    assert metrics["codebook_collapse"].item() == 0.0 and metrics["perplexity"].item() == pytest.approx(64)


# ---- settings that do not fit: one line, before any work --------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"image_size": 30}, "not divisible by the encoder's downsampling factor 4"),
    ({"quantizer": "fsq", "fsq_levels": [8, 4], "dead_code_threshold": 0.0}, "must equal the product of fsq_levels"),
    ({"quantizer": "lfq"}, "must be one of vq, ema, fsq, simvq"),
    ({"channels": 12}, "does not divide the channel count 12"),
    ({"codebook_size": 1}, "must be >= 2"),
    ({"codebok_size": 64}, "unknown vq setting 'codebok_size'"),
])
def test_settings_that_do_not_fit_stop_with_one_line(tmp_path, settings, message):
    from clipforge.models import resolve_model_name

    path = tmp_path / "mine.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_model_name(ModelConfig(family="vq", name=str(path)))
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="not a vq variant"):
        resolve_model_name(ModelConfig(family="vq", name="vq-huge"))


def test_a_settings_file_builds_the_model_it_describes(tmp_path):
    from clipforge.models import create_model

    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump({"image_size": 64, "channel_mult": [1, 2, 2, 2], "codebook_size": 128}))
    model = create_model(ModelConfig(family="vq", name=str(path))).model.eval()
    codes = model.encode_codes(torch.randn(2, 3, 64, 64))
    assert codes.shape == (2, 8, 8) and model.codebook_size == 128


# ---- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_decode_of_encode_is_the_models_own_reconstruction(variant):
    from clipforge.models import create_model
    from clipforge.models.family import TINY_VARIANTS as REGISTERED

    assert REGISTERED["vq"] == "vq-tiny"
    torch.manual_seed(0)
    model = create_model(ModelConfig(family="vq", name=variant)).model.eval()
    assert model.capabilities == frozenset({"codes", "encode_image"})
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = model.encode_codes(images)
        assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
        assert torch.equal(model.decode_codes(codes), model(images).reconstruction)
        assert model.encode_image(images).shape == (3, model.embed_dim)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards):
    from clipforge.engine.loop import train

    folder = tmp_path_factory.mktemp("trained")
    result = train(load_config(run_config(folder, tiny_shards, "tiny", steps=60, data={"batch_size": 16}, log_every=10,
                                  schedule="constant")))
    return result


def test_a_trained_tiny_tokenizer_beats_the_mean_image(trained_run, tiny_shards):
    """~60 steps on 64 SynthScenes images: the reconstruction is better than predicting the mean image, and
    decode(encode(x)) is exactly the model's reconstruction after reloading from the run folder."""
    from clipforge.data.batches import LabelledImageBatch
    from clipforge.data.pipeline import build_loader, prepare_data
    from clipforge.models import load_model

    model, preprocess, tokenizer = load_model(None, checkpoint=trained_run.run_dir)
    assert tokenizer is None  # an image-only tokenizer
    config = load_config(trained_run.run_dir / "config.yaml")
    loader = build_loader(prepare_data(config).train, config, batch_type=LabelledImageBatch, preprocess=preprocess,
                          tokenizer=None)
    images = torch.cat([batch.images for batch in loader])  # [64, 3, 32, 32]
    with torch.no_grad():
        reconstruction = model(images).reconstruction
        assert torch.equal(model.decode_codes(model.encode_codes(images)), reconstruction)
    model_error = (reconstruction - images).pow(2).mean().item()
    mean_error = (images.mean(dim=0, keepdim=True) - images).pow(2).mean().item()
    assert model_error < 0.6 * mean_error, (model_error, mean_error)
    records = [json.loads(line) for line in (trained_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "codebook_usage" in r]
    assert logged and {"perplexity", "psnr", "loss/commitment", "loss/reconstruction"} <= set(logged[-1])


def test_the_discriminator_phase_resumes_bit_identical(tmp_path, tiny_shards, one_thread):
    """SIGKILL after step 3 of 6 with the discriminator active from step 1: both phases' weights, Adam moments
    and the objective's state equal those of an uninterrupted run."""
    from clipforge.engine.loop import train

    discriminator = {"vq": {"disc_weight": 0.5, "disc_start": 1, "disc_width": 8, "disc_layers": 2}}
    killed = run_config(tmp_path, tiny_shards, "killed", 6, objective=discriminator, save_every_steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, str(KILLER), str(killed), "3"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-2000:]
    train(load_config(killed), resume="latest")  # one thread (the one_thread fixture), as the killed child
    reference = train(load_config(run_config(tmp_path, tiny_shards, "straight", 6, objective=discriminator,
                                             save_every_steps=3)))

    def final(run_dir: Path) -> dict:
        folder = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]
        state = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
        state.update({f"objective.{k}": v for k, v in load_file(str(folder / "objective.safetensors")).items()})
        state.update(load_file(str(folder / "state.safetensors")))
        return state

    resumed, straight = final(tmp_path / "killed"), final(reference.run_dir)
    assert resumed.keys() == straight.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], straight[k])] == []
    assert any(k.startswith("optimizer@discriminator") for k in resumed)
    records = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "loss/discriminator/hinge" in records[-1] and "loss/adversarial" in records[-1]
    assert "loss/adversarial" not in records[0]  # before the discriminator has trained once


# ---- the codebook across 2 gloo ranks, with a step skipped as non-finite ---------------------------------------

POISONED_STEP = 2  # rank 1's images are NaN at this optimiser step: the loop skips it on every rank
SNAPSHOTS: list[dict[str, torch.Tensor]] = []  # per main-phase forward, the codebook state it started from
MODELS: list = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def codebook_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("quantizer.")}


def _poisoned_objective():
    from clipforge.objectives.vq import VqObjective

    class PoisonedVq(VqObjective):
        def forward(self, model, batch, phase="main"):
            SNAPSHOTS.append(codebook_state(model))
            MODELS[:] = [model]
            if len(SNAPSHOTS) - 1 == POISONED_STEP and torch.distributed.get_rank() == 1:
                batch.images = torch.full_like(batch.images, float("nan"))
            return super().forward(model, batch, phase)

    return PoisonedVq


def ddp_worker(rank: int, ports: list[int], shards: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from clipforge.engine.loop import train
    from clipforge.registry import OBJECTIVES

    poisoned = _poisoned_objective()
    OBJECTIVES.register("vq_poisoned", poisoned)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    results = {}
    for variant, port in zip(("vq-tiny", "vq-tiny-learned"), ports):
        os.environ["MASTER_PORT"] = str(port)
        SNAPSHOTS.clear()
        folder = Path(out_dir)
        config = load_config(run_config(folder, Path(shards), variant, 6, model=variant,
                                        objective={"name": "vq_poisoned"}, config_file=f"{variant}-r{rank}.yaml",
                                        nan_policy="skip", save_every_steps=100))
        summary = train(config).summary
        final = codebook_state(MODELS[0])
        for k, v in final.items():
            results[f"{variant}/final/{k}"] = v
        for step, snapshot in enumerate(SNAPSHOTS):
            for k, v in snapshot.items():
                results[f"{variant}/start_of_forward_{step}/{k}"] = v
        results[f"{variant}/skipped_steps"] = torch.tensor(summary["skipped_steps"])
    save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, tiny_shards) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("ddp_vq")
    mp.spawn(ddp_worker, args=([free_port(), free_port()], str(tiny_shards), str(out_dir)), nprocs=2, join=True)
    return [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(2)]


@pytest.mark.parametrize("variant", ["vq-tiny", "vq-tiny-learned"])
def test_the_codebook_stays_finite_and_identical_across_ranks_through_a_skipped_step(ddp_results, variant):
    rank0, rank1 = ddp_results
    assert int(rank0[f"{variant}/skipped_steps"]) == 1 and int(rank1[f"{variant}/skipped_steps"]) == 1
    final = [k for k in rank0 if k.startswith(f"{variant}/final/")]
    assert any(k.endswith("_codebook.embed") for k in final) and any(k.endswith("cluster_size") for k in final)
    for key in final:
        assert bool(torch.isfinite(rank0[key].float()).all()), key
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"

    def snapshot(step: int) -> dict:
        prefix = f"{variant}/start_of_forward_{step}/"
        return {k[len(prefix):]: v for k, v in rank0.items() if k.startswith(prefix)}

    # forward POISONED_STEP (NaN on rank 1) left the codebook as it found it, on both ranks...
    before, after = snapshot(POISONED_STEP), snapshot(POISONED_STEP + 1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while an ordinary step moves it
    assert not all(torch.equal(snapshot(0)[k], snapshot(1)[k]) for k in before)


def test_the_reconstruction_task_measures_psnr_and_usage(trained_run):
    from torchvision.transforms.functional import to_pil_image

    from clipforge.eval.capabilities import model_capabilities
    from clipforge.eval.codes import reconstruction_metrics
    from clipforge.eval.tasks import get_task
    from clipforge.models import load_model

    model, preprocess, _ = load_model(None, checkpoint=trained_run.run_dir)
    pictures = [to_pil_image(image) for image in torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    metrics = reconstruction_metrics(model, pictures, preprocess, batch_size=2)
    images = torch.stack([preprocess(p) for p in pictures])
    with torch.no_grad():
        codes = model.encode_codes(images)
        error = ((model.decode_codes(codes).clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)
    assert metrics["psnr"] == pytest.approx(float((10 * torch.log10(1 / error)).mean()), rel=1e-5)
    assert metrics["codebook_usage"] == pytest.approx(100 * len(codes.unique()) / model.codebook_size)
    assert metrics["num_images"] == 5 and 1 <= metrics["perplexity"] <= model.codebook_size
    task = get_task("reconstruction")
    assert task.missing(None, None, model_capabilities(model)) is None  # needs no dataset field, only codes
    assert "needs codes" in task.missing(None, None, frozenset({"encode_image", "encode_text"}))
