"""Compile every Triton kernel for an NVIDIA target without a GPU (run as a subprocess by
test_triton_compile.py, with TRITON_INTERPRET unset so ``triton.jit`` builds real kernels).

The interpreter accepts programs the compiler rejects (dynamic-if type mismatches, dot shapes,
shared-memory overflow); this checks the launch configurations the launchers really use, down
to ptxas, on a CPU-only machine. Usage: python _triton_aot.py [ARCH=90]
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from msclip_fast.ops._triton import kernels  # noqa: E402

A, LN, BA = kernels("attention"), kernels("layer_norm"), kernels("bias_act")
ARCH = int(sys.argv[1]) if len(sys.argv) > 1 else 90
TARGET = GPUTarget("cuda", ARCH, 32)
TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOATS = ("eps", "qk_scale", "sm_scale")
n_ok = 0


def compile_kernel(fn, consts, ptrs, num_warps=4, num_stages=2):
    global n_ok
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    smem = k.metadata.shared
    assert smem <= 227 * 1024, f"{fn.__name__} {consts}: {smem} bytes of shared memory"
    n_ok += 1
    print(f"ok {fn.__name__} {consts} warps={num_warps} stages={num_stages} smem={smem}", flush=True)


def layer_norm():
    for D, dt in ((768, torch.bfloat16), (100, torch.float32), (8, torch.float16)):
        block_d, rows, warps = LN._blocks(D)
        io = "*" + TY[dt]
        compile_kernel(LN._ln_fwd_kernel, dict(HAS_RES=True, HAS_IDS=True, ROWS=rows, BLOCK_D=block_d),
                       dict(X=io, R=io, S=io, Y=io, W="*fp32", B="*fp32", IDS="*i8", SHIFT="*fp32", RSTD="*fp32"), warps)
        compile_kernel(LN._ln_bwd_kernel,
                       dict(M=2, M_PAD=2, HAS_DS=True, HAS_IDS=D != 8, ROWS=rows, BLOCK_D=block_d),
                       dict(X=io, DY=io, DS=io, DX=io, W="*fp32", IDS="*i64", SHIFT="*fp32", RSTD="*fp32",
                            DW="*fp32", DB="*fp32"), warps)


def bias_act():
    block_r, block_n = BA._blocks(3072)
    for act in (0, 1, 2):
        io = "*bf16" if act else "*fp32"
        compile_kernel(BA._bias_act_fwd_kernel, dict(ACT=act, HAS_BIAS=True, BLOCK_R=block_r, BLOCK_N=block_n),
                       dict(X=io, BIAS=io, Y=io))
        compile_kernel(BA._bias_act_bwd_kernel, dict(ACT=act, HAS_BIAS=act != 2, BLOCK_R=block_r, BLOCK_N=block_n),
                       dict(X=io, BIAS=io, DY=io, DX=io, DB="*fp32"))


def attention():
    cuda = torch.device("cuda")
    for head_dim, dt, varlen, mode in ((64, torch.bfloat16, False, 0), (64, torch.bfloat16, True, 2),
                                       (128, torch.float16, False, 1), (32, torch.float32, True, 1),
                                       (96, torch.bfloat16, True, 2)):
        io = "*" + TY[dt]
        ptrs = {n: io for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs.update(CU="*i32", CAUSAL="*i8", LSE="*fp32", DELTA="*fp32")
        bm, bn, bk, w, st, f32, prec = A._config(head_dim, dt, cuda, bwd=False)
        common = dict(VARLEN=varlen, CAUSAL_MODE=mode, BLOCK_K=bk, DOT_F32=f32, PREC=prec)
        compile_kernel(A._attn_fwd_kernel, dict(common, BLOCK_M=bm, BLOCK_N=bn), ptrs, w, st)
        bm, bn, bk, w, st, f32, prec = A._config(head_dim, dt, cuda, bwd=True)
        compile_kernel(A._attn_bwd_delta_kernel, dict(VARLEN=varlen, BLOCK_M=bm, BLOCK_K=bk), ptrs, 4)
        compile_kernel(A._attn_bwd_dkdv_kernel, dict(common, BLOCK_M=bm, BLOCK_N=bn), ptrs, w, st)
        compile_kernel(A._attn_bwd_dq_kernel, dict(common, BLOCK_M=bm, BLOCK_N=bn), ptrs, w, st)


if __name__ == "__main__":
    assert not A.INTERPRETED
    layer_norm()
    bias_act()
    attention()
    print(f"compiled {n_ok} kernels for sm_{ARCH}")
