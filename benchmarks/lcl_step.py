"""Training step cost of LCL against CLIP at equal images, and how LCL grows with document length and images.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/lcl_step.py        # lcl-synth, CPU, ~3 min CPU
    .venv/bin/python benchmarks/lcl_step.py --steps 2 --contexts 64 128 --images 1 2    # a quick look
    .venv/bin/python benchmarks/lcl_step.py --device cuda --batch-size 64 --contexts 128 256 512 1024

One training step = forward + backward + AdamW step (fused, as the training loop's) on one fixed synthetic
batch (data loading excluded, the same batch every step). Configurations:

- lcl  C=ctx, k=img/doc   the `lcl` family (lcl-synth with context_length C) and the `lcl` objective on B
                          documents, each exactly C tokens long: <sot>, k+1 text segments of random BPE ids
                          with k image blocks (<soi>, 16 image tokens, <eoi>) between them, <eot>. A cell
                          whose k blocks do not fit in C tokens is left out (said below the table).
- clip N images           open_clip `clipforge-vit-lcl-synth` (the same 32 px ViT, a 3-layer text tower of the
                          same width, 32-token captions) with ClipObjective on an ImageTextBatch of the same
                          N = B*k SynthScenes images, captioned: what LCL is compared with at equal images.

A document's length is fixed at C, so each image block takes the place of 18 text tokens: "targets" (the
batch's next-token targets, text only) falls as k grows. The LM head scores every target over the 49,412-id
vocabulary (a [targets, 49412] logit matrix, its log-softmax and its backward), which is most of LCL's step
at these sizes, so LCL's cost follows the text tokens more than the images.

Step times: every configuration (its own model, optimiser and batch) runs in one process, one step of each in
turn, so a change in machine load affects all alike. Memory: each configuration again alone in its own
process, so its peak RSS (and peak GPU memory) is its own; "step +MiB" is the peak RSS during the steps above
the RSS after the model and batch were built. On CPU the ratios use process CPU time with one thread, which a
busy shared machine disturbs far less than wall time.
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
from pathlib import Path

from _measure import rss_mib, timed_training_step

BLOCK = 16 + 2  # an image block of lcl-synth: <soi>, (32 / 8)^2 image tokens, <eoi>


def fits(context: int, images: int) -> bool:
    """k image blocks, <sot>, <eot> and at least one text token per segment fit in `context` tokens."""
    return 2 + images * BLOCK + images + 1 <= context


def synth_pictures(count: int):
    """(images, captions) of the first `count` SynthScenes train scenes at 32 px."""
    from clipforge.data.synth.generator import SynthScenes

    scenes = SynthScenes(image_size=32, seed=0)
    images, captions = [], []
    for index in range(count):
        scene = scenes.scene(index)
        drawing = scenes.draw(scene)
        images.append(drawing.image)
        captions.append(scenes.annotation(scene, drawing)["caption"])
    return images, captions


def lcl_documents(batch_size: int, context: int, images_per_document: int):
    """B documents of exactly `context` tokens, k images each: text, image, text, ..., image, text."""
    import numpy as np

    from clipforge.data.samples import Document

    pictures, _ = synth_pictures(batch_size * images_per_document)
    rng = np.random.default_rng(0)
    text_tokens = context - 2 - images_per_document * BLOCK  # <sot> and <eot> besides the blocks
    segments = images_per_document + 1
    lengths = [text_tokens // segments + (s < text_tokens % segments) for s in range(segments)]
    documents = []
    for row in range(batch_size):
        items = []
        for segment, length in enumerate(lengths):
            items.append({"text": "", "tokens": rng.integers(0, 49406, length).tolist()})  # random BPE ids
            if segment < images_per_document:
                items.append({"image": segment})
        own = pictures[row * images_per_document:(row + 1) * images_per_document]
        documents.append(Document(key=f"doc{row}", items=items, images=own))
    return documents


class Runner:
    """One configuration, ("lcl", context, k) or ("clip", images, 0): its own model, objective, optimiser
    and batch."""

    def __init__(self, config: tuple[str, int, int], args, settings_dir: str):
        import torch

        from clipforge.config import ModelConfig
        from clipforge.data.batches import IGNORE_INDEX
        from clipforge.data.transforms import BatchBuilder
        from clipforge.models.factory import create_model

        kind, size, images_per_document = config
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        if kind == "lcl":
            from clipforge.models.lcl import VARIANTS
            from clipforge.objectives.lcl import LclObjective

            path = Path(settings_dir) / f"lcl-synth-ctx{size}.json"
            path.write_text(json.dumps({**VARIANTS["lcl-synth"], "context_length": size}))
            bundle = create_model(ModelConfig(family="lcl", name=str(path)), self.device)
            self.objective = LclObjective(tokenizer=bundle.tokenizer)  # config defaults: L_gen + 0.1 L_con
            builder = BatchBuilder(self.objective.batch_type, bundle.preprocess_val, bundle.tokenizer,
                                   randomize=False)
            batch = builder(lcl_documents(args.batch_size, size, images_per_document))
            wanted, images = (args.batch_size, size), args.batch_size * images_per_document
            if tuple(batch.tokens.shape) != wanted or len(batch.images) != images:
                raise SystemExit(f"lcl batch is {tuple(batch.tokens.shape)} with {len(batch.images)} images, "
                                 f"not {wanted} with {images}")
        else:
            from clipforge.data.batches import ImageTextBatch
            from clipforge.data.samples import Sample
            from clipforge.objectives.clip import ClipObjective

            bundle = create_model(ModelConfig(family="clip", name=args.clip_model), self.device)
            self.objective = ClipObjective()
            pictures, captions = synth_pictures(size)
            samples = [Sample(key=str(i), image=image, caption=caption)
                       for i, (image, caption) in enumerate(zip(pictures, captions))]
            builder = BatchBuilder(ImageTextBatch, bundle.preprocess_val, bundle.tokenizer, randomize=False)
            batch = builder(samples)
        # next-token targets in the batch (LCL: text only; CLIP has none): what the 49,412-way LM head scores
        self.targets = int((batch.targets != IGNORE_INDEX).sum()) if kind == "lcl" else 0
        self.model = bundle.model.to(self.device).train()
        self.objective.to(self.device)
        self.batch = batch.to(self.device)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)  # fused, as the training loop's

    def step(self) -> tuple[float, float]:
        """(wall s, process CPU s) of forward + backward + optimiser step."""
        return timed_training_step(self.objective, self.model, self.batch, self.optimizer, self.device)


def measure_memory(config: tuple[str, int, int], args) -> dict:
    """Peak memory of one configuration, alone in this process (a few steps)."""
    import torch

    with tempfile.TemporaryDirectory() as settings_dir:
        runner = Runner(config, args, settings_dir)
    rss_before = rss_mib("VmRSS")
    for _ in range(3):
        runner.step()
    peak = rss_mib("VmHWM")
    result = {"peak_rss_mib": peak, "step_rss_mib": peak - rss_before}
    if runner.device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_times(configs: list[tuple[str, int, int]], args) -> dict:
    """Median step time of every configuration, interleaved round-robin in this process so that a change in
    machine load hits all of them alike."""
    with tempfile.TemporaryDirectory() as settings_dir:
        runners = {config: Runner(config, args, settings_dir) for config in configs}
    wall = {config: [] for config in configs}
    cpu = {config: [] for config in configs}
    for step in range(args.warmup + args.steps):
        for config, runner in runners.items():
            wall_s, cpu_s = runner.step()
            if step >= args.warmup:
                wall[config].append(wall_s)
                cpu[config].append(cpu_s)
    return {config: {"step_ms": 1000 * statistics.median(wall[config]),
                     "cpu_ms": 1000 * statistics.median(cpu[config]), "targets": runners[config].targets,
                     "context": runners[config].model.context_length}
            for config in configs}


def memory_in_subprocess(config: tuple[str, int, int], args) -> dict:
    kind, size, images_per_document = config
    command = [sys.executable, __file__, "--one", kind, str(size), str(images_per_document),
               "--batch-size", str(args.batch_size), "--clip-model", args.clip_model, "--device", args.device,
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {size} {images_per_document} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="documents per LCL batch (B)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 128, 256], help="LCL document tokens")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4], help="images per document (k)")
    parser.add_argument("--clip-model", default="clipforge-vit-lcl-synth")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: memory of one configuration
    args = parser.parse_args()

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
    print(f"lcl-synth vs {args.clip_model}, {args.batch_size} documents per LCL batch, device {args.device}, "
          f"{args.threads} thread(s); median of {args.steps} steps after {args.warmup} warm-up, all "
          f"configurations interleaved in one process; memory: each configuration alone in its own process.\n"
          f"'x clip' compares with CLIP on the same number of images, in {'wall' if cuda else 'process CPU'} "
          f"time.\n")

    lcl = [("lcl", c, k) for c in args.contexts for k in args.images if fits(c, k)]
    left_out = [(c, k) for c in args.contexts for k in args.images if not fits(c, k)]
    clip = [("clip", n, 0) for n in sorted({args.batch_size * k for _, _, k in lcl})]
    configs = clip + lcl
    times = measure_times(configs, args)
    memory = {config: memory_in_subprocess(config, args) for config in configs}

    key = "step_ms" if cuda else "cpu_ms"  # CPU time: robust to other processes on a shared machine
    clip_ms = {n: times[("clip", n, 0)][key] for _, n, _ in clip}
    columns = ["model", "ctx", "img/doc", "images", "targets", "wall ms", "cpu ms", "images/s", "x clip",
               "peak RSS MiB", "step +MiB"] + (["peak GPU MiB"] if cuda else [])
    header = "| " + " | ".join(columns) + " |"
    print(header)
    print("|" + "---|" * len(columns))
    for config in configs:
        kind, size, images_per_document = config
        images = size if kind == "clip" else args.batch_size * images_per_document
        row, mem = times[config], memory[config]
        per_document, targets = ("-", "-") if kind == "clip" else (images_per_document, row["targets"])
        cells = [kind, row["context"], per_document, images, targets, f"{row['step_ms']:.1f}",
                 f"{row['cpu_ms']:.1f}", f"{1000 * images / row[key]:.0f}",
                 f"{row[key] / clip_ms[images]:.2f}", f"{mem['peak_rss_mib']:.0f}",
                 f"{mem['step_rss_mib']:.0f}"]
        cells += [f"{mem['peak_gpu_mib']:.0f}"] if cuda else []
        print("| " + " | ".join(map(str, cells)) + " |")
    if left_out:
        print("\nleft out (k image blocks of 18 tokens do not fit the context): "
              + ", ".join(f"ctx {c} k={k}" for c, k in left_out))

    print(f"\nLCL / CLIP step time at equal images ({'wall' if cuda else 'CPU'} time; rows: document tokens, "
          f"columns: images per document):\n")
    print("| ctx | " + " | ".join(f"k={k}" for k in args.images) + " |")
    print("|---|" + "---|" * len(args.images))
    for context in args.contexts:
        cells = [f"{times[('lcl', context, k)][key] / clip_ms[args.batch_size * k]:.2f}"
                 if fits(context, k) else "-" for k in args.images]
        print(f"| {context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
