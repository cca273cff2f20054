"""What the step benchmarks share: peak memory from /proc, and one timed training step.

Imported by the scripts beside it (`python benchmarks/<name>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import resource
import time


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB. Not getrusage's ru_maxrss: Linux
    carries the parent's peak over into a child started with (v)fork + exec, which would hide the child's
    own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else 0.0


def timed_training_step(objective, model, batch, optimizer, device) -> tuple[float, float]:
    """(wall s, process CPU s) of forward + backward + optimiser step + the objective's after_step."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = objective(model, batch)
    out.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.after_step(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start
