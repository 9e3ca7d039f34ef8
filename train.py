"""Train CLIP / MS-CLIP: `deepspeed train.py --ds_config configs/ds/zero2.json ...` or `python train.py ...`."""
import logging
import os
import sys

from msclip_fast.training import main

if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        # A distributed run has saved, synced (barrier) and torn down its process group by now.
        # What is left is interpreter teardown, where gloo / DeepSpeed C++ objects still alive
        # can abort the process ("terminate called without an active exception", exit -6,
        # seen once in CI on ZeRO-3 rank 1 after "done"), turning a finished run into a failed
        # launch. Flush and leave without running those destructors.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
