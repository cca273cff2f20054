"""GeNIe / GeNIe-Ada (`clipforge augment genie`): the sampler against diffusers' own pipelines, per-sample
determinism, SIGKILL + resume, GeNIe-Ada's choice, and one-line errors that leave nothing behind.

Every diffusion model here is built from configs by the test and saved to tmp_path (a tiny UNet, a tiny VAE, a
tiny CLIP text encoder with a tokenizer whose vocab.json / merges.txt the test writes): nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.augment.adaptive import projection_scores, select_ratio
from clipforge.augment.diffusion import load_diffusion
from clipforge.augment.genie import augment_genie
from clipforge.augment.plan import GenieOptions
from clipforge.augment.sampler import denoising_start, encode_images, encode_prompts, generate, to_model_input
from clipforge.cli import main as cli_main
from clipforge.data.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
FAST = {"steps": 4, "shard_size": 4, "guidance": 3.0}  # 6 images x 2 other classes = 12 edits in 3 shards


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same here and in the subprocess: bit-identical shards
    yield
    torch.set_num_threads(before)


def write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE with no merges: every byte alone and as a word end, plus the two specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))


def build_tiny_diffusers(folder: Path, pixel_space: bool = False) -> Path:
    """A Stable-Diffusion-layout folder: 16 px images over 8 px latents (VAE), or 8 px pixel-space images."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    tokenizer = CLIPTokenizer.from_pretrained(folder.parent / f"{folder.name}-tokenizer-files")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    channels = 3 if pixel_space else 4
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    # Stable Diffusion 1.5's scheduler config (the solver is rebuilt from it by name)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    parts = {"unet": unet, "scheduler": scheduler, "text_encoder": text_encoder, "tokenizer": tokenizer}
    if not pixel_space:
        parts["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), norm_num_groups=4, sample_size=16,
            layers_per_block=1)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        library = "transformers" if name.startswith(("text", "token")) else "diffusers"
        index[name] = [library, type(part).__name__]
    index.update({"safety_checker": [None, None], "feature_extractor": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return build_tiny_diffusers(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def pixel_model_folder(tmp_path_factory) -> Path:
    return build_tiny_diffusers(tmp_path_factory.mktemp("models") / "tiny-pixel", pixel_space=True)


def random_image(seed: int, size=(16, 16)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """cat/dog/fox with 2 images each (one 20 x 16, cropped by the tool) and one corrupt file."""
    root = tmp_path_factory.mktemp("source")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        random_image(10 * c).save(root / name / "a.png")
        random_image(10 * c + 1, size=(20, 16)).save(root / name / "b.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard the manifest lists."""
    body = json.loads((folder / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in body["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} | \
        {"manifest.json": (folder / "manifest.json").read_bytes()}


# ----------------------------------------------------------------------------------------------------------
# The sampler against diffusers


def test_ratio_to_steps_is_diffusers_strength_mapping(model_folder):
    from diffusers import StableDiffusionImg2ImgPipeline

    components = load_diffusion(model_folder)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_folder, scheduler=components.scheduler,
                                                          safety_checker=None, requires_safety_checker=False)
    for steps in (4, 10, 50):
        for ratio in (0.05, 0.3, 0.4, 0.5, 0.58, 0.7, 0.8, 0.999, 1.0):
            pipe.scheduler.set_timesteps(steps)
            reference, reference_steps = pipe.get_timesteps(steps, ratio, "cpu")
            start, count = denoising_start(steps, ratio, pipe.scheduler.order)
            assert count == reference_steps
            assert torch.equal(pipe.scheduler.timesteps[start:], reference)
    # GeNIe's table (50 steps): r -> denoising steps
    assert [denoising_start(50, r)[1] for r in (0.3, 0.4, 0.5, 0.8)] == [15, 20, 25, 40]


@pytest.mark.parametrize("scheduler,ratio", [("dpm", 0.3), ("dpm", 0.8), ("euler", 0.8), ("ddim", 0.5),
                                             ("unipc", 0.5)])
def test_sampler_matches_diffusers_img2img(model_folder, scheduler, ratio):
    """posterior="sample" draws the VAE sample then the noise from each sample's generator, as the pipeline does
    with a list of generators; posterior="mode" (GeNIe) is compared by handing the pipeline our latents."""
    from diffusers import StableDiffusionImg2ImgPipeline

    components = load_diffusion(model_folder, scheduler=scheduler)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_folder, scheduler=components.scheduler,
                                                          safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [random_image(1), random_image(2)]
    prompts = ["a photo of a cat.", "a photo of a dog."]
    pixels = torch.stack([to_model_input(image, 16) for image in images])
    embeds, negative = encode_prompts(components, prompts), encode_prompts(components, [""])
    common = {"prompt": prompts, "strength": ratio, "num_inference_steps": 10, "guidance_scale": 7.5,
              "output_type": "pt"}

    reference = pipe(image=images, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **common).images
    ours = generate(components, images=pixels, prompt_embeds=embeds, negative_embeds=negative, ratios=[ratio] * 2,
                    seeds=[5, 6], steps=10, guidance=7.5, posterior="sample")
    assert (ours - reference).abs().max() < 1e-5

    latents = encode_images(components, pixels)  # the posterior mode, scaled: 4 channels, so taken as latents
    reference = pipe(image=latents, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **common).images
    ours = generate(components, images=pixels, prompt_embeds=embeds, negative_embeds=negative, ratios=[ratio] * 2,
                    seeds=[5, 6], steps=10, guidance=7.5, posterior="mode")
    assert (ours - reference).abs().max() < 1e-5


def test_ratio_one_is_pure_noise_txt2img(model_folder):
    """r = 1 equals diffusers' text-to-image pipeline from the same generator, whatever the source image; diffusers'
    img2img at strength 1 does not (it still mixes the image in at the last training timestep)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    components = load_diffusion(model_folder)
    kwargs = {"scheduler": components.scheduler, "safety_checker": None, "requires_safety_checker": False}
    txt2img = StableDiffusionPipeline.from_pretrained(model_folder, **kwargs)
    txt2img.set_progress_bar_config(disable=True)
    prompt = "a photo of a fox."
    reference = txt2img(prompt=prompt, num_inference_steps=6, guidance_scale=7.5, output_type="pt",
                        generator=torch.Generator().manual_seed(9)).images
    embeds, negative = encode_prompts(components, [prompt]), encode_prompts(components, [""])
    for seed_image in (1, 2):
        pixels = to_model_input(random_image(seed_image), 16)[None]
        ours = generate(components, images=pixels, prompt_embeds=embeds, negative_embeds=negative, ratios=[1.0],
                        seeds=[9], steps=6, guidance=7.5)
        assert (ours - reference).abs().max() < 1e-5
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model_folder, **kwargs)
    img2img.set_progress_bar_config(disable=True)
    strength_one = img2img(prompt=prompt, image=random_image(1), strength=1.0, num_inference_steps=6,
                           guidance_scale=7.5, output_type="pt", generator=torch.Generator().manual_seed(9)).images
    assert (strength_one - reference).abs().max() > 1e-3


def test_mixed_batch_equals_samples_alone(pixel_model_folder):
    """A batch mixing ratios (and pure noise) gives each sample what it gets alone; pixel space (no VAE)."""
    components = load_diffusion(pixel_model_folder)
    assert components.vae is None and components.image_size == 8
    pixels = torch.stack([to_model_input(random_image(s, (8, 8)), 8) for s in range(3)])
    embeds = encode_prompts(components, ["a photo of a cat.", "a photo of a dog.", "a photo of a fox."])
    negative = encode_prompts(components, [""])
    ratios, seeds = [0.3, 1.0, 0.7], [11, 12, 13]
    together = generate(components, images=pixels, prompt_embeds=embeds, negative_embeds=negative, ratios=ratios,
                        seeds=seeds, steps=10, guidance=5.0)
    for i in range(3):
        alone = generate(components, images=pixels[i:i + 1], prompt_embeds=embeds[i:i + 1], negative_embeds=negative,
                         ratios=ratios[i:i + 1], seeds=seeds[i:i + 1], steps=10, guidance=5.0)
        assert (together[i] - alone[0]).abs().max() < 1e-5
    assert (together[0] - together[2]).abs().max() > 1e-3  # the ratios matter


# ----------------------------------------------------------------------------------------------------------
# The tool: labels, determinism, resume


def test_outputs_per_sample_whatever_batch_size_and_ranks(model_folder, image_folder, tmp_path):
    options = GenieOptions(**FAST)
    one = augment_genie(image_folder, model_folder, tmp_path / "b1", options=options, batch_size=1)
    five = augment_genie(image_folder, model_folder, tmp_path / "b5", options=options, batch_size=5)
    assert one.complete and one.num_samples == five.num_samples == 12  # 6 good images x 2 other classes
    assert one.skipped == {"corrupt_image": 1}
    a, b = read_shards(tmp_path / "b1"), read_shards(tmp_path / "b5")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["json"] == b[key]["json"] and a[key]["cls"] == b[key]["cls"]
        pixels_a = np.asarray(Image.open(io.BytesIO(a[key]["png"])), dtype=int)
        pixels_b = np.asarray(Image.open(io.BytesIO(b[key]["png"])), dtype=int)
        assert np.abs(pixels_a - pixels_b).max() <= 1  # batched kernels round the last bits differently
    # two ranks, one after the other, into one folder: the same bytes as one rank with the same batch size
    first = augment_genie(image_folder, model_folder, tmp_path / "w2", options=options, batch_size=5, rank=1,
                          world_size=2)
    assert not first.complete and first.generated == 4  # rank 1 of 2 owns unit 1 of units 0, 1, 2
    second = augment_genie(image_folder, model_folder, tmp_path / "w2", options=options, batch_size=5, rank=0,
                           world_size=2)
    assert second.complete and second.generated == 8
    assert shard_bytes(tmp_path / "w2") == shard_bytes(tmp_path / "b5")

    # the output reads as a labelled shard set: labels are the targets, key.json says where each came from
    data = open_source(str(tmp_path / "b5"))
    assert data.classnames == CLASSES
    records = read_shards(tmp_path / "b5")
    meta = json.loads(records["img-000000000-a_to1"]["json"])
    assert meta["label"] == 1 and meta["classname"] == "dog" and meta["source_class"] == "cat"
    assert meta["target_class"] == "dog" and meta["ratio"] == 0.8 and meta["steps"] == 4
    assert {"seed", "scheduler", "guidance", "model", "source_key"} <= meta.keys()
    assert all(json.loads(r["json"])["label"] != json.loads(r["json"])["source_class"] for r in records.values())


def test_sigkill_then_resume_equals_uninterrupted(model_folder, image_folder, tmp_path):
    options = GenieOptions(**FAST)
    augment_genie(image_folder, model_folder, tmp_path / "whole", options=options, batch_size=2)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/genie_until_killed.py"), str(image_folder), str(model_folder),
         str(killed), "6", json.dumps(asdict(options)), "2"], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert (killed / "genie-000000.tar").is_file() and not (killed / "genie-000001.tar").exists()
    assert not (killed / "manifest.json").exists()
    resumed = augment_genie(image_folder, model_folder, killed, options=options, batch_size=2)
    assert resumed.complete and resumed.generated == 8  # units 1 and 2; unit 0 kept
    assert shard_bytes(killed) == shard_bytes(tmp_path / "whole")
    again = augment_genie(image_folder, model_folder, killed, options=options, batch_size=2)  # idempotent
    assert again.generated == 0 and shard_bytes(killed) == shard_bytes(tmp_path / "whole")


# ----------------------------------------------------------------------------------------------------------
# GeNIe-Ada


def test_ada_picks_the_ratio_after_the_largest_jump():
    """Hand-made embeddings: the source at e0, the prototype at e1; edits slide from one to the other with the
    flip between r = 0.6 and r = 0.7, so 0.7 is chosen (and scores are the known positions on the line)."""
    grid = [0.5, 0.6, 0.7, 0.8, 0.9]
    source, prototype = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    positions = torch.tensor([0.05, 0.12, 0.71, 0.80, 0.93])
    off_line = torch.tensor([0.0, 0.0, 0.3])  # a component orthogonal to the line changes nothing
    edits = torch.stack([source + p * (prototype - source) + off_line for p in positions])
    scores = projection_scores(source, prototype, edits)
    assert torch.allclose(scores, positions, atol=1e-6)
    assert grid[select_ratio(scores)] == 0.7
    assert grid[select_ratio(torch.tensor([0.0, 0.6, 0.7, 0.75, 0.8]))] == 0.6  # flip at the first step
    assert grid[select_ratio(torch.tensor([0.9, 0.85, 0.1, 0.05, 0.0]))] == 0.7  # |jump|: away from the target too


def pixel_embedder(images: list[Image.Image]) -> torch.Tensor:
    """A stand-in backbone: 4 x 4 colour thumbnails as [N, 48] vectors."""
    return torch.stack([torch.from_numpy(np.asarray(i.resize((4, 4), Image.BILINEAR), dtype=np.float32)).flatten()
                        for i in images])


def test_ada_grid_batched_equals_one_by_one(model_folder, image_folder, tmp_path):
    options = GenieOptions(adaptive=True, grid=(0.5, 0.7, 0.9), **FAST)
    runs = {}
    for batched in (True, False):
        out = tmp_path / f"batched-{batched}"
        result = augment_genie(image_folder, model_folder, out, options=options, embedder=pixel_embedder,
                               embedder_id="thumbnails", batch_size=6, grid_batching=batched)
        assert result.complete and result.num_samples == 12
        runs[batched] = {k: json.loads(v["json"]) for k, v in read_shards(out).items()}
    assert runs[True].keys() == runs[False].keys()
    chosen = []
    for key, meta in runs[True].items():
        other = runs[False][key]["adaptive"]
        assert meta["adaptive"]["selected"] == other["selected"]
        assert np.allclose(meta["adaptive"]["scores"], other["scores"], atol=1e-4)
        chosen.append(meta["adaptive"]["selected"])
        assert meta["ratio"] == meta["adaptive"]["selected"]
    assert len(chosen) == 12

    # the kept image is the plain GeNIe edit at the chosen ratio with the (source, target) pair's shared seed
    components = load_diffusion(model_folder)
    key, meta = next(iter(runs[True].items()))
    source = open_source(str(image_folder))
    path = next(source.table.image_paths[i] for i in range(len(source.table))
                if source.table.record(i)["__key__"] == meta["source_key"])
    pixels = to_model_input(Image.open(path).convert("RGB"), 16)[None]
    prompt = encode_prompts(components, [f"a photo of a {meta['target_class']}."])
    alone = generate(components, images=pixels, prompt_embeds=prompt, negative_embeds=encode_prompts(components, [""]),
                     ratios=[meta["ratio"]], seeds=[meta["seed"]], steps=4, guidance=3.0)
    stored = read_shards(tmp_path / "batched-True")[key]["png"]
    stored_pixels = np.asarray(Image.open(io.BytesIO(stored)), dtype=int)
    assert np.abs(stored_pixels - np.rint(alone[0].permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_ada_cli_with_a_clipforge_checkpoint(model_folder, image_folder, tmp_path):
    """--embedder takes a clipforge checkpoint folder (load_model -> encode_image); the settings record its weights'
    sha256 and every output records the grid's scores, whose largest jump gives the ratio kept."""
    import hashlib

    from clipforge.config import ModelConfig
    from clipforge.models.checkpoint import save_model_weights
    from clipforge.models.factory import create_model, write_model_json

    bundle = create_model(ModelConfig(family="clip", name="clipforge-vit-micro"))
    checkpoint = tmp_path / "backbone"
    checkpoint.mkdir()
    save_model_weights(bundle.model, checkpoint / "model.safetensors", exclude=bundle.frozen)
    write_model_json(bundle, checkpoint)
    out = tmp_path / "ada"
    assert cli_main(["augment", "genie", "--source", str(image_folder), "--model", str(model_folder), "--out",
                     str(out), "--adaptive", "--grid", "0.5,0.75", "--embedder", str(checkpoint), "--steps", "4",
                     "--targets", "cat", "--no-progress"]) == 0
    settings = json.loads((out / "augment.json").read_text())["settings"]
    assert settings["embedder"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    records = read_shards(out)
    assert len(records) == 4  # the dog and fox images, towards cat only
    for record in records.values():
        meta = json.loads(record["json"])
        assert meta["classname"] == "cat" and meta["source_class"] != "cat"
        ada = meta["adaptive"]
        assert ada["grid"][select_ratio(torch.tensor(ada["scores"]))] == ada["selected"] == meta["ratio"]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def bad_inputs(model: Path, source: Path, tmp: Path) -> dict[str, list[str]]:
    base = ["augment", "genie", "--source", str(source), "--model", str(model), "--steps", "4", "--no-progress"]
    (tmp / "not-a-pipeline").mkdir(exist_ok=True)
    broken = tmp / "broken-weights"
    if model.is_dir() and not broken.exists():
        shutil.copytree(model, broken)
        with open(broken / "unet" / "diffusion_pytorch_model.safetensors", "r+b") as weights:
            weights.truncate(300)
    return {
        "model folder missing": [*base[:5], str(tmp / "nowhere"), *base[6:]],
        "not a diffusers pipeline": [*base[:5], str(tmp / "not-a-pipeline"), *base[6:]],
        "corrupt model weights": [*base[:5], str(broken), *base[6:]],
        "unknown target class": [*base, "--targets", "cat", "wolf"],
        "repeated class": [*base, "--classes", "cat", "dog", "fox", "dog"],
        "source class not listed": [*base, "--classes", "cat", "dog"],
        "template without {}": [*base, "--template", "a photo"],
        "ratio zero": [*base, "--ratio", "0"],
        "ratio above one": [*base, "--ratio", "1.5"],
        "adaptive without embedder": [*base, "--adaptive"],
        "img2img without ratio": [*base, "--mode", "img2img"],
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("m"), Path("s"), Path("/tmp")).keys()))
def test_bad_input_one_line_exit_2_no_output(case, model_folder, image_folder, tmp_path, capsys):
    argv = bad_inputs(model_folder, image_folder, tmp_path)[case] + ["--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_out_folder_of_another_run_is_refused(model_folder, image_folder, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("# label order\ncat\ndog\nfox\n")
    argv = ["augment", "genie", "--source", str(image_folder), "--model", str(model_folder), "--out",
            str(tmp_path / "out"), "--steps", "4", "--shard-size", "4", "--classes", str(tmp_path / "classes.txt"),
            "--no-progress"]
    assert cli_main([*argv, "--ratio", "0.8"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli_main([*argv, "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another run" in err and "ratio" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
