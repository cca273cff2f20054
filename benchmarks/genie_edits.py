"""GeNIe edit throughput: edits/s by noise ratio, GeNIe-Ada's cost against a fixed ratio (one call per grid ratio
against the grid batched into one call), and how the cost of an edit grows with the step count and image size.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/genie_edits.py       # ~3 min on 2 CPU cores
    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/genie_edits.py --quick   # ~30 s smoke run
    .venv/bin/python benchmarks/genie_edits.py --model path/to/diffusers-folder --device cuda --batch-size 64

The model: --model DIR (a Stable-Diffusion-layout diffusers folder), or by default a random-weight folder of the
embedded architecture built into a temporary folder: an AutoencoderKL (32 px images, 16 x 16 x 4 latents), a
1.7 M-parameter UNet2DConditionModel over the latents, a 4-layer CLIP text encoder (width 128, 48 tokens) and
Stable Diffusion's scheduler config. Timing does not depend on the weights (the same kernels run whatever their
values); only which ratio GeNIe-Ada selects does, so with random weights its choices mean nothing.

Every edit is `sampler.generate` (solver dpm, guidance 7.5 with classifier-free guidance, VAE posterior mode) on
a batch of SynthScenes images, one prompt and one seed per image, the images already converted to tensors:

- by ratio: one batch at each r; r = 1 is pure text-to-image (the source is not encoded);
- GeNIe-Ada: the same (source, target) pairs at fixed r = 0.8 (one `generate` per batch), and over the 5-ratio
  grid 0.5..0.9 (a) with one call per ratio (`augment_genie(grid_batching=False)`) and (b) grid-batched, each
  pair's whole grid in one call, batch_size // 5 pairs a call (`grid_batching=True`); both through
  `genie.adaptive_edits` and include the embedding pass that selects the ratio (`genie.choose_edits`, a
  random-weight clipforge-vit-micro on every edit). (a) and (b) share seeds, so their edits agree up to float
  rounding and must select the same ratio;
- growth: r = 0.8 at 10, 20, 40 steps, and at latent side 8, 16, 32 (16, 32, 64 px; the random model rebuilt
  with another sample_size; skipped with --model).

Measurement, the same for every side: all sides of a table built first, each called once as a warm-up, then
--repeats rounds of every side in turn (so a change in machine load hits all alike); the median wall time is
reported. Memory is read in the warm-up round (before it each side gets malloc_trim, so the memory earlier
calls freed goes back to the OS, and a VmHWM reset through /proc/self/clear_refs): "peak RSS" is VmHWM from /proc
(benchmarks/_measure.rss_mib) during the side's call, which includes every model loaded; "+MiB" is that peak over
the RSS when the call began, what the call itself needs. With --device cuda, torch.cuda.max_memory_allocated
during the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from _measure import rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the hub
RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9, 1.0)
GENIE_RATIO = 0.8
CLASSES = ["circle", "square"]  # the pairs' classes: each source is edited towards the other one
TEMPLATE = "a photo of a {}."

# The embedded architecture (shared with diffusion_space.py). The pixel-space variant is the same UNet at
# sample_size 32 over 3 channels, with no VAE.
EMBEDDED_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (32, 64), "layers_per_block": 1,
                "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32}
EMBEDDED_UNET = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64, 64),
                 "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 8}
EMBEDDED_TEXT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 512,
                 "max_position_embeddings": 48}
TEXT_TOKENS = 48
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def unet_config(latent_side: int = 16, channels: int = 4) -> dict:
    return {**EMBEDDED_UNET, "sample_size": latent_side, "in_channels": channels, "out_channels": channels}


def build_model_folder(folder: Path, latent_side: int = 16) -> Path:
    """A random-weight Stable-Diffusion-layout folder of the embedded architecture at `latent_side`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    from clipforge.models.hf.tokenizer import clip_tokenizer

    transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    # the embedded model's own tokenizer: open_clip's BPE as a transformers CLIPTokenizer (what the export writes)
    (folder.parent / f"{folder.name}-tokenizer-files").mkdir(parents=True)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-files", TEXT_TOKENS)
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel(**unet_config(latent_side)),
        # two VAE levels: the image side is twice the latent side
        "vae": AutoencoderKL(**{**EMBEDDED_VAE, "sample_size": 2 * latent_side}),
        "scheduler": PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **EMBEDDED_TEXT)),
        "tokenizer": tokenizer,
    }
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        index[name] = ["transformers" if name.startswith(("text", "token")) else "diffusers", type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


class PeakMemory:
    """Peak RSS and GPU memory of one call. Before it: glibc's malloc_trim hands the memory freed by earlier calls
    back to the OS (else a call reusing it would show no rise) and VmHWM is reset via /proc/self/clear_refs."""

    def __init__(self, device):
        import ctypes

        self.device = device
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.resettable = self._reset_rss()
        self.start = 0.0

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return True
        except OSError:
            return False

    def describe(self) -> str:
        if not self.resettable:
            return "VmHWM, not resettable here: the process's peak so far"
        return "VmHWM reset before each side's warm-up call" + ("" if self._trim else " (no malloc_trim)")

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self._reset_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = rss_mib("VmRSS")

    def read(self) -> tuple[float, float, float]:
        """(peak RSS MiB, peak RSS over the RSS at reset MiB, peak GPU MiB allocated or 0)."""
        import torch

        peak = rss_mib("VmHWM")
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        return peak, peak - self.start, gpu


class UNetCalls:
    """Counts UNet forward calls and the rows they carry (CFG doubles the rows) of every UNet it is attached to."""

    def __init__(self):
        self.calls = self.rows = 0

    def attach(self, unet) -> None:
        unet.register_forward_pre_hook(self._count)

    def _count(self, module, inputs) -> None:
        self.calls += 1
        self.rows += int(inputs[0].shape[0])


def measure(sides: dict, repeats: int, memory: PeakMemory, calls: UNetCalls | None = None) -> dict:
    """Every side once as a warm-up (its memory measured then, after a PeakMemory reset), then `repeats` timed
    rounds of all in turn: median wall s and process CPU s, peak memory, UNet calls and rows, the last result."""
    import torch

    calls = calls or UNetCalls()
    cuda = memory.device.type == "cuda"
    found = {key: {"wall": [], "cpu": []} for key in sides}
    for round_ in range(1 + repeats):
        for key, work in sides.items():
            record = found[key]
            if round_ == 0:
                memory.reset()  # outside the timed rounds: trimming makes the next call fault its pages again
            calls.calls = calls.rows = 0
            if cuda:
                torch.cuda.synchronize(memory.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            record["result"] = work()
            if cuda:
                torch.cuda.synchronize(memory.device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_ > 0 or repeats == 0:
                record["wall"].append(wall)
                record["cpu"].append(cpu)
            if round_ == 0:
                record["rss"], record["rise"], record["gpu"] = memory.read()
            record.update(calls=calls.calls, rows=calls.rows)
    for record in found.values():
        record["wall"], record["cpu"] = statistics.median(record["wall"]), statistics.median(record["cpu"])
    return found


def synth_images(count: int, size: int) -> list:
    from clipforge.data.synth.generator import SynthScenes

    scenes = SynthScenes(image_size=min(max(size, 16), 512), split="all")
    return [scenes.render(index) for index in range(count)]


def machine_line(threads: int, device) -> str:
    """Which machine, how loaded, how many threads; a warning when other processes compete for the cores."""
    import torch

    load = os.getloadavg()
    line = (f"machine: {platform.platform()}, {os.cpu_count()} cores (load average "
            f"{', '.join(f'{value:.1f}' for value in load)} at the start), torch {torch.__version__}, "
            f"{threads} thread(s)" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    if device.type == "cpu" and threads > 1 and load[0] > 0.5 * (os.cpu_count() or 1):
        line += ("\nwarning: other processes keep these cores busy; with several threads every parallel op waits "
                 "on a preempted thread (times can be many-fold longer): --threads 1 is steadier")
    return line


def print_table(columns: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


class Editor:
    """One model's batch of source images, prompts and the `generate` call at a given (steps, r)."""

    def __init__(self, components, batch_size: int, guidance: float):
        import torch

        from clipforge.augment.sampler import encode_prompts, to_model_input

        self.components, self.batch_size, self.guidance = components, batch_size, guidance
        size = components.image_size
        self.pixels = torch.stack([to_model_input(image, size) for image in synth_images(batch_size, size)])
        prompts = [TEMPLATE.format(CLASSES[(i + 1) % len(CLASSES)]) for i in range(batch_size)]
        self.prompt_embeds = encode_prompts(components, prompts)  # [B, L, D]
        self.negative_embeds = encode_prompts(components, [""])  # [1, L, D]

    def work(self, steps: int, ratio: float) -> Callable[[], object]:
        from clipforge.augment.sampler import generate

        return lambda: generate(self.components, images=self.pixels, prompt_embeds=self.prompt_embeds,
                                negative_embeds=self.negative_embeds, ratios=[ratio] * self.batch_size,
                                seeds=list(range(self.batch_size)), steps=steps, guidance=self.guidance)


def micro_embedder(device):
    """GeNIe-Ada's classifier: a random-weight clipforge-vit-micro's encode_image on PIL images (as
    adaptive.load_embedder wraps a checkpoint's)."""
    import torch

    import clipforge.models.clip_family  # noqa: F401  registers clipforge's architectures
    from clipforge.models.factory import load_model

    torch.manual_seed(0)
    model, preprocess, _ = load_model("clipforge-vit-micro", device=device)

    def embed(images):
        return model.encode_image(torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device))

    return embed


def ada_sides(components, args, device) -> tuple[dict, int]:
    """{side: work} for fixed r = 0.8 and GeNIe-Ada (a) per ratio and (b) grid-batched, on the same pairs."""
    from clipforge.augment import adaptive
    from clipforge.augment.genie import _generate, _Run, adaptive_edits, choose_edits
    from clipforge.augment.plan import GenieOptions, SourceImage, job_seed, plan_jobs
    from clipforge.augment.sampler import encode_prompts

    sources = [SourceImage(f"synth-{i:05d}", i % len(CLASSES), 0, i) for i in range(args.pairs)]
    jobs = plan_jobs(sources, list(range(len(CLASSES))), "genie")  # two classes: one job (pair) per source
    pictures = synth_images(args.pairs, components.image_size)
    images = {source.key: picture for source, picture in zip(sources, pictures)}
    options = GenieOptions(adaptive=True, steps=args.steps, guidance=args.guidance, scheduler="dpm").resolved()
    embedder = micro_embedder(device)
    run = _Run(components, None, CLASSES, options, args.batch_size,
               encode_prompts(components, [TEMPLATE.format(name) for name in CLASSES]),
               encode_prompts(components, [""]), embedder=embedder)
    # the real images' embeddings and the class prototypes: once per run, not timed (as _embed_real_images)
    real = adaptive.embed_images(embedder, pictures, args.batch_size)
    run.source_embeddings = {source.key: real[i] for i, source in enumerate(sources)}
    run.prototypes = adaptive.class_prototypes(real, [source.label for source in sources], list(range(len(CLASSES))))
    fixed_run = replace(run, options=replace(options, adaptive=False, ratio=GENIE_RATIO))

    def chunks(size: int):
        return [jobs[first:first + size] for first in range(0, len(jobs), size)]

    def fixed():
        edits = []
        for batch in chunks(args.batch_size):  # as genie._fixed_ratio_batches
            seeds = [job_seed(options.seed, job, CLASSES, GENIE_RATIO) for job in batch]
            edits += _generate(fixed_run, batch, [GENIE_RATIO] * len(batch), seeds, images)
        return edits

    def ada(grid_batching: bool):
        ada_run = replace(run, grid_batching=grid_batching)
        per_call = max(1, args.batch_size // len(options.grid)) if grid_batching else args.batch_size
        edits, choices = [], []
        for batch in chunks(per_call):  # as genie._adaptive_batches
            batch_edits = adaptive_edits(ada_run, batch, images)
            edits += batch_edits
            choices += choose_edits(ada_run, batch, batch_edits)
        return edits, choices

    sides = {f"fixed r = {GENIE_RATIO}": fixed, "GeNIe-Ada (a) one call per ratio": lambda: ada(False),
             "GeNIe-Ada (b) grid-batched": lambda: ada(True)}
    return sides, len(jobs)


def compare_ada(per_ratio, batched, grid) -> tuple[int, int, float]:
    """(pairs with the same selected ratio, pairs, max |pixel difference| over every grid edit, in grey levels)."""
    import numpy as np

    (edits_a, choices_a), (edits_b, choices_b) = per_ratio, batched
    same = sum(grid[a[0]] == grid[b[0]] for a, b in zip(choices_a, choices_b))
    difference = max(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
                     for pair_a, pair_b in zip(edits_a, edits_b) for a, b in zip(pair_a, pair_b))
    return same, len(choices_a), difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers folder (default: a random-weight embedded architecture)")
    parser.add_argument("--steps", type=int, default=20, help="denoising schedule length (ratio and Ada tables)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=16, help="edits per generate call")
    parser.add_argument("--pairs", type=int, help="(source, target) pairs of the GeNIe-Ada table (default: batch)")
    parser.add_argument("--growth-steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--latent-sides", type=int, nargs="+", default=[8, 16, 32],
                        help="latent sides of the size growth table (random model rebuilt per side)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run: 8 steps, batch 4, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.repeats = 8, 4, 1
        args.growth_steps, args.latent_sides = [4, 8], [8, 16]
    args.pairs = args.pairs or args.batch_size

    import torch

    from clipforge.augment.adaptive import DEFAULT_GRID
    from clipforge.augment.diffusion import load_diffusion
    from clipforge.augment.sampler import check_ratio, denoising_start
    from clipforge.errors import ClipforgeError

    try:
        for steps in {args.steps, *args.growth_steps}:
            for ratio in (*RATIOS, *DEFAULT_GRID):
                check_ratio(ratio, steps)
    except ClipforgeError as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(machine_line(args.threads, device))

    workdir = tempfile.TemporaryDirectory()
    if args.model:
        folders = {None: Path(args.model)}
        print(f"model: {args.model}")
    else:
        sides = sorted({16, *args.latent_sides})
        folders = {side: build_model_folder(Path(workdir.name) / f"embedded-{side}", side) for side in sides}
        print("model: random weights, the embedded architecture (timing does not depend on the weights)")
    components = {side: load_diffusion(folder, device=device, scheduler="dpm") for side, folder in folders.items()}
    main_side = None if args.model else 16
    memory, calls = PeakMemory(device), UNetCalls()
    for model in components.values():
        calls.attach(model.unet)
    print(f"solver dpm, guidance {args.guidance}, batch {args.batch_size}, device {args.device}; "
          f"median wall time of {args.repeats} round(s) after a warm-up, all sides of a table interleaved; "
          f"peak RSS: {memory.describe()}\n")

    # the ratio table and both growth tables share one measurement; the r = 0.8 rows are one side
    editors = {side: Editor(model, args.batch_size, args.guidance) for side, model in components.items()}
    keys = [(main_side, args.steps, ratio) for ratio in RATIOS]
    keys += [(main_side, steps, GENIE_RATIO) for steps in args.growth_steps]
    if not args.model:
        keys += [(side, args.steps, GENIE_RATIO) for side in args.latent_sides]
    keys = list(dict.fromkeys(keys))
    edits = measure({key: editors[key[0]].work(key[1], key[2]) for key in keys}, args.repeats, memory, calls)

    def memory_cells(record) -> list[str]:
        return [f"{record['rss']:.0f}", f"{record['rise']:.0f}"] + ([f"{record['gpu']:.0f}"] if cuda else [])

    memory_columns = ["peak RSS MiB", "+MiB"] + (["peak GPU MiB"] if cuda else [])
    batch = args.batch_size

    print(f"Edits by noise ratio r ({args.steps} steps, {batch} images a call):\n")
    pure = edits[(main_side, args.steps, 1.0)]["wall"]
    rows = []
    for ratio in RATIOS:
        record = edits[(main_side, args.steps, ratio)]
        rows.append([ratio, denoising_start(args.steps, ratio)[1], record["calls"], record["rows"],
                     f"{record['wall']:.2f}", f"{record['cpu']:.2f}", f"{batch / record['wall']:.1f}",
                     f"{1000 * record['wall'] / batch:.0f}", f"{record['wall'] / pure:.2f}", *memory_cells(record)])
    print_table(["r", "denoise steps", "UNet calls", "UNet rows", "wall s / call", "CPU s / call", "edits/s",
                 "ms / edit", "x r=1 time", *memory_columns], rows)

    print(f"\nGeNIe-Ada against fixed r = {GENIE_RATIO}, {args.pairs} (source, target) pairs, grid "
          f"{', '.join(map(str, DEFAULT_GRID))}, {args.steps} steps (Ada includes the embedding pass):\n")
    sides, pairs = ada_sides(components[main_side], args, device)
    ada = measure(sides, args.repeats, memory, calls)
    fixed = ada[f"fixed r = {GENIE_RATIO}"]["wall"]
    rows = [[side, record["calls"], record["rows"], f"{record['wall']:.2f}", f"{record['wall'] / pairs:.3f}",
             f"{record['wall'] / fixed:.2f}", *memory_cells(record)] for side, record in ada.items()]
    print_table(["side", "UNet calls", "UNet rows", "wall s", "s / pair", "x fixed r", *memory_columns], rows)
    same, total, difference = compare_ada(ada["GeNIe-Ada (a) one call per ratio"]["result"],
                                          ada["GeNIe-Ada (b) grid-batched"]["result"], DEFAULT_GRID)
    print(f"\n(a) and (b) select the same r for {same} of {total} pairs; max |pixel difference| over every grid "
          f"edit: {difference} grey level(s) of 255 (same seeds; batched kernels round differently)")

    print(f"\nGrowth at r = {GENIE_RATIO}, by step count ({batch} images a call):\n")
    first = edits[(main_side, args.growth_steps[0], GENIE_RATIO)]["wall"]
    rows = []
    for steps in args.growth_steps:
        record = edits[(main_side, steps, GENIE_RATIO)]
        rows.append([steps, denoising_start(steps, GENIE_RATIO)[1], f"{record['wall']:.2f}",
                     f"{1000 * record['wall'] / batch:.0f}", f"{record['wall'] / first:.2f}", *memory_cells(record)])
    print_table(["steps", "denoise steps", "wall s / call", "ms / edit", "x first", *memory_columns], rows)

    if args.model:
        print("\n(growth by image size needs the random model, rebuilt per size: skipped with --model)")
    else:
        print(f"\nGrowth at r = {GENIE_RATIO}, {args.steps} steps, by latent side (random model rebuilt per side):\n")
        first = edits[(args.latent_sides[0], args.steps, GENIE_RATIO)]["wall"]
        rows = []
        for side in args.latent_sides:
            record = edits[(side, args.steps, GENIE_RATIO)]
            rows.append([f"{side} x {side} x 4", components[side].image_size, f"{record['wall']:.2f}",
                         f"{1000 * record['wall'] / batch:.0f}", f"{record['wall'] / first:.2f}",
                         *memory_cells(record)])
        print_table(["latents", "image px", "wall s / call", "ms / edit", "x first", *memory_columns], rows)
    workdir.cleanup()
    if same != total:
        raise SystemExit(f"GeNIe-Ada: (a) and (b) selected different ratios for {total - same} pair(s)")


if __name__ == "__main__":
    main()
