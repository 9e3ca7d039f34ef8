"""Op benchmarks: msclip_fast ops vs their PyTorch (and installed third-party) peers.

For every op, forward and forward+backward time of each implementation on the same inputs,
with achieved TFLOP/s (attention, FFN: model FLOPs, backward = 2.5x forward for attention)
and GB/s (memory-bound ops: bytes that must be read and written at least once), and the
ratio ``peer time / ours`` (> 1: ours is faster). DESIGN §8.

Implementations (each is skipped with its reason when it cannot run):
  attention   ours: ops.attention(backend="triton") on CUDA (the reference on CPU);
              torch SDPA with each backend pinned (torch.nn.attention.sdpa_kernel: flash,
              efficient, cudnn, math); xformers memory_efficient_attention when installed.
              Packed (images B·50 + texts B·77 in one varlen call, texts causal) is compared
              with the unpacked alternative: two SDPA calls (one per modality).
  layer_norm  ours: ops.modality_layer_norm with the fused residual add over packed rows of
              two modalities; torch: x + r then F.layer_norm per modality slice (+ cat), and
              one F.layer_norm over all rows (a single-modality lower bound); apex
              FusedLayerNorm and Liger LayerNorm (single modality) when installed.
  bias_act    ours: ops.bias_act(backend="triton"); torch eager act(x + b).
  ffn         ours: ops.ffn (pre-activation stored once); torch eager Linear → act → Linear;
              also reports the peak memory of forward+backward on CUDA.

Shapes (CLIP, width 768, 12 heads of 64): image attention (B=1024, L=50), (256, 197),
(256, 257); causal text (1024, 77); packed 1024·50 + 1024·77 tokens. ``--smoke`` (default on
the CPU) runs tiny shapes only: CPU numbers say nothing about GPU speed.

Timing: ``triton.testing.do_bench`` (median, L2 flushed) on CUDA; ``torch.utils.benchmark``
(median of ``blocked_autorange``) on CPU.

    python bench/bench_ops.py --device cuda --json out.json          # CLIP shapes
    python bench/bench_ops.py --smoke --ops attention,layer_norm      # CPU smoke
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:  # bench/_common.py, bench/report.py
    sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
from msclip_fast import ops  # noqa: E402

OPS = ("attention", "layer_norm", "bias_act", "ffn")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Result:
    op: str
    case: str
    tag: str  # short case key used by the headline (e.g. "B32": image attention, 50 tokens)
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    ratio: float | None = None  # this impl's time / ours (> 1: ours faster)
    peak_mib: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """One input configuration with its implementations.

    ``impls``: name -> ``make(requires_grad) -> (fwd() -> outputs, grad_inputs)``; the first
    entry is ours. ``flops``/``bytes``: mode -> count (None: not reported).
    """

    op: str
    name: str
    impls: dict[str, Callable]
    flops: dict[str, float | None]
    bytes: dict[str, float | None]
    tag: str = ""


# ----------------------------------------------------------------------------- timing


def _time_ms(fn: Callable[[], object], device: str, min_run_time: float) -> float:
    """Median milliseconds of ``fn``; ``min_run_time`` <= 0 on the CPU: one timed call (the
    interpreted Triton path, where one call takes a second and its time means nothing)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if min_run_time <= 0:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import torch.utils.benchmark as benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _fwd_bwd(fwd: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        for t in inputs:
            t.grad = None
        out = fwd()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])

    return step


