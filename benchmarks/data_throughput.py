"""Data throughput: SynthScenes generation, shard writing, shard reading and the training loader.

    .venv/bin/python benchmarks/data_throughput.py                 # 64/128/256 px, 2000 images each
    .venv/bin/python benchmarks/data_throughput.py --num 500 --sizes 64

Every measurement runs in its own fresh subprocess with OMP_NUM_THREADS=1 and torch.set_num_threads(1)
(one core, except the 2-worker loader row, which uses two worker processes), so each row's peak RSS is
that measurement's own. Rows:

- render:          scene sampling + drawing (PIL image in memory)
- render+encode:   a full record: drawing, annotations, PNG encoding and JSON (what shards hold)
- write shards:    write_shards() of pre-generated records (tar + manifest, atomic renames)
- read+validate:   tar reading + PNG decoding + validation into Samples (one core)
- loader, 0 / 2 workers: build_loader() batches: read + decode + open_clip preprocess (to 64 px) +
                   tokenise, ImageTextBatch of 64; peak RSS of the 2-worker row is main + largest worker.

Goal from the issue: >= 2,000 generated images/s at 64 x 64 on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["render", "render+encode", "write shards", "read+validate", "loader, 0 workers", "loader, 2 workers"]


def _peak_rss_mb(children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024.0  # Linux reports KiB


def run_task(task: str, size: int, num: int, folder: Path) -> dict:
    # torch is imported only by the loader rows (it alone adds ~0.5 GB of RSS); OMP_NUM_THREADS=1 is set
    from clipforge.data.synth import SynthScenes

    generator = SynthScenes(image_size=size, seed=0, split="train")
    shard_dir = folder / f"shards_{size}"
    extra = {}
    if task == "render":
        generator.render(0)  # warm caches (fonts, backgrounds) outside the timing
        start = time.perf_counter()
        for index in range(num):
            generator.render(index)
    elif task == "render+encode":
        generator.record(0)
        start = time.perf_counter()
        for index in range(num):
            generator.record(index)
    elif task == "write shards":
        from clipforge.data.shards import write_shards

        records = list(generator.records(0, num))
        extra["MB"] = sum(len(r["png"]) + len(r["txt"]) + len(r["json"]) for r in records) / 1e6
        start = time.perf_counter()
        write_shards(records, shard_dir, shard_size=1000)
    elif task == "read+validate":
        from clipforge.data.samples import SkipCounter, decode_sample
        from clipforge.data.sources import open_source

        source = open_source(str(shard_dir))
        counter = SkipCounter()
        start = time.perf_counter()
        valid = sum(decode_sample(raw, counter) is not None for raw in source.records(counter))
        assert valid == num, (valid, counter)
    else:
        import open_clip
        import torch
        from open_clip.transform import image_transform

        from clipforge.config import load_config
        from clipforge.data.pipeline import build_loader
        from clipforge.data.sources import open_source

        torch.set_num_threads(1)
        workers = 2 if "2" in task else 0
        config = load_config(None, ["data.batch_size=64", f"data.workers={workers}"])
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        loader = build_loader(open_source(str(shard_dir)), config, preprocess=image_transform(64, is_train=False),
                              tokenizer=tokenizer)
        start = time.perf_counter()
        count = sum(len(batch) for batch in loader)
        num = count
    seconds = time.perf_counter() - start
    rss = _peak_rss_mb()
    if task == "loader, 2 workers":
        rss += _peak_rss_mb(children=True)
    return {"task": task, "size": size, "items": num, "seconds": seconds, "peak_rss_mb": rss, **extra}


def _child(task: str, size: int, num: int, folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, __file__, "--child", task, "--sizes", str(size), "--num", str(num),
               "--folder", str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{task} @ {size}px failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=2000, help="images per measurement (default 2000)")
    parser.add_argument("--sizes", default="64,128,256", help="image sizes in pixels (default 64,128,256)")
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(run_task(args.child, sizes[0], args.num, Path(args.folder))))
        return

    # no torch import here: a child started by exec inherits this process's peak RSS on Linux
    from importlib.metadata import version

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical cores; python {platform.python_version()}, torch {version('torch')}")
    print(f"{args.num} images per row; each row in a fresh process, 1 thread (OMP_NUM_THREADS=1)\n")
    header = f"{'size':>5}  {'measurement':<18} {'images/s':>10} {'ms/image':>9} {'peak RSS MB':>12}  note"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            for task in TASKS:
                result = _child(task, size, args.num, Path(folder))
                rate = result["items"] / result["seconds"]
                note = ""
                if task == "write shards":
                    note = f"{result['MB'] / result['seconds']:.0f} MB/s, {result['MB'] / result['items'] * 1e3:.1f} KB/sample"
                if task == "render+encode" and size == 64:
                    note = "goal >= 2000/s: " + ("met" if rate >= 2000 else "NOT met")
                print(f"{size:>5}  {task:<18} {rate:>10.0f} {1e3 / rate:>9.3f} {result['peak_rss_mb']:>12.0f}  {note}",
                      flush=True)
            print()


if __name__ == "__main__":
    main()
