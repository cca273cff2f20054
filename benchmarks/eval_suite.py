"""Benchmark: clipforge's evaluation suite against CLIP_benchmark running the same tasks one after another.

    .venv/bin/python benchmarks/eval_suite.py                     # sizes 500 and 1000, clipforge-vit-tiny
    .venv/bin/python benchmarks/eval_suite.py --sizes 250 500 --episodes 50

Tasks: zero-shot classification, retrieval (recall@1/5/10), linear probe, few-shot (5-way, 1/5/10 shots), all
on one dataset: SynthScenes novel classes (16 classes, N test images with 4 captions each, N training images
for the probe). Both sides use the same random-initialised model (same seed), the same images and the same
preprocessing, each in its own subprocess (so peak RSS is per side); data generation is not timed.

- clip_benchmark side: its own dataloader-based functions, each doing its own forward passes:
  `zeroshot_classification.evaluate` (its numpy-2.4-broken `accuracy` helper swapped for the same formula),
  `zeroshot_retrieval.evaluate`, and for the linear probe and few-shot its `linear_probe.Featurizer` over
  DataLoaders (its `linear_probe.evaluate` requires CUDA and trains an AdamW probe, a different protocol), then
  the same classifiers as ours: the L-BFGS C sweep, and one sklearn LogisticRegression per few-shot episode.
  The sklearn fits run single-threaded as ours do (the fair setting on a small problem).
- clipforge side: `run_suite` — each image encoded once and shared; few-shot episodes solved in one batch.

Columns: wall seconds per task and in all (the fastest of --repeats runs per side, sides alternating), `cpu` =
process CPU seconds of the timed part (less sensitive to a busy machine), `fwd` = seconds inside
encode_image/encode_text; peak RSS of the process. "No task slower than its forward passes": each of our tasks
(including the feature passes it triggers first) is compared with the same task on the clip_benchmark side,
whose zero-shot and retrieval are nothing but their forward passes (data loading included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

TASKS = ("zeroshot", "retrieval", "linear_probe", "fewshot")


# ----------------------------------------------------------------------------------------------------------
# Child process: one side, one size


class ForwardTimer:
    """Wraps a model's encode_image/encode_text to count their seconds and calls."""

    def __init__(self, model):
        self.seconds = 0.0
        self.images = 0
        self.texts = 0
        for name in ("encode_image", "encode_text"):
            setattr(model, name, self._timed(getattr(model, name), name))

    def _timed(self, function, name):
        def wrapper(x, *args, **kwargs):
            start = time.perf_counter()
            out = function(x, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            if name == "encode_image":
                self.images += x.shape[0]
            else:
                self.texts += x.shape[0]
            return out
        return wrapper

    def take(self) -> dict:
        values = {"fwd_s": self.seconds, "images": self.images, "texts": self.texts}
        self.seconds, self.images, self.texts = 0.0, 0, 0
        return values


def setup(args):
    import open_clip
    import torch

    import clipforge.models.clip_family  # noqa: F401  (registers the clipforge model configs)
    from clipforge.eval import synth_eval_datasets
    from clipforge.eval.templates import load_templates

    dataset = synth_eval_datasets(num_eval=args.n, num_train=args.n, image_size=args.image_size, seed=0,
                                  variants=[], groups=("novel",))[0]
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    return model, preprocess, tokenizer, dataset, load_templates("synthscenes")


def run_clipforge(args) -> dict:
    from clipforge.config import EvalConfig
    from clipforge.eval import run_suite

    model, preprocess, tokenizer, dataset, templates = setup(args)
    timer = ForwardTimer(model)
    config = EvalConfig(tasks=list(TASKS), batch_size=args.batch_size, fewshot_shots=args.shots,
                        fewshot_episodes=args.episodes)
    cpu_start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_suite(model, preprocess, tokenizer, config, dataset, templates=templates)
    cpu = time.process_time() - cpu_start
    forward = timer.take()
    metrics = {r["clipforge_task"]: r["metrics"] for r in summary["results"]}
    tasks = {task: {"s": summary["timing"]["tasks"][f"{task}/{dataset.name}"]} for task in TASKS}
    return {"total_s": summary["timing"]["total_s"], "cpu_s": cpu, "tasks": tasks, "forward": forward,
            "metrics": metrics}


def run_clip_benchmark(args) -> dict:
    import numpy as np
    import torch
    from clip_benchmark.metrics import linear_probe as cb_linear_probe
    from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot
    from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
    from sklearn.linear_model import LogisticRegression
    from torch.utils.data import DataLoader, Dataset

    from clipforge.eval.fewshot import fewshot_queries, mean_and_ci95, sample_episodes
    from clipforge.eval.linear_probe import linear_probe
    from clipforge.eval.threads import solver_threads

    model, preprocess, tokenizer, dataset, templates = setup(args)
    timer = ForwardTimer(model)

    def accuracy(output, target, topk=(1,)):  # clip_benchmark's formula; its float(ndarray) fails on numpy 2.4
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]

    cb_zeroshot.accuracy = accuracy

    class Labelled(Dataset):
        def __init__(self, part):
            self.part, self.classes = part, part.classnames

        def __len__(self):
            return len(self.part)

        def __getitem__(self, i):
            return preprocess(self.part.images[i]), self.part.labels[i]

    class Captioned(Labelled):
        def __getitem__(self, i):
            return preprocess(self.part.images[i]), self.part.captions[i]

    def loader(part, captions=False):
        if captions:
            return DataLoader(Captioned(part), batch_size=args.batch_size,
                              collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b]))
        return DataLoader(Labelled(part), batch_size=args.batch_size)

    def featurize(part):  # clip_benchmark's linear-probe feature pass (Featurizer over a DataLoader)
        featurizer = cb_linear_probe.Featurizer(model, normalize=True)
        features, labels = [], []
        with torch.no_grad():
            for images, target in loader(part):
                features.append(featurizer(images))
                labels.append(target)
        return torch.cat(features), torch.cat(labels)

    results, tasks = {}, {}
    start_all, cpu_start = time.perf_counter(), time.process_time()

    start = time.perf_counter()
    results["zeroshot"] = cb_zeroshot.evaluate(model, loader(dataset), tokenizer, dataset.classnames,
                                               [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
    tasks["zeroshot"] = {"s": time.perf_counter() - start, **timer.take()}

    start = time.perf_counter()
    results["retrieval"] = cb_retrieval.evaluate(model, loader(dataset, captions=True), tokenizer, "cpu",
                                                 amp=False, recall_k_list=[1, 5, 10])
    tasks["retrieval"] = {"s": time.perf_counter() - start, **timer.take()}

    start = time.perf_counter()
    train_features, train_labels = featurize(dataset.train)
    test_features, test_labels = featurize(dataset)
    probe = linear_probe(train_features, train_labels, test_features, test_labels, dataset.num_classes)
    results["linear_probe"] = probe.metrics
    tasks["linear_probe"] = {"s": time.perf_counter() - start, **timer.take()}

    start = time.perf_counter()
    features, labels = featurize(dataset)
    fewshot = {}
    for shots in args.shots:
        queries = fewshot_queries(labels, 5, shots)
        accuracies = []
        for episode in sample_episodes(labels, 5, shots, queries, args.episodes, seed=0):
            classifier = LogisticRegression(C=1.0, max_iter=1000)
            with solver_threads(0):
                classifier.fit(features[episode.support].double().numpy(), episode.support_labels.numpy())
            predicted = classifier.predict(features[episode.query].double().numpy())
            accuracies.append(float(np.mean(predicted == episode.query_labels.numpy())))
        fewshot[f"fewshot_acc1@5way{shots}shot"] = mean_and_ci95(accuracies)[0]
    results["fewshot"] = fewshot
    tasks["fewshot"] = {"s": time.perf_counter() - start, **timer.take()}
    total, cpu = time.perf_counter() - start_all, time.process_time() - cpu_start
    forward = {"fwd_s": sum(t["fwd_s"] for t in tasks.values()), "images": sum(t["images"] for t in tasks.values()),
               "texts": sum(t["texts"] for t in tasks.values())}
    return {"total_s": total, "cpu_s": cpu, "tasks": tasks, "forward": forward, "metrics": results}


def child(args) -> None:
    result = run_clip_benchmark(args) if args.child == "clip_benchmark" else run_clipforge(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# Parent: run both sides for each size and print the table


def run_side(side: str, n: int, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--n", str(n), "--model", args.model,
               "--episodes", str(args.episodes), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--shots", *map(str, args.shots)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{side} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def agreement(ours: dict, theirs: dict) -> str:
    checks = []
    for task, keys in (("zeroshot", ["acc1", "acc5", "mean_per_class_recall"]),
                       ("retrieval", [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]),
                       ("linear_probe", ["lp_acc1"])):
        checks.append(all(ours[task][k] == theirs[task][k] for k in keys))
    fewshot_gap = max(abs(ours["fewshot"][k] - v) for k, v in theirs["fewshot"].items())
    return ("exact" if all(checks) else "DIFFER") + f" (few-shot max gap {fewshot_gap:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000], help="test images (and probe train)")
    parser.add_argument("--model", default="clipforge-vit-tiny")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side; the fastest is reported")
    parser.add_argument("--child", choices=["clipforge", "clip_benchmark"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    print(f"model {args.model}, SynthScenes novel classes (16), {args.episodes} episodes x shots {args.shots}, "
          f"batch {args.batch_size}; seconds (fwd = inside encode_image/encode_text)\n")
    header = (f"{'N':>5} {'side':<15}" + "".join(f"{t:>13}" for t in TASKS)
              + f"{'total':>8}{'cpu':>8}{'fwd':>8}{'images':>7}{'texts':>6}{'peak RSS':>10}")
    print(header)
    print("-" * len(header))
    summary = []
    for n in args.sizes:
        runs = {"clip_benchmark": [], "clipforge": []}
        for repeat in range(args.repeats):  # alternate the order: a busy spell should not hit one side only
            order = ("clip_benchmark", "clipforge") if repeat % 2 == 0 else ("clipforge", "clip_benchmark")
            for side in order:
                runs[side].append(run_side(side, n, args))
        sides = {side: min(results, key=lambda r: r["total_s"]) for side, results in runs.items()}
        for side, result in sides.items():
            cells = "".join(f"{result['tasks'][t]['s']:>13.2f}" for t in TASKS)
            forward = result["forward"]
            cpu = min(r["cpu_s"] for r in runs[side])
            print(f"{n:>5} {side:<15}{cells}{result['total_s']:>8.2f}{cpu:>8.2f}{forward['fwd_s']:>8.2f}"
                  f"{forward['images']:>7}{forward['texts']:>6}{result['peak_rss_mb']:>8.0f}MB")
        ours, theirs = sides["clipforge"], sides["clip_benchmark"]
        slower = [t for t in TASKS if ours["tasks"][t]["s"] > theirs["tasks"][t]["s"]]
        cpu_ratio = min(r["cpu_s"] for r in runs["clip_benchmark"]) / min(r["cpu_s"] for r in runs["clipforge"])
        summary.append((n, theirs["total_s"] / ours["total_s"], cpu_ratio, slower,
                        agreement(ours["metrics"], theirs["metrics"]),
                        {t: (ours["tasks"][t]["s"], theirs["tasks"][t]["s"], theirs["tasks"][t]["fwd_s"])
                         for t in TASKS}))
    print()
    for n, speedup, cpu_ratio, slower, agree, per_task in summary:
        detail = ", ".join(f"{t} {o:.2f}/{c:.2f} ({f:.2f})" for t, (o, c, f) in per_task.items())
        verdict = "none" if not slower else ", ".join(slower)
        print(f"N={n}: suite speed-up {speedup:.2f}x wall, {cpu_ratio:.2f}x CPU time; metrics {agree}")
        print(f"       per task, ours / clip_benchmark's pass (inside encode_*): {detail}")
        print(f"       tasks slower than clip_benchmark's pass for them: {verdict}")
    if len(summary) > 1:
        (n0, s0, *_), (n1, s1, *_) = summary[0], summary[-1]
        print(f"scaling N {n0} -> {n1}: speed-up {s0:.2f}x -> {s1:.2f}x")


if __name__ == "__main__":
    main()