def _measure(case: Case, device: str, min_run_time: float, modes=("fwd", "fwd+bwd"),
             single_call_ours: bool = False) -> list[Result]:
    """Time every implementation of ``case`` in every mode; ``single_call_ours``: time ours
    by its first call alone, without warm-up (the CPU interpreter: a call takes seconds and
    its time means nothing; the point is that the GPU code path runs)."""
    results = []
    ours = next(iter(case.impls))
    for impl, make in case.impls.items():
        for mode in modes:
            r = Result(case.op, case.name, case.tag, impl, mode)
            try:
                grad = mode == "fwd+bwd"
                fwd, inputs = make(grad)
                if grad:
                    fn = _fwd_bwd(fwd, inputs)
                else:
                    def fn(fwd=fwd):
                        with torch.no_grad():
                            return fwd()
                if single_call_ours and impl == ours:
                    r.ms = _time_ms(fn, device, 0.0)
                else:
                    fn()  # compile / warm up, and fail here rather than inside the timer
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        fn()
                        torch.cuda.synchronize()
                        r.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                    r.ms = _time_ms(fn, device, min_run_time)
                fl, by = case.flops.get(mode), case.bytes.get(mode)
                if fl:
                    r.tflops = fl / (r.ms * 1e-3) / 1e12
                if by:
                    r.gbps = by / (r.ms * 1e-3) / 1e9
            except Exception as e:  # one failing peer must not stop the run
                r.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            finally:
                fwd = inputs = fn = None  # noqa: F841  free the inputs before the next impl
                if device == "cuda":
                    torch.cuda.empty_cache()
            results.append(r)
    for mode in modes:
        base = next((r.ms for r in results if r.impl == ours and r.mode == mode and r.ms), None)
        for r in results:
            if r.mode == mode and r.ms and base:
                r.ratio = r.ms / base
    return results


# ----------------------------------------------------------------------------- cases


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: (sdpa_kernel, getattr(SDPBackend, v)) for k, v in names.items() if hasattr(SDPBackend, v)}


