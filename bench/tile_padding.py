"""Attention tile padding at CLIP sequence lengths: the work the forward kernel's tiles compute,
with the launcher's length-aware tiles (``kernels/attention.py`` ``_config``) against the fixed
128 x 64 tiles it used before (head dim 64, bf16).

Exact, device-independent counts: a sequence of L tokens runs ``ceil(L / BM)`` query tiles of
BM rows, each against ``ceil(L / BN)`` key tiles of BN rows (no causal skipping counted), so the
score work is ``ceil(L/BM)·BM · ceil(L/BN)·BN`` multiply-adds per head dim, against ``L²`` useful.

    python -m bench.tile_padding [--markdown]
"""
from __future__ import annotations

import argparse

import torch

from msclip_fast.ops._triton import kernels

LENGTHS = {"B/32 image": 50, "text (and a packed B/32 batch, max 77)": 77, "B/16 image": 197}
OLD = (128, 64)


def padded(length: int, block: int) -> int:
    return -(-length // block) * block


def rows(head_dim: int = 64, dtype=torch.bfloat16) -> list[dict]:
    att = kernels("attention")
    out = []
    for name, L in LENGTHS.items():
        cfg = att._config(head_dim, dtype, torch.device("cuda"), bwd=False, max_seqlen=L)
        old = padded(L, OLD[0]) * padded(L, OLD[1])
        new = padded(L, cfg.block_m) * padded(L, cfg.block_n)
        out.append({"sequence": name, "L": L, "old_tiles": f"{OLD[0]}x{OLD[1]}",
                    "new_tiles": f"{cfg.block_m}x{cfg.block_n}", "useful_old": L * L / old,
                    "useful_new": L * L / new, "work_ratio_old_over_new": old / new})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    r = rows()
    if a.markdown:
        print("| sequence | L | tiles before | useful share | tiles now | useful share | work before / now |")
        print("|---|---:|---|---:|---|---:|---:|")
        for x in r:
            print(f"| {x['sequence']} | {x['L']} | {x['old_tiles']} | {x['useful_old']:.0%} | {x['new_tiles']} | "
                  f"{x['useful_new']:.0%} | {x['work_ratio_old_over_new']:.2f}x |")
    else:
        for x in r:
            print(x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
