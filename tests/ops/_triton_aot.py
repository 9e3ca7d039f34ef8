"""Compile every Triton kernel for an NVIDIA target without a GPU (run as a subprocess by
test_triton_compile.py, with TRITON_INTERPRET unset so ``triton.jit`` builds real kernels).

The interpreter accepts programs the compiler rejects (dynamic-if type mismatches, dot shapes,
shared-memory overflow); this checks the launch configurations the launchers really use, down
to ptxas, on a CPU-only machine. The launches are the launchers' own: they are called on fake
CUDA tensors and their kernels recorded and compiled by ``bench/kernel_report.py`` (which does
the same at CLIP shapes for the static report); here the shapes are the awkward ones (head dims
32/96/128, widths 8 and 100, fp16, every activation). Usage: python _triton_aot.py [ARCH=90]
"""
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench import kernel_report as kr  # noqa: E402

ARCH = int(sys.argv[1]) if len(sys.argv) > 1 else 90
SMEM_MAX = 227 * 1024
n_ok = 0


def compile_all(group: str, label: str, call) -> None:
    """Compile every launch ``call(module)`` makes for sm_ARCH; fail on too much shared memory."""
    global n_ok
    for launch in kr.record_calls(group, call):
        spec = kr._specialize(launch, ARCH)
        k = kr.compile_spec(spec, ARCH)
        cx, _ = kr._constexpr_names(spec)
        smem = k.metadata.shared
        where = f"{spec.fn.__name__} [{label}] {cx} warps={k.metadata.num_warps}"
        assert smem <= SMEM_MAX, f"{where}: {smem} bytes of shared memory"
        n_ok += 1
        print(f"ok {where} stages={spec.options.get('num_stages')} smem={smem}", flush=True)


def e(*shape, dtype, **kw):
    return torch.empty(*shape, dtype=dtype, device="cuda", **kw)


def layer_norm():
    for D, dt, packed in ((768, torch.bfloat16, True), (100, torch.float32, True), (8, torch.float16, False)):
        def call(LN, D=D, dt=dt, packed=packed):
            T = 333
            x, w, b = e(T, D, dtype=dt), e(2, D, dtype=dt), e(2, D, dtype=torch.float32)
            if packed:  # residual add, per-row modality ids, gradient of the sum
                ids = e(T, dtype=torch.int8)
                y, s, shift, rstd = LN.layer_norm_fwd(x, w, b, ids, 1e-5, e(T, D, dtype=dt))
                LN.layer_norm_bwd(torch.empty_like(y), s, w, ids, shift, rstd, torch.empty_like(s), max_programs=64)
            else:  # one modality for every row, no residual
                y, _, shift, rstd = LN.layer_norm_fwd(x, w, b, 1, 1e-5)
                LN.layer_norm_bwd(torch.empty_like(y), x, w, 1, shift, rstd, max_programs=64)
        compile_all("layer_norm", f"D={D} {dt}", call)


def bias_act():
    for act, dt, bias in (("quick_gelu", torch.float32, True), ("gelu", torch.bfloat16, True),
                          ("gelu_tanh", torch.bfloat16, False)):
        def call(BA, act=act, dt=dt, bias=bias):
            x = e(1000, 3072, dtype=dt)
            b = e(3072, dtype=dt) if bias else None
            BA.bias_act_fwd(x, b, act)
            BA.bias_act_bwd(torch.empty_like(x), x, b, act, max_row_programs=64)
        compile_all("bias_act", f"{act} {dt} bias={bias}", call)


def attention():
    # (head dim, dtype, layout, causal): batched (B, H, L, K) or packed varlen with per-sequence
    # causal flags (CAUSAL_MODE 2) or all causal (mode 1)
    for head_dim, dt, varlen, causal in ((64, torch.bfloat16, False, False), (64, torch.bfloat16, True, "flags"),
                                         (128, torch.float16, False, True), (32, torch.float32, True, True),
                                         (96, torch.bfloat16, True, "flags")):
        def call(A, head_dim=head_dim, dt=dt, varlen=varlen, causal=causal):
            H = 4
            if varlen:
                S, T, max_len = 5, 400, 197
                q, k, v = e(T, 3, H, head_dim, dtype=dt).unbind(1)
                cu = e(S + 1, dtype=torch.int32)
                c = e(S, dtype=torch.bool) if causal == "flags" else causal
                o, lse = A.attention_fwd(q, k, v, cu, c, None, max_len)
                A.attention_bwd(e(T, H, head_dim, dtype=dt), q, k, v, o, lse, cu, c, None, max_len)
            else:
                B, L = 3, 77
                q, k, v = e(B, L, 3, H, head_dim, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
                o, lse = A.attention_fwd(q, k, v, None, causal, None, L)
                A.attention_bwd(e(B, L, H, head_dim, dtype=dt).transpose(1, 2), q, k, v, o, lse, None, causal, None, L)
        compile_all("attention", f"head_dim={head_dim} {dt} varlen={varlen} causal={causal}", call)


def contrastive():
    for n, d, dt in ((4096, 512, torch.bfloat16), (1000, 100, torch.float32), (300, 1024, torch.float16)):
        def call(C, n=n, d=d, dt=dt):
            img, txt, scale = e(n, d, dtype=dt), e(n, d, dtype=dt), e(1, dtype=torch.float32)
            loss, lse_row, lse_col = C.contrastive_fwd(img, txt, scale)
            C.contrastive_bwd(img, txt, scale, lse_row, lse_col, e((), dtype=torch.float32))
        compile_all("contrastive", f"N={n} D={d} {dt}", call)


def sigmoid():
    # odd shapes only: kernel_report compiles the CLIP shape (N=4096, D=512) in every dtype
    for ni, nt, d, dt, neg in ((1000, 300, 100, torch.float32, True), (300, 300, 1024, torch.float16, False)):
        def call(S, ni=ni, nt=nt, d=d, dt=dt, neg=neg):
            img, txt = e(ni, d, dtype=dt), e(nt, d, dtype=dt)
            scale, bias = e(1, dtype=torch.float32), e(1, dtype=torch.float32)
            S.sigmoid_fwd(img, txt, scale, bias, neg)
            S.sigmoid_bwd(img, txt, scale, bias, e((), dtype=torch.float32), neg)
        compile_all("sigmoid_loss", f"N_I={ni} N_T={nt} D={d} {dt} negative_only={neg}", call)


if __name__ == "__main__":
    kr.prepare_env()
    assert not kr.kernel_module("attention").INTERPRETED
    import triton

    layer_norm()
    bias_act()
    attention()
    contrastive()
    sigmoid()
    print(f"compiled {n_ok} kernels for sm_{ARCH} (Triton {triton.__version__})")
