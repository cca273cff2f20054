"""Training throughput: clipforge's loop against open_clip's own trainer on the same model, data and batch.

    .venv/bin/python benchmarks/train_throughput.py [--batch-sizes 64 128] [--images 3072] [--workers 1]

Both sides train clipforge-vit-tiny with the CLIP loss (AdamW, grad-clip 1.0, fp32, RandomResizedCrop
augmentation) on the same CSV of SynthScenes PNGs, each in its own subprocess with the same thread count,
alternating in this run and keeping each side's best of --repeats runs (a shared machine's load then
penalises neither side). Throughput is measured the same way on both sides: samples over wall time between
log points, leaving out the first interval (warm-up). Also reported: model FLOPs utilisation (FLOPs per
step counted by torch's FlopCounterMode, against a large fp32 matmul's FLOP/s measured in the same run),
where our step time goes (data, forward, backward, optimiser), and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

MODEL = "clipforge-vit-tiny"
LOG_EVERY = 4
ROOT = Path(__file__).resolve().parents[1]


def export_csv(folder: Path, count: int) -> Path:
    """SynthScenes train images as PNG files plus a filepath,caption CSV (readable by both trainers)."""
    from clipforge.data.synth import SynthScenes

    generator = SynthScenes(image_size=64, seed=0, split="train")
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,caption"]
    for index in range(count):
        record = generator.record(index)
        path = images / f"{record['__key__']}.png"
        path.write_bytes(record["png"])
        caption = record["txt"].decode("utf-8").replace(",", " ")
        rows.append(f"{path},{caption}")
    csv = folder / "train.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return csv


# ---- the two sides, each run as a subprocess that prints one JSON line at the end --------------------------

OURS = textwrap.dedent("""
    import json, resource, sys
    from clipforge.config import load_config
    from clipforge.engine.loop import train
    from clipforge.engine.records import read_metrics
    csv, out, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config = load_config(overrides=[
        f"output_dir={out}", f"data.train={csv}", "data.format=csv", f"data.batch_size={batch}",
        f"data.workers={workers}", "data.augment=true", "model.name=clipforge-vit-tiny", "train.epochs=1",
        "train.lr=1e-3", "train.weight_decay=0.1", "train.warmup_steps=10", "train.grad_clip_norm=1.0",
        "train.log_every=LOG_EVERY", "train.tensorboard=false", "train.progress=false", "train.keep_last=1"])
    result = train(config)
    print(json.dumps({"records": [r for r in read_metrics(config.run_dir) if "event" not in r],
                      "summary": result.summary,
                      "rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""".replace("LOG_EVERY", str(LOG_EVERY)))

OPEN_CLIP = textwrap.dedent("""
    import json, resource, sys
    import clipforge.models.clip_family  # registers clipforge's model configs with open_clip
    from open_clip_train.main import main
    main(sys.argv[1:])
    print(json.dumps({"rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")


def run_python(code: str, args: list[str], threads: int) -> tuple[dict, str, float]:
    """Run `code` in a fresh interpreter; returns (the JSON of its last stdout line, all its output, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result, done.stdout + done.stderr, time.perf_counter() - started


def throughput(interval_steps: list[int], interval_seconds: list[float], batch: int) -> float:
    """Samples/s over every log interval after the first (the first holds the warm-up)."""
    return batch * sum(interval_steps[1:]) / sum(interval_seconds[1:])


def ours(csv: Path, out: Path, batch: int, workers: int, threads: int) -> dict:
    result, _, wall = run_python(OURS, [str(csv), str(out), str(batch), str(workers)], threads)
    records = result["records"]
    steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + records, records)]
    seconds = [n * batch / r["samples_per_s"] for n, r in zip(steps, records)]
    return {"samples_per_s": throughput(steps, seconds, batch), "steps": result["summary"]["steps"],
            "breakdown": result["summary"]["time_breakdown_s"],
            "rss_mb": max(result["rss_self_kb"], result["rss_children_kb"]) / 1024, "wall_s": wall}


# open_clip logs, every few steps: samples so far, and average data and batch times since the last log line
LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def open_clip_side(csv: Path, logs: Path, batch: int, workers: int, threads: int) -> dict:
    args = ["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "caption", "--model", MODEL, "--batch-size", str(batch), "--epochs", "1",
            "--workers", str(workers), "--lr", "1e-3", "--wd", "0.1", "--warmup", "10", "--grad-clip-norm", "1.0",
            "--precision", "fp32", "--device", "cpu", "--logs", str(logs), "--name", f"b{batch}",
            "--log-every-n-steps", str(LOG_EVERY), "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--report-to", "", "--seed", "0"]
    result, output, wall = run_python(OPEN_CLIP, args, threads)
    lines = [(int(n), float(d), float(b)) for n, d, b in LOG_LINE.findall(output)]
    samples = [n for n, _, _ in lines]
    steps = [(b - a) // batch for a, b in zip([0] + samples, samples)]
    seconds = [n * b for n, (_, _, b) in zip(steps, lines)]
    waiting = sum(n * d for n, (_, d, _) in zip(steps[1:], lines[1:]))
    return {"samples_per_s": throughput(steps, seconds, batch), "steps": samples[-1] // batch,
            "data_share": waiting / sum(seconds[1:]),
            "rss_mb": max(result["rss_self_kb"], result["rss_children_kb"]) / 1024, "wall_s": wall}


# ---- FLOPs and the matmul peak -----------------------------------------------------------------------------


def flops_per_sample(batch: int) -> float:
    """Forward + backward FLOPs of one CLIP training step on `batch` samples, counted by torch, per sample."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    import clipforge.models.clip_family  # noqa: F401 - registers the model config
    from clipforge.objectives.contrastive import contrastive_loss

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the weights are random, as intended
    model = open_clip.create_model(MODEL)
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(0, 49407, (batch, model.context_length))
    with FlopCounterMode(display=False) as counter:
        loss, _ = contrastive_loss(model.encode_image(images, normalize=True),
                                   model.encode_text(texts, normalize=True), model.logit_scale.exp())
        loss.backward()
    return counter.get_total_flops() / batch


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large square matmul with `threads` threads: the attainable peak for MFU."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(before)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=3072, help="SynthScenes images in the CSV (one epoch)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers, both sides")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, both sides (default: the cores left after the data workers)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and batch size (best is kept)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) - args.workers)

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__}; {args.threads} threads, {args.workers} worker(s); "
          f"model {MODEL}, fp32, CLIP loss, {args.images} images per epoch, best of {args.repeats} runs per side")
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-") as tmp:
        tmp = Path(tmp)
        csv = export_csv(tmp / "data", args.images)
        peak = matmul_peak(args.threads)
        print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
        rows = []
        for batch in args.batch_sizes:
            flops = flops_per_sample(batch)
            # alternate the sides (open_clip, ours, ours, open_clip, ...) and keep each side's best run, so
            # that load from other processes on a shared machine penalises neither side more
            theirs, mine = [], []
            for repeat in range(args.repeats):
                order = ("theirs", "ours") if repeat % 2 == 0 else ("ours", "theirs")
                for side in order:
                    if side == "theirs":
                        theirs.append(open_clip_side(csv, tmp / f"oc_{batch}_{repeat}", batch, args.workers,
                                                     args.threads))
                    else:
                        mine.append(ours(csv, tmp / f"cf_{batch}_{repeat}", batch, args.workers, args.threads))
            best = lambda runs: max(runs, key=lambda run: run["samples_per_s"])  # noqa: E731
            rows.append((batch, flops, best(mine), best(theirs)))

    print()
    header = (f"{'batch':>5} {'open_clip s/s':>13} {'clipforge s/s':>13} {'ratio':>6} {'MFU':>6} "
              f"{'GFLOP/sample':>12} {'data':>6} {'fwd':>6} {'bwd':>6} {'optim':>6} "
              f"{'oc data':>7} {'RSS oc MB':>9} {'RSS cf MB':>9}")
    print(header)
    print("-" * len(header))
    for batch, flops, mine, theirs in rows:
        parts = mine["breakdown"]
        busy = sum(parts[k] for k in ("data", "forward", "backward", "optimizer"))
        share = {k: parts[k] / busy for k in ("data", "forward", "backward", "optimizer")}
        mfu = mine["samples_per_s"] * flops / peak
        print(f"{batch:>5} {theirs['samples_per_s']:>13.1f} {mine['samples_per_s']:>13.1f} "
              f"{mine['samples_per_s'] / theirs['samples_per_s']:>5.2f}x {mfu:>6.1%} {flops / 1e9:>12.3f} "
              f"{share['data']:>6.0%} {share['forward']:>6.0%} {share['backward']:>6.0%} {share['optimizer']:>6.0%} "
              f"{theirs['data_share']:>7.0%} {theirs['rss_mb']:>9.0f} {mine['rss_mb']:>9.0f}")
    print("\ns/s = training samples per second after the first log interval; MFU = clipforge's achieved "
          "FLOP/s / the matmul peak;\ndata/fwd/bwd/optim = where clipforge's step time goes; oc data = "
          "open_clip's share of step time waiting for data.")


if __name__ == "__main__":
    main()
