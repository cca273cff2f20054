"""Step time of FineCLIP against CLIP, and of our one-pass design against the official two-pass recipe.

    .venv/bin/python benchmarks/fineclip_step.py                     # tiny model, CPU, M = 1, 2, 4
    .venv/bin/python benchmarks/fineclip_step.py --device cuda --model ViT-B-16 --batch-size 32 --regions 5 20

One training step = forward + backward + AdamW step on one synthetic RegionBatch (data loading excluded, the
same batch every step). Step times: every configuration (its own model copy and optimiser) runs in one
process, one step of each in turn, so a change in machine load affects all alike. Memory: each configuration
again alone in its own process, so its peak RSS (and peak GPU memory) is its own. Configurations:

- clip                 ClipObjective (one image pass, captions only)
- fineclip             ours: one full-image pass gives the global embedding and the dense map; all crops
                       of the batch in one teacher pass at the model resolution, under no_grad (stop-grad)
- fineclip@low         ours, teacher crops at reduced resolution (--low-res, default half the input size)
- fineclip no-stopgrad ours, one pass, but the teacher keeps its gradient: the same gradients as the official
                       code, so against "official" it isolates what the fused pass saves
- official             the official recipe: a normal full-image pass for the global loss, a second full-image
                       pass for the dense map, crops at full resolution with gradient

The text tower trains in every row (as CLIP's does) unless --freeze-text, the official setting, freezes it in
the FineCLIP rows. On CPU the ratios use process CPU time with one thread, which a busy shared machine
disturbs far less than wall time; "step +MiB" is the peak RSS during the steps above the RSS after the model
was built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from _measure import rss_mib, timed_training_step

VARIANTS = ("clip", "fineclip", "fineclip@low", "fineclip no-stopgrad", "official")


def build(variant: str, model, low_res: int, freeze_text: bool):
    from clipforge.config import FineclipObjectiveConfig
    from clipforge.models.dense import encode_dense
    from clipforge.objectives.clip import ClipObjective
    from clipforge.objectives.fineclip import FineclipObjective

    class OfficialRecipe(FineclipObjective):
        """The official step: a normal full-image pass for the global embedding, then a second full-image
        pass for the dense map; everything else as ours without stop-grad."""

        def encode_full_image(self, model, images):
            return model.encode_image(images), encode_dense(model, images)

    if variant == "clip":
        return ClipObjective()
    config = {
        "fineclip": FineclipObjectiveConfig(freeze_text=freeze_text),
        "fineclip@low": FineclipObjectiveConfig(teacher_resolution=low_res, freeze_text=freeze_text),
        "fineclip no-stopgrad": FineclipObjectiveConfig(teacher_stop_grad=False, freeze_text=freeze_text),
        "official": FineclipObjectiveConfig(teacher_stop_grad=False, freeze_text=freeze_text),
    }[variant]
    cls = OfficialRecipe if variant == "official" else FineclipObjective
    return cls(config, model=model)


def synthetic_batch(batch_size: int, regions: int, image_size: int, context: int, device):
    import torch

    from clipforge.data.batches import RegionBatch

    generator = torch.Generator().manual_seed(0)
    side = torch.randint(image_size // 8, image_size // 2 + 1, (batch_size, regions, 2), generator=generator)
    corner = (torch.rand(batch_size, regions, 2, generator=generator) * (image_size - side)).floor()
    boxes = torch.cat([corner, corner + side], dim=-1).float()  # [B, M, 4] pixels, inside the image
    return RegionBatch(
        images=torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        texts=torch.randint(1, 49000, (batch_size, context), generator=generator),
        labels=torch.full((batch_size,), -1), keys=[str(i) for i in range(batch_size)],
        boxes=boxes, region_texts=torch.randint(1, 49000, (batch_size, regions, context), generator=generator),
        region_valid=torch.ones(batch_size, regions, dtype=torch.bool),
    ).to(device)


class Runner:
    """One configuration: its own model copy, objective, optimiser and batch."""

    def __init__(self, variant: str, regions: int, args):
        import open_clip
        import torch

        import clipforge.models.clip_family  # noqa: F401 - registers the clipforge model configs with open_clip

        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = open_clip.create_model(args.model).to(self.device)
        image_size = self.model.visual.image_size[0]
        self.objective = build(variant, self.model, args.low_res or image_size // 2, args.freeze_text)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.batch = synthetic_batch(args.batch_size, regions, image_size, self.model.context_length, self.device)

    def step(self) -> tuple[float, float]:
        """(wall s, process CPU s) of forward + backward + optimiser step."""
        return timed_training_step(self.objective, self.model, self.batch, self.optimizer, self.device)


def measure_memory(args) -> dict:
    """Peak memory of one configuration, alone in this process (a few steps)."""
    import torch

    runner = Runner(args.variant, args.one_m, args)
    rss_before = rss_mib("VmRSS")
    for _ in range(3):
        runner.step()
    peak = rss_mib("VmHWM")
    result = {"peak_rss_mib": peak, "step_rss_mib": peak - rss_before}
    if runner.device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_times(configs: list[tuple[str, int]], args) -> dict:
    """Median step time of every configuration, interleaved round-robin in this process so that a change in
    machine load hits all of them alike."""
    runners = {config: Runner(*config, args) for config in configs}
    wall = {config: [] for config in configs}
    cpu = {config: [] for config in configs}
    for step in range(args.warmup + args.steps):
        for config, runner in runners.items():
            wall_s, cpu_s = runner.step()
            if step >= args.warmup:
                wall[config].append(wall_s)
                cpu[config].append(cpu_s)
    return {config: {"step_ms": 1000 * statistics.median(wall[config]),
                     "cpu_ms": 1000 * statistics.median(cpu[config])} for config in configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clipforge-vit-tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4], help="regions per image (M)")
    parser.add_argument("--low-res", type=int, default=None, help="reduced teacher resolution (default half)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--freeze-text", action="store_true",
                        help="freeze the text tower in every FineCLIP row (the official setting); by default it "
                             "trains, as in CLIP, so every row updates the same parameters")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: memory of one configuration
    parser.add_argument("--one-m", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(measure_memory(args)))
        return

    cuda = args.device.startswith("cuda")
    machine = f"{platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if cuda:
        machine += f", {torch.cuda.get_device_name()}"
    print(f"machine: {machine}")
    print(f"model {args.model}, batch {args.batch_size}, device {args.device}, {args.threads} thread(s), text tower "
          f"{'frozen' if args.freeze_text else 'trained'} in the FineCLIP rows; median of {args.steps} steps after "
          f"{args.warmup} warm-up, all configurations interleaved in one process; memory: each configuration "
          f"alone in its own process.\n'x clip' and the savings use {'wall' if cuda else 'process CPU'} time.\n")

    configs = [("clip", args.regions[0])] + [(v, m) for m in args.regions for v in VARIANTS if v != "clip"]
    times = measure_times(configs, args)
    rows = []
    for variant, regions in configs:
        command = [sys.executable, __file__, "--variant", variant, "--one-m", str(regions),
                   "--model", args.model, "--batch-size", str(args.batch_size), "--device", args.device,
                   "--threads", str(args.threads), *(["--low-res", str(args.low_res)] if args.low_res else []),
                   *(["--freeze-text"] if args.freeze_text else [])]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{variant} M={regions} failed:\n{done.stderr[-3000:]}")
        memory = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"variant": variant, "M": regions if variant != "clip" else "-", **times[(variant, regions)],
                     **memory})

    key = "step_ms" if cuda else "cpu_ms"  # CPU time: robust to other processes on a shared machine
    clip_ms = rows[0][key]
    header = f"{'variant':<22}{'M':>3}{'wall ms':>9}{'cpu ms':>9}{'x clip':>8}{'peak RSS MiB':>14}{'step +MiB':>11}"
    header += f"{'peak GPU MiB':>14}" if cuda else ""
    print(header)
    print("-" * len(header))
    for row in rows:
        line = (f"{row['variant']:<22}{row['M']!s:>3}{row['step_ms']:>9.1f}{row['cpu_ms']:>9.1f}"
                f"{row[key] / clip_ms:>8.2f}{row['peak_rss_mib']:>14.0f}{row['step_rss_mib']:>11.0f}")
        line += f"{row['peak_gpu_mib']:>14.0f}" if cuda else ""
        print(line)
    print()
    by = {(row["variant"], row["M"]): row[key] for row in rows}
    for regions in args.regions:
        official = by[("official", regions)]
        print(f"M={regions}: against the official recipe, one pass saves "
              f"{100 * (1 - by[('fineclip no-stopgrad', regions)] / official):.0f}% of the step at equal "
              f"gradients; with stop-grad {100 * (1 - by[('fineclip', regions)] / official):.0f}%; with stop-grad "
              f"and half-resolution teacher crops {100 * (1 - by[('fineclip@low', regions)] / official):.0f}%")


if __name__ == "__main__":
    main()
