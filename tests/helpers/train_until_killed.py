"""Train CONFIG and SIGKILL this process right after the checkpoint of step KILL_STEP is written.

    python tests/helpers/train_until_killed.py CONFIG KILL_STEP
    torchrun --nproc_per_node=2 tests/helpers/train_until_killed.py CONFIG KILL_STEP   # every rank dies there

A kill at a known moment (not a race against a timer), so a test can resume from a mid-epoch checkpoint of
any model, however fast its steps are. The checkpoint event comes after the barrier that follows the save,
so under torchrun every rank has finished writing when it dies.
"""

from __future__ import annotations

import os
import signal
import sys

import torch


def main() -> None:
    config_path, kill_step = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from clipforge.config import load_config
    from clipforge.engine.loop import train

    def on_event(event) -> None:
        if event.kind == "checkpoint" and event.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    train(load_config(config_path), on_event=on_event)
    sys.exit(3)  # reaching the end means the kill step never came


if __name__ == "__main__":
    main()