def default_backend(device: str) -> str:
    """Ours: the Triton kernels on CUDA, and on the CPU when Triton's interpreter is on
    (``TRITON_INTERPRET=1``: the GPU code path runs, slowly); else "auto" (reference / C++)."""
    if device == "cuda":
        return "triton"
    from msclip_fast.ops._triton import interpreting, triton_available

    return "triton" if interpreting() and not triton_available() else "auto"


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def attention_cases(device, dtype, batch_scale: float, smoke: bool, backend: str) -> list[Case]:
    H, K = (2, 64) if smoke else (12, 64)
    shapes = (
        [("image B2 L50", 2, 50, False), ("text B2 L77 causal", 2, 77, True)]
        if smoke
        else [
            ("image B1024 L50", 1024, 50, False),
            ("image B256 L197", 256, 197, False),
            ("image B256 L257", 256, 257, False),
            ("text B1024 L77 causal", 1024, 77, True),
        ]
    )
    esize = torch.tensor([], dtype=dtype).element_size()
    cases = []
    sdpa = _sdpa_backends()
    tags = {50: "B32", 197: "B16", 257: "L257", 77: "text77"}
    for name, B, L, causal in shapes:
        B = max(1, int(B * batch_scale))

        def mk(grad, B=B, L=L):
            return [torch.randn(B, H, L, K, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]

        impls = {}

        def ours(grad, causal=causal, mk=mk):
            q, k, v = mk(grad)
            return (lambda: ops.attention(q, k, v, causal=causal, backend=backend)), [q, k, v]

        impls["ours"] = ours
        for bname, (ctx, be) in sdpa.items():
            if device == "cpu" and bname in ("cudnn", "efficient"):
                continue

            def peer(grad, causal=causal, mk=mk, ctx=ctx, be=be):
                q, k, v = mk(grad)

                def f():
                    with ctx(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                return f, [q, k, v]

            impls[f"sdpa-{bname}"] = peer
        if device == "cuda" and _common.installed("xformers"):
            def xf(grad, causal=causal, mk=mk):
                q, k, v = mk(grad)
                return (lambda: ops.attention(q, k, v, causal=causal, backend="xformers")), [q, k, v]

            impls["xformers"] = xf
        fwd_flops = 4.0 * B * H * L * L * K * (0.5 if causal else 1.0)
        n = B * H * L * K * esize
        cases.append(Case("attention", name, impls, {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops},
                          {"fwd": 4 * n, "fwd+bwd": 12 * n}, tag=tags[L]))
    # packed: images then texts, one varlen call with per-sequence causal flags
    Bp = 2 if smoke else max(1, int(1024 * batch_scale))
    Li, Lt = 50, 77
    T = Bp * (Li + Lt)
    lens = torch.tensor([Li] * Bp + [Lt] * Bp)
    cu = torch.zeros(2 * Bp + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.to(device)
    flags = torch.tensor([False] * Bp + [True] * Bp, device=device)

    def mkp(grad):
        return [torch.randn(T, H, K, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]

    # the packed batch knows its longest sequence on the host: pass it (no device sync per call)
    seqlen_kw = {"max_seqlen": max(Li, Lt)} if _accepts(ops.attention, "max_seqlen") else {}

    def packed_ours(grad):
        q, k, v = mkp(grad)
        return (lambda: ops.attention(q, k, v, cu_seqlens=cu, causal=flags, backend=backend, **seqlen_kw)), [q, k, v]

    def two_calls(ctx_be=None):
        def make(grad):
            q, k, v = mkp(grad)

            def f():
                outs = []
                for a, n_, L, c in ((0, Bp, Li, False), (Bp * Li, Bp, Lt, True)):
                    qi, ki, vi = (t[a:a + n_ * L].view(n_, L, H, K).transpose(1, 2) for t in (q, k, v))
                    if ctx_be is None:
                        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=c)
                    else:
                        with ctx_be[0](ctx_be[1]):
                            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=c)
                    outs.append(o.transpose(1, 2).reshape(n_ * L, H, K))
                return torch.cat(outs, 0)

            return f, [q, k, v]

        return make

    impls = {"ours": packed_ours, "sdpa-2calls": two_calls()}
    for bname in ("flash", "efficient"):
        if bname in sdpa and device == "cuda":
            impls[f"sdpa-{bname}-2calls"] = two_calls(sdpa[bname])
    fwd_flops = 4.0 * Bp * H * K * (Li * Li + 0.5 * Lt * Lt)
    n = T * H * K * esize
    cases.append(Case("attention", f"packed {Bp}x{Li}+{Bp}x{Lt} mixed causal", impls,
                      {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops}, {"fwd": 4 * n, "fwd+bwd": 12 * n},
                      tag="packed"))
    return cases


def layer_norm_cases(device, dtype, batch_scale: float, smoke: bool, backend: str) -> list[Case]:
    D = 768
    B = 2 if smoke else max(1, int(1024 * batch_scale))
    n_img, n_txt = B * 50, B * 77
    T = n_img + n_txt
    ids = torch.cat([torch.zeros(n_img, dtype=torch.int8), torch.ones(n_txt, dtype=torch.int8)]).to(device)
    esize = torch.tensor([], dtype=dtype).element_size()

    def mk(grad):
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=grad)
        r = torch.randn(T, D, device=device, dtype=dtype, requires_grad=grad)
        w = torch.randn(2, D, device=device, dtype=dtype, requires_grad=grad)
        b = torch.randn(2, D, device=device, dtype=dtype, requires_grad=grad)
        return x, r, w, b

    def ours(grad):
        x, r, w, b = mk(grad)
        return (lambda: ops.modality_layer_norm(x, w, b, ids, residual=r, backend=backend)), [x, r, w, b]

    def torch_two(grad):
        x, r, w, b = mk(grad)

        def f():
            s = x + r
            out = torch.cat([F.layer_norm(s[:n_img], (D,), w[0], b[0], 1e-12),
                             F.layer_norm(s[n_img:], (D,), w[1], b[1], 1e-12)])
            return out, s

        return f, [x, r, w, b]

    def torch_one(grad):
        x, r, w, b = mk(grad)

        def f():
            s = x + r
            return F.layer_norm(s, (D,), w[0], b[0], 1e-12), s

        return f, [x, r, w, b]

    impls = {"ours": ours, "torch add+2xLN+cat": torch_two, "torch add+LN (1 modality)": torch_one}
    if device == "cuda" and _common.installed("apex"):
        def apex_ln(grad):
            from apex.normalization import FusedLayerNorm

            x, r, _, _ = mk(grad)
            m = FusedLayerNorm(D, eps=1e-12).to(device=device, dtype=dtype)
            return (lambda: (m(x + r), x + r)), [x, r]

        impls["apex add+LN (1 modality)"] = apex_ln
    if device == "cuda" and _common.installed("liger_kernel"):
        def liger_ln(grad):
            from liger_kernel.transformers import LigerLayerNorm

            x, r, _, _ = mk(grad)
            m = LigerLayerNorm(D, eps=1e-12).to(device=device, dtype=dtype)
            return (lambda: (m(x + r), x + r)), [x, r]

        impls["liger add+LN (1 modality)"] = liger_ln
    n = T * D * esize
    # fwd: read x, r; write out, sum. bwd: read dy, dsum, sum; write dx (= dresidual)
    return [Case("layer_norm", f"packed {n_img}+{n_txt} rows x {D}, residual", impls,
                 {"fwd": None, "fwd+bwd": None}, {"fwd": 4 * n, "fwd+bwd": 8 * n}, tag="packed_residual")]


def _torch_act(h, act):
    if act == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    return F.gelu(h, approximate="tanh" if act == "gelu_tanh" else "none")


def bias_act_cases(device, dtype, batch_scale: float, smoke: bool, backend: str) -> list[Case]:
    N = 3072
    B = 2 if smoke else max(1, int(1024 * batch_scale))
    T = B * (50 + 77)
    esize = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for act in ("quick_gelu", "gelu"):
        def mk(grad):
            return (torch.randn(T, N, device=device, dtype=dtype, requires_grad=grad),
                    torch.randn(N, device=device, dtype=dtype, requires_grad=grad))

        def ours(grad, act=act, mk=mk):
            x, b = mk(grad)
            return (lambda: ops.bias_act(x, b, act=act, backend=backend)), [x, b]

        def eager(grad, act=act, mk=mk):
            x, b = mk(grad)
            return (lambda: _torch_act(x + b, act)), [x, b]

        n = T * N * esize
        cases.append(Case("bias_act", f"{act} {T}x{N}", {"ours": ours, "torch eager": eager},
                          {"fwd": None, "fwd+bwd": None}, {"fwd": 2 * n, "fwd+bwd": 5 * n}, tag=act))
    return cases


def ffn_cases(device, dtype, batch_scale: float, smoke: bool, backend: str) -> list[Case]:
    D, N = 768, 3072
    B = 2 if smoke else max(1, int(1024 * batch_scale))
    T = B * (50 + 77)

    def mk(grad):
        g = dict(device=device, dtype=dtype, requires_grad=grad)
        return (torch.randn(T, D, **g), torch.randn(N, D, **g) * 0.02, torch.randn(N, **g),
                torch.randn(D, N, **g) * 0.02, torch.randn(D, **g))

    def leaves(ts):
        return [t.detach().requires_grad_(t.requires_grad) for t in ts]

    def ours(grad):
        ins = leaves(mk(grad))
        return (lambda: ops.ffn(*ins, act="quick_gelu", backend=backend)), ins

    def eager(grad):
        x, w1, b1, w2, b2 = ins = leaves(mk(grad))
        return (lambda: F.linear(_torch_act(F.linear(x, w1, b1), "quick_gelu"), w2, b2)), ins

    fl = 2.0 * 2 * T * D * N
    return [Case("ffn", f"quick_gelu {T}x{D}->{N}->{D}", {"ours": ours, "torch eager": eager},
                 {"fwd": fl, "fwd+bwd": 3 * fl}, {"fwd": None, "fwd+bwd": None}, tag="quick_gelu")]


BUILDERS = {"attention": attention_cases, "layer_norm": layer_norm_cases, "bias_act": bias_act_cases, "ffn": ffn_cases}


# ----------------------------------------------------------------------------- report


def _line(r: Result) -> str:
    """One progress line of a result."""
    if r.ms is None:
        return f"{r.op} | {r.case} | {r.impl} | {r.mode} | not run: {r.error}"
    return (f"{r.op} | {r.case} | {r.impl} | {r.mode} | {r.ms:.3f} ms"
            + (f" | x ours {r.ratio:.2f}" if r.ratio else "") + (f" | {r.peak_mib:.0f} MiB" if r.peak_mib else ""))


PEERS = {  # op -> (headline peer name, does this impl count as that peer for case tag)
    "attention": ("sdpa", lambda impl, tag: impl.startswith("sdpa") and (("2calls" in impl) == (tag == "packed"))),
    "layer_norm": ("torch", lambda impl, tag: impl == "torch add+2xLN+cat"),
    "bias_act": ("torch", lambda impl, tag: impl == "torch eager"),
    "ffn": ("torch", lambda impl, tag: impl == "torch eager"),
}


def headline(results: list[Result]) -> dict:
    """``<op>_fwd_bwd_vs_<peer>_<tag>``: the fastest peer's fwd+bwd time / ours (> 1: ours is
    faster), e.g. ``attention_fwd_bwd_vs_sdpa_B32``; on CUDA also ``ffn_fwd_bwd_peak_mem_vs_torch``
    (peer peak MiB / ours)."""
    out = {}
    cases = dict.fromkeys((r.op, r.case, r.tag) for r in results if r.impl != "*")
    for op, case, tag in cases:
        rs = [r for r in results if r.op == op and r.case == case and r.mode == "fwd+bwd"]
        ours = next((r for r in rs if r.impl == "ours" and r.ms), None)
        peer_name, is_peer = PEERS[op]
        peers = [r for r in rs if r.impl != "ours" and r.ms and is_peer(r.impl, tag)]
        if not ours or not peers:
            continue
        out[f"{op}_fwd_bwd_vs_{peer_name}_{tag}"] = round(min(p.ms for p in peers) / ours.ms, 3)
        if op == "ffn" and ours.peak_mib and all(p.peak_mib for p in peers):
            out[f"ffn_fwd_bwd_peak_mem_vs_{peer_name}"] = round(min(p.peak_mib for p in peers) / ours.peak_mib, 3)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default=None,
                   help="backend of 'ours' (default: triton on CUDA; on the CPU triton under TRITON_INTERPRET=1, "
                        "else auto)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply the CLIP batch sizes (e.g. 0.25)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (implied on CPU)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per CPU measurement (0: one call)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def run(argv=None) -> tuple[list[Result], dict]:
    """Run the benchmark; returns the results and the JSON document (written to --json)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is unavailable")
    chosen = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in chosen if o not in OPS]
    if bad:
        p.error(f"--ops: unknown {bad}; choose from {OPS}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("fwd", "fwd+bwd") for m in modes):
        p.error(f"--modes: comma-separated fwd, fwd+bwd; got {args.modes!r}")
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    smoke = args.smoke or args.device == "cpu"
    backend = args.backend or default_backend(args.device)
    from msclip_fast.ops._triton import interpreting

    interpreted = args.device == "cpu" and backend == "triton" and interpreting()
    meta = _common.run_meta(args.device, "bench/bench_ops.py", sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results: list[Result] = []
    for op in chosen:
        for case in BUILDERS[op](args.device, dtype, args.batch_scale, smoke, backend):
            try:
                rs = _measure(case, args.device, args.min_run_time, modes, single_call_ours=interpreted)
            except Exception:
                traceback.print_exc()
                rs = [Result(case.op, case.name, case.tag, "*", "*", error="case failed (traceback above)")]
            results.extend(rs)
            for r in rs:
                print(_line(r), flush=True)
    failures = [f"{r.op} {r.case} {r.impl} {r.mode}: {r.error}" for r in results
                if r.error and r.impl in ("ours", "*")]
    settings = {"dtype": dtype_name, "smoke": smoke, "ops": chosen, "modes": list(modes), "backend": backend,
                "interpreter": interpreted, "batch_scale": args.batch_scale, "min_run_time": args.min_run_time,
                "total_s": round(time.perf_counter() - t0, 1)}
    rows = [{**asdict(r), **{k: _common.finite(getattr(r, k)) for k in ("ms", "tflops", "gbps", "ratio", "peak_mib")}}
            for r in results]
    # interpreter times are no measurement: no headline ratios from them
    doc = _common.payload("ops", meta, settings, rows, {} if interpreted else headline(results),
                          status="failed" if failures else "ok", failures=failures)
    if args.json:
        _common.write_json(args.json, doc)
    import report

    print()
    print(report.render_doc(doc, source=str(args.json) if args.json else None))
    return results, doc


def main(argv=None) -> int:
    """Exit status: 1 when one of ours failed (a peer that cannot run is only reported)."""
    _, doc = run(argv)
    if doc["failures"]:
        print("bench_ops: FAILED: " + "; ".join(doc["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
