"""Train CLIP / MS-CLIP: `deepspeed train.py --ds_config configs/ds/zero2.json ...` or `python train.py ...`."""
from msclip_fast.training import main

if __name__ == "__main__":
    main()
