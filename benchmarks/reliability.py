"""Reliability and security figures: what was tried, how many times, what survived, what was lost. One table.

    .venv/bin/python benchmarks/reliability.py               # the full run (about 15 min on a 2-core CPU)
    .venv/bin/python benchmarks/reliability.py --quick       # fewer kills and smaller corrupt shards
    .venv/bin/python benchmarks/reliability.py --only configs,hostile

It runs the full versions of the suite in tests/test_reliability_*.py (it imports their generators and helpers):
every generated bad config for real (no sentinel: a config that slips through trains), all hostile files,
bigger corrupt shards through the real loader with 0 and 2 workers, SIGKILL at many seeded moments followed by
--resume latest, NaN/inf in the loss and the gradients under both policies, preflight faults, and a rank of a
2-process gloo run killed. "survived" counts the trials that ended as promised; "lost" counts the others, and
the note says what went wrong. Wall time and peak memory (this process, and its child processes) are printed
per area beneath the table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's generators and helpers

import pytest  # noqa: E402  (MonkeyPatch, as the tests use it)
import torch  # noqa: E402


@dataclass
class Row:
    area: str
    tried: str
    times: int
    survived: int
    lost: int
    note: str = ""


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    peak_mb: float = 0.0
    children_peak_mb: float = 0.0


def _peaks() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def _short(counter: dict, limit: int = 6) -> str:
    items = sorted(counter.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# Bad configs


def bad_configs(work: Path, args) -> list[Row]:
    import subprocess

    import test_reliability_configs as configs

    cases = configs.applicable_cases()
    support = configs.make_support(work / "support")
    runs = work / "runs"
    runs.mkdir()
    answered, folders, executed = 0, 0, 0
    failures: collections.Counter = collections.Counter()
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for case in cases:
        outcome = configs.run_case(case, support, runs, stop_before_training=False)
        problems = configs.answer_problems(case, outcome)
        ok = not problems
        answered += ok
        by_kind[case.kind][0] += 1
        by_kind[case.kind][1] += ok
        if not ok:
            print(f"    config {case.name}: {problems[0][:110]}", file=sys.stderr)
            what = "traceback" if outcome.status == "exception" else "ran (exit 0)" if outcome.status == "accepted" \
                else "line too long" if any("characters" in p for p in problems) else "wrong answer"
            failures[what] += 1
        folders += (runs / case.name).exists() and outcome.status == 2
        executed += (support / configs.MARKER).exists()
    worst = ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in sorted(by_kind.items()) if v[1] < v[0])
    rows = [
        Row("bad configs", "exit 2 + one line naming the problem, no traceback", len(cases), answered,
            len(cases) - answered, f"{_short(failures)}; by kind: {worst}" if failures else
            f"{len(by_kind)} kinds of fault: {_short({k: v[0] for k, v in by_kind.items()}, 6)}"),
        Row("bad configs", "rejected without leaving a run folder", sum(1 for c in cases), len(cases) - folders,
            folders, "rejected after check_output_dir made the folder (data/model/resume checks)" if folders else ""),
    ]
    # a sample through real processes (start-up cost dominates; 3 at a time)
    sample = cases[:: max(1, len(cases) // args.config_processes)][: args.config_processes]
    clean, unclean = 0, []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    e2e_runs = work / "e2e-runs"
    e2e_runs.mkdir()
    for start in range(0, len(sample), 3):
        batch = sample[start: start + 3]
        processes = [(case, subprocess.Popen([sys.executable, "-m", "clipforge",
                                              *configs.case_argv(case, support, e2e_runs)],
                                             cwd=e2e_runs, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)) for case in batch]
        for case, process in processes:
            _, stderr = process.communicate(timeout=600)
            outcome = configs.Outcome(status=process.returncode if process.returncode != 0 else "accepted",
                                      stderr=stderr)
            problems = configs.answer_problems(case, outcome)
            clean += not problems
            if problems:
                unclean.append(case.name)
                print(f"    process {case.name}: {problems[0][:110]}", file=sys.stderr)
    executed += (support / configs.MARKER).exists()
    rows.append(Row("bad configs", "the same, as real `python -m clipforge train` processes", len(sample), clean,
                    len(sample) - clean, f"one case in {len(cases) // len(sample)}"
                    + (f"; not clean: {', '.join(unclean)}" if unclean else "")))
    rows.append(Row("bad configs", "hostile YAML / pickle payload executed", len(cases) + len(sample),
                    len(cases) + len(sample) - executed, executed, "marker file never created" if not executed
                    else "MARKER CREATED"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Hostile files


def hostile_files(work: Path, args) -> list[Row]:
    import test_reliability_configs as configs
    import test_reliability_hostile as hostile
    from PIL import Image

    from clipforge.config import ModelConfig, read_yaml
    from clipforge.data.samples import SkipCounter, decode_sample
    from clipforge.data.shards import iter_tar_samples
    from clipforge.errors import ClipforgeError
    from clipforge.models.factory import create_model

    rows = []
    marker = work / hostile.MARKER
    files = hostile._write_pickles(work, marker)
    refused, one_line, ran = 0, 0, 0
    notes = []
    for kind, path in files.items():
        for trust in (False, True):
            try:
                create_model(ModelConfig(name="clipforge-vit-micro", pretrained=str(path), trust_pickle=trust))
                notes.append(f"{kind} loaded")
            except ClipforgeError as err:
                refused += 1
                one_line += "\n" not in str(err)
            except Exception as err:  # noqa: BLE001 - counted: refused, but not as a one-line error
                refused += 1
                notes.append(f"{kind}: {type(err).__name__}")
            ran += marker.exists()
            marker.unlink(missing_ok=True)
    tried = 2 * len(files)
    rows.append(Row("hostile files", "malicious pickles (8 shapes x trust off/on): code executed", tried,
                    tried - ran, ran, "refused by create_model; trust=True still uses torch's weights_only"))
    rows.append(Row("hostile files", "... refused with a one-line ClipforgeError", tried, one_line, tried - one_line,
                    _short(collections.Counter(n.split(":")[1].strip() if ":" in n else n for n in notes))))

    shard_dir = work / "tar" / "deep"
    shard_dir.mkdir(parents=True)
    shard = shard_dir / "hostile-000000.tar"
    hostile._hostile_shard(shard)
    before = hostile._tree(work / "tar")
    counter = SkipCounter()
    records = list(iter_tar_samples(str(shard), counter))
    escaped = len(hostile._tree(work / "tar") - before) + Path("/tmp/clipforge-absolute-escape").exists()
    leaked = sum(1 for r in records for k in r if k not in ("__key__", "__url__", "__index__", "png", "txt"))
    members = len(hostile.HOSTILE_MEMBERS)
    rows.append(Row("hostile files", "tar members ../, /abs, links, devices: written or read", members,
                    members - escaped - leaked, escaped + leaked,
                    f"counted unsafe_member {counter.get('unsafe_member', 0)}; good samples kept {len(records)}/3"))

    texts = [t for _, t, _ in configs._tag_cases()] + hostile._tagged(marker)
    refused_yaml = 0
    for i, text in enumerate(texts):
        path = work / f"tagged{i}.yaml"
        path.write_text(text.replace(configs.SUPPORT, str(work)))
        try:
            read_yaml(path)
        except ClipforgeError:
            refused_yaml += 1
    constructed = marker.exists() + (work / configs.MARKER).exists()
    rows.append(Row("hostile files", "YAML with Python object tags: refused", len(texts), refused_yaml,
                    len(texts) - refused_yaml, f"objects constructed: {constructed}"))

    before_decode, decoded = 0, 0
    original_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit, without Pillow's guard
    loads = []
    original_load = Image.Image.load
    Image.Image.load = lambda self: loads.append(self.size) or original_load(self)
    try:
        for fmt, data in hostile.BOMBS.items():
            loads.clear()
            counter = SkipCounter()
            sample = decode_sample({"__key__": "bomb", "__url__": "x", fmt: data, "txt": b"c"}, counter)
            ok = sample is None and counter == {"image_too_large": 1} and not loads
            before_decode += ok
            decoded += bool(loads)
    finally:
        Image.Image.load = original_load
        Image.MAX_IMAGE_PIXELS = original_limit
    rows.append(Row("hostile files", "pixel bombs (PNG/JPEG/GIF/BMP/TIFF, >4e9 px): rejected before decoding",
                    len(hostile.BOMBS), before_decode, len(hostile.BOMBS) - before_decode,
                    f"training reader; pixels decoded: {decoded}"))
    from clipforge.errors import DataError
    from clipforge.eval.datasets import EncodedImages, ImageFiles

    bomb = work / "bomb.png"
    bomb.write_bytes(hostile.BOMBS["png"])
    clean = 0
    for images in (EncodedImages([hostile.BOMBS["png"]]), ImageFiles([bomb])):
        try:
            images[0]
        except DataError:
            clean += 1
        except Exception:  # noqa: BLE001 - counted as not clean
            pass
    rows.append(Row("hostile files", "pixel bomb in the evaluation readers: one-line DataError", 2, clean, 2 - clean,
                    "eval.datasets: PIL DecompressionBombError escapes" if clean < 2 else ""))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Corrupt data


def corrupt_data(work: Path, args) -> list[Row]:
    import test_reliability_data as data

    from clipforge.data.scan import scan_source
    from clipforge.data.sources import open_source

    dataset = data.build_corrupt_dataset(work / "shards", good=args.good, copies=args.copies, seed=1)
    rows = []
    try:
        scanned = scan_source(open_source(dataset.spec))
        scan_counts, scan_error = data._normalise(scanned.scan.skipped), None
    except Exception as err:  # noqa: BLE001 - a crash is the figure
        scanned, scan_counts, scan_error = None, {}, f"{type(err).__name__}: {err}"[:120]
    miscounted = {k: scan_counts.get(k, 0) - n for k, n in dataset.expected.items() if scan_counts.get(k, 0) != n}
    rows += [
        Row("corrupt data", "scan (data.scan, the default): usable samples found", len(dataset.good),
            scanned.scan.usable if scanned else 0, len(dataset.good) - (scanned.scan.usable if scanned else 0),
            f"CRASH {scan_error}" if scan_error else f"of {scanned.scan.listed} listed"),
        Row("corrupt data", "scan: bad-input kinds counted exactly once", len(dataset.expected),
            len(dataset.expected) - len(miscounted), len(miscounted),
            f"miscounted: {_short(miscounted, 4)}" if miscounted else f"skipped by kind: {_short(scan_counts, 8)}"),
    ]
    for workers, scan in ((0, True), (2, True), (0, False)):
        head = f"{workers} workers" + ("" if scan else ", data.scan=false")
        try:
            figures = data.run_epoch(dataset, workers, scan=scan)
            crashed = 0
        except Exception as err:  # noqa: BLE001 - a crash is the figure
            figures, crashed = None, 1
            error = f"{type(err).__name__}: {err}"[:120]
        if figures is None:
            rows.append(Row("corrupt data", f"an epoch, {head}", 1, 0, 1, f"CRASH {error}"))
            continue
        counts = figures.counts()
        skipped = data._normalise(figures.skipped)
        sample_skips = sum(skipped.get(k, 0) for k in data.SAMPLE_KINDS)
        repeated = [k for k, n in counts.items() if n > 1]
        repeats = sum(n - 1 for n in counts.values() if n > 1)
        never = [k for k in dataset.good if k not in counts]
        bad_delivered = sum(counts[k] for k in dataset.bad)
        rows += [
            Row("corrupt data", f"{head}: epoch without a crash ({dataset.info['samples_in_headers']} samples "
                f"in headers, {len(dataset.good)} good)", 1, 1 - crashed, crashed,
                f"{figures.batches} batches, {len(figures.delivered) + sample_skips} records decoded"),
            Row("corrupt data", f"{head}: bad samples delivered", len(dataset.bad), len(dataset.bad) - bad_delivered,
                bad_delivered, f"skipped by kind: {_short(skipped, 8)}"),
        ]
        if scan:
            # the samples of an incomplete last batch are left for the epoch (drop_last); any other miss is a loss
            remainder = len(dataset.good) % data.BATCH
            lost = max(0, len(never) - remainder)
            rows.append(Row("corrupt data", f"{head}: good samples delivered exactly once", len(dataset.good),
                            len(dataset.good) - len(never) - len(repeated), len(repeated) + lost,
                            f"{len(figures.delivered)} delivered, {repeats} repeats, {len(never)} in the incomplete "
                            f"last batch (< batch {data.BATCH})" if not lost else
                            f"{len(figures.delivered)} delivered, {repeats} repeats, {len(never)} never delivered"))
        else:
            rows.append(Row("corrupt data", f"{head}: good samples delivered (planned from listed counts)",
                            len(dataset.good), len(dataset.good) - len(never), len(never),
                            f"{len(figures.delivered)} delivered, {repeats} repeats of {len(repeated)} samples "
                            f"(documented: without a scan a short worker repeats rather than stalls)"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Crash and resume


def crash_and_resume(work: Path, args) -> list[Row]:
    import test_reliability_faults as faults

    from clipforge.config import load_config
    from clipforge.engine.loop import train

    train(load_config(faults.write_config(work, "straight")))
    reference = faults.final_weights(work / "straight")
    reports = []
    for i, moment in enumerate(faults.random_moments(args.seed, args.kills)):
        config = faults.write_config(work, f"killed{i}")
        marker = work / f"marker{i}"
        process = faults.start_paused(config, moment, marker)
        reached = faults.wait_and_kill(process, moment, marker, work / f"killed{i}")
        reports.append(faults.resume_and_compare(config, work / f"killed{i}", reference, moment, reached))
    killed = [r for r in reports if r.killed]
    identical = sum(r.identical and r.steps == 12 for r in killed)
    partial_loaded = sum(r.latest_problem is not None or r.resumed_from != r.latest_before
                         or not r.resumed_digest_unchanged for r in killed)
    left = sum(bool(r.partial) for r in killed)
    kinds = collections.Counter(r.moment.split(":")[0] for r in killed)
    return [
        Row("crash & resume", "SIGKILL, then --resume latest: final weights bit-identical", len(killed), identical,
            len(killed) - identical, f"moments: {_short(kinds)}; {len(reports) - len(killed)} ended before the kill"),
        Row("crash & resume", "latest.json -> a complete checkpoint, no partial one loaded", len(killed),
            len(killed) - partial_loaded, partial_loaded,
            f"{left} kills left a partial temp folder; after resume: {sum(bool(r.partial_after) for r in killed)}"),
    ]


# ----------------------------------------------------------------------------------------------------------
# Numerical faults and preflight


def numerical_faults(work: Path, args) -> list[Row]:
    import test_reliability_faults as faults

    from clipforge.config import load_config
    from clipforge.engine.loop import TrainingDiverged, train
    from clipforge.objectives import registry

    rows = []
    patch = pytest.MonkeyPatch()
    patch.setitem(registry.OBJECTIVES, "clip", f"{faults.__name__}:FaultyClip")
    try:
        for fault in ("loss_nan", "loss_inf", "grad_nan"):
            outcomes, good_checkpoints, said_step = [], 0, 0
            for policy in ("stop", "skip"):
                faults.FaultyClip.fault, faults.FaultyClip.at_call, faults.FaultyClip.calls = fault, 4, 0
                name = f"{fault}-{policy}"
                events = []
                try:
                    train(load_config(faults.write_config(work, name, nan_policy=policy, max_steps=6)),
                          on_event=events.append)
                    skipped = [e for e in events if e.kind == "skip"]
                    outcomes.append(f"{policy}: skipped step {skipped[0].step}" if skipped else f"{policy}: ran on")
                    said_step += bool(skipped) and skipped[0].step == 4
                except TrainingDiverged as err:
                    outcomes.append(f"{policy}: stopped ({'at step 4' if 'at step 4 ' in str(err) else str(err)[:40]})")
                    said_step += "at step 4 " in str(err)
                checks = faults._all_checkpoints_good(work / name)
                good_checkpoints += all(problem is None for problem in checks.values())
            rows.append(Row("numerical faults", f"{fault} at step 4, nan_policy stop and skip: handled at that "
                            f"step, every checkpoint finite", 2, min(good_checkpoints, said_step),
                            2 - min(good_checkpoints, said_step), "; ".join(outcomes)))
    finally:
        patch.undo()
    return rows


def preflight(work: Path, args) -> list[Row]:
    import test_reliability_faults as faults

    import clipforge.cli
    from clipforge.config import load_config
    from clipforge.engine.loop import train

    rows = []
    train(load_config(faults.write_config(work, "straight")))
    reference = faults.final_weights(work / "straight")
    config = faults.write_config(work, "full")
    patch = pytest.MonkeyPatch()
    faults._fail_second_checkpoint(patch)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = clipforge.cli.main(["train", str(config), "--no-progress"])
        except OSError as err:
            status = f"{type(err).__name__} traceback"
    patch.undo()
    run_dir = work / "full"
    intact = faults.latest_pointer(run_dir) == "step_00000002" and \
        faults.checkpoint_problem(run_dir / "checkpoints" / "step_00000002") is None
    train(load_config(config), resume="latest")
    same = not faults.weights_differ(faults.final_weights(run_dir), reference)
    rows.append(Row("preflight", "disk full mid-checkpoint: latest intact, resume bit-identical", 1,
                    int(intact and same), int(not (intact and same)), f"the failing run answered: {status}"))

    pointer = faults.write_config(work, "pointer", max_steps=2)
    train(load_config(pointer))
    (work / "pointer" / "checkpoints" / "latest.json").write_text('{"path": "step_000')
    events = []
    try:
        train(load_config(pointer, ["train.max_steps=4"]), resume="latest", on_event=events.append)
        start = next(e for e in events if e.kind == "start").step
        kept = start == 2
        note = f"resumed at step {start}" + (" (progress dropped silently)" if not kept else "")
    except Exception as err:  # noqa: BLE001
        kept, note = True, f"refused: {type(err).__name__}"
    rows.append(Row("preflight", "torn latest.json, --resume latest: progress kept or refused", 1, int(kept),
                    int(not kept), note))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Distributed


def distributed(work: Path, args) -> list[Row]:
    import test_reliability_faults as faults

    report = faults.kill_a_rank_then_resume(work, faults.KillMoment("step", 4))
    ended = report.survivor_status not in (None, 0)
    resumed = report.resumed_status == 0 and report.resumed_steps == 6
    return [
        Row("distributed", "2 gloo ranks, rank 1 SIGKILLed: rank 0 exits by itself (<120 s)", 1, int(ended),
            int(not ended), f"exit {report.survivor_status} after {report.survivor_seconds:.1f} s, "
            f"{'traceback' if report.survivor_traceback else 'one line'}: "
            f"{(report.survivor_lines or [''])[-1][:70]}"),
        Row("distributed", "--resume latest on 2 ranks completes", 1, int(resumed), int(not resumed),
            f"resumed from {report.latest_before}, ended at {report.latest_after}"),
    ]


SECTIONS = {"configs": bad_configs, "hostile": hostile_files, "data": corrupt_data, "crash": crash_and_resume,
            "numerical": numerical_faults, "preflight": preflight, "distributed": distributed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 kills, smaller corrupt shards, 3 config processes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated areas of {', '.join(SECTIONS)}")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL moments (cycling over the kinds)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--good", type=int, default=400, help="good samples in the corrupt shard set")
    parser.add_argument("--copies", type=int, default=5, help="copies of every bad-input kind in it")
    parser.add_argument("--config-processes", type=int, default=12, help="bad configs also run as real processes")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.good, args.copies, args.config_processes = 5, 120, 2, 3
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown area(s) {unknown}; choose from {', '.join(SECTIONS)}")

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    sections = []
    with tempfile.TemporaryDirectory(prefix="clipforge-reliability-") as tmp:
        for name in wanted:
            work = Path(tmp) / name
            work.mkdir()
            started = time.perf_counter()
            rows = SECTIONS[name](work, args)
            own, children = _peaks()
            sections.append(Section(name, rows, time.perf_counter() - started, own, children))
            print(f"  {name}: done in {sections[-1].seconds:.0f} s", file=sys.stderr, flush=True)

    print()
    print("| area | what was tried | times | survived | lost | note |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for section in sections:
        for row in section.rows:
            print(f"| {row.area} | {row.tried} | {row.times} | {row.survived} | {row.lost} | {row.note} |")
    print()
    print("time and peak memory (peak RSS so far: this process / its largest child):")
    for section in sections:
        print(f"  {section.name:<12} {section.seconds:7.1f} s   {section.peak_mb:7.0f} MB / "
              f"{section.children_peak_mb:5.0f} MB")


if __name__ == "__main__":
    main()
