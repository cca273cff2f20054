"""What every `clipforge reproduce METHOD` shares: arms x seeds of runs through the one engine, resumable (a
finished run is not trained again, an interrupted one continues from its latest checkpoint, a finished
evaluation is read back), mean +- std tables, and the method's own section of docs/results.md."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    config: str  # which base config file (configs/<config>_synth_tiny.yaml)
    overrides: tuple[str, ...] = ()


def select_arms(arms: Sequence[Arm], keys: Sequence[str] | None) -> list[Arm]:
    """The arms named by `keys` (all when None), in the method's order; ConfigError for an unknown name."""
    unknown = sorted(set(keys or ()) - {arm.key for arm in arms})
    if unknown:
        from clipforge.errors import ConfigError

        raise ConfigError(f"unknown arm '{unknown[0]}' (known: {', '.join(a.key for a in arms)})")
    return [arm for arm in arms if keys is None or arm.key in keys]


def parse_arm_seeds(items: Sequence[str] | None, arms: Sequence[Arm]) -> dict[str, list[int]]:
    """`["wcon_1=0", "gsa=0,1"]` -> {"wcon_1": [0], "gsa": [0, 1]}: arms that run fewer (or other) seeds than the
    rest; ConfigError for an unknown arm or a malformed entry."""
    from clipforge.errors import ConfigError

    found: dict[str, list[int]] = {}
    for item in items or ():
        key, _, values = item.partition("=")
        select_arms(arms, [key])
        try:
            found[key] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--arm-seeds '{item}': expected ARM=SEED[,SEED...]") from None
        if not found[key]:
            raise ConfigError(f"--arm-seeds '{item}': expected ARM=SEED[,SEED...]")
    return found


def seed_plan(arms: Sequence[Arm], seeds: Sequence[int], arm_seeds: dict[str, list[int]]) -> list[tuple[Arm, int]]:
    """(arm, seed) in the order to run them: seed by seed, so a partial reproduction has every arm."""
    every = sorted({*seeds, *(s for values in arm_seeds.values() for s in values)})
    return [(arm, seed) for seed in every for arm in arms if seed in arm_seeds.get(arm.key, seeds)]


def is_finished(run_dir: Path) -> bool:
    """Training of the run in `run_dir` completed (its summary says every step ran)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    data = json.loads(summary.read_text(encoding="utf-8"))
    return data.get("steps") == data.get("total_steps")


def train_once(config, progress: ProgressFn) -> dict:
    """Train `config`'s run unless it finished already (resuming an interrupted one); returns its summary."""
    from clipforge.engine.loop import train

    run_dir = config.run_dir
    if is_finished(run_dir):
        progress(f"{config.name}: already trained")
    else:
        progress(f"{config.name}: training")
        train(config, resume="latest")
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def cached_evaluation(run_dir: Path, name: str, key: dict, compute: Callable[[], dict],
                      progress: ProgressFn) -> dict:
    """`compute()` once per (run, evaluation settings `key`): its result is kept in run_dir/<name>.json and read
    back on a re-run with the same settings."""
    path = run_dir / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            progress(f"{run_dir.name}: {name} already done")
            return saved["metrics"]
    from clipforge.models.checkpoint import write_json_atomic

    metrics = compute()
    write_json_atomic(path, {"key": key, "metrics": metrics})
    return metrics


def final_logged(run_dir: Path, names: Sequence[str], last: int = 3) -> dict[str, float]:
    """The mean of each metric over the last `last` records of metrics.jsonl that have it (NaN when none do): how
    far each term had trained at the end."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("event") != "eval":
                rows.append(row)
    found = {}
    for name in names:
        values = [row[name] for row in rows if isinstance(row.get(name), int | float)][-last:]
        found[name] = statistics.fmean(values) if values else math.nan
    return found


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_table(arms: Sequence[Arm], results: dict[str, list[dict]], titles: Sequence[str],
                  formats: dict[str, Callable[[float, float], str]] | None = None) -> str:
    """Markdown table: one row per arm with results, mean +- std over its seeds; by default in percent."""
    formats = formats or {}

    def percent(mean: float, std: float) -> str:
        return f"{100 * mean:.1f} +- {100 * std:.1f}"

    lines = ["| arm | seeds | " + " | ".join(titles) + " |", "| --- | ---: |" + " ---: |" * len(titles)]
    for arm in arms:
        runs = results.get(arm.key)
        if not runs:
            continue
        cells = []
        for title in titles:
            mean, std = mean_std([run.get(title, math.nan) for run in runs])
            cells.append("n/a" if math.isnan(mean) else formats.get(title, percent)(mean, std))
        lines.append(f"| {arm.label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_section(path: Path, section: str, marker: str) -> None:
    """Replace (or append) the section between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` of `path`,
    leaving the other sections alone."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_payload(out_dir: Path, payload: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n", encoding="utf-8")
