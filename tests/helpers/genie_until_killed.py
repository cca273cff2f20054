"""Run `augment_genie` and SIGKILL this process as soon as KILL_AT samples are done.

    python tests/helpers/genie_until_killed.py SOURCE MODEL OUT KILL_AT OPTIONS_JSON BATCH_SIZE

The kill comes from the progress callback, at a known sample (not a race against a timer), so a test can check
what a resumed run makes of the shards the killed one left.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch


def main() -> None:
    source, model, out, kill_at, options_json, batch_size = sys.argv[1:7]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from clipforge.augment.genie import augment_genie
    from clipforge.augment.plan import GenieOptions

    def progress(done: int, total: int) -> None:
        if done >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    options = GenieOptions(**json.loads(options_json))
    augment_genie(source, model, out, options=options, batch_size=int(batch_size), progress=progress)
    sys.exit(3)  # reaching the end means the kill never came


if __name__ == "__main__":
    main()
