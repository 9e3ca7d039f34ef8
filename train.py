"""Train CLIP / MS-CLIP: `deepspeed train.py --ds_config configs/ds/zero2.json ...` or `python train.py ...`.

A mistake in the flags or inputs is one `error: ...` line on stderr (rank 0 only) and exit status
2; `--debug` or MSCLIP_FAST_DEBUG=1 shows its traceback (msclip_fast/cli.py).
"""
import logging
import os
import sys

from msclip_fast.cli import run_cli
from msclip_fast.training import main

if __name__ == "__main__":
    rc = run_cli(main)
    if "RANK" in os.environ:
        # A distributed run has saved, synced (barrier) and torn down its process group by now,
        # or failed on a user error on every rank alike. What is left is interpreter teardown,
        # where gloo / DeepSpeed C++ objects still alive can abort the process ("terminate
        # called without an active exception", exit -6, seen once in CI on ZeRO-3 rank 1 after
        # "done"), turning a finished run into a failed launch and an exit status 2 into -6.
        # Flush and leave without running those destructors.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
