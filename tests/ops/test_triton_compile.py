"""The Triton kernels compile for the GPU (sm_90, through ptxas) on this CPU-only machine, with
the launch configurations the launchers use: the interpreter tests check the math, this checks
what the interpreter cannot (typing of dynamic branches, dot shapes, shared memory)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(HERE / ".." / ".." / "build" / "triton_cache_aot")  # keep ~/.triton clean
    p = subprocess.run([sys.executable, str(HERE / "_triton_aot.py"), "90"], env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr:
        pytest.skip("triton's ptxas is unavailable")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "compiled" in p.stdout
    # every kernel family, the contrastive loss's included
    for kernel in ("_ln_fwd_kernel", "_ln_bwd_kernel", "_bias_act_fwd_kernel", "_bias_act_bwd_kernel",
                   "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                   "_lse_rows_kernel", "_grad_rows_kernel", "_sig_loss_rows_kernel", "_sig_grad_rows_kernel"):
        assert f"ok {kernel} " in p.stdout, kernel
