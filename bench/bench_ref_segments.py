"""Reference (plain-PyTorch, CPU) paths on a packed batch with ragged text: before and after.

- attention: forward+backward of the varlen reference on images (non-causal, fixed length)
  then texts (causal, each at its own length), and on the texts alone: ``per-sequence`` is
  the former path (one batched call per run of equal length and flag, so one call per ragged
  text), ``bucketed`` the current ``ops.attention(backend="reference")`` (a zero-copy call for
  the images; the ragged texts gathered, padded, into a few ``(n, H, Lmax, K)`` length
  buckets), ``pad-to-longest`` the current path with one bucket per run (every text padded to
  the longest).
- layer_norm: forward+backward of the modality LayerNorm reference with the fused residual
  on the same packed rows (images then texts, int8 ids): ``gather`` is the former path
  (``weight[ids]``, scatter-add backward), ``segmented`` the current one (one broadcast
  gain/bias per run of one modality).

Times are medians of interleaved repeats (the variants alternate, so a change of the load
on shared cores hits both); ``ratio`` = former / current (> 1: the current path is faster).

    python bench/bench_ref_segments.py                       # B=32, H=12, K=64, D=768, fp32
    python bench/bench_ref_segments.py --json bench/results/ref-segments-cpu.json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
from msclip_fast import ops  # noqa: E402

_att = sys.modules["msclip_fast.ops.attention"]  # the module (ops.attention is the function)


def text_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """Caption lengths in ``[lo, hi]``, skewed short like real captions (``lo + (hi-lo)·u²``:
    mean ``lo + (hi-lo)/3``, 16.7 for 5..40)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return (lo + torch.floor((hi - lo + 1) * u * u)).clamp(max=hi).long().tolist()


def per_sequence_attention(q, k, v, cu_seqlens, causal, scale=None):
    """The former varlen reference: one ``_dense`` call per run of consecutive sequences of
    equal length and flag (``varlen_groups``), i.e. one per ragged text."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bounds = cu_seqlens.tolist()
    flags = causal.tolist()
    H, K = q.shape[1], q.shape[2]
    outs = []
    for a, n, L, c in _att.varlen_groups(bounds, flags):
        qi, ki, vi = (t[a:a + n * L].reshape(n, L, H, K).transpose(1, 2) for t in (q, k, v))
        outs.append(_att._dense(qi, ki, vi, c, scale).transpose(1, 2).reshape(n * L, H, K))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def gather_layer_norm(x, weight, bias, ids, eps=1e-12, residual=None):
    """The former modality LayerNorm reference: ``weight[ids]`` / ``bias[ids]`` row gathers."""
    if residual is not None:
        x = x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    i = ids.long()
    out = (y * weight[i].to(acc) + bias[i].to(acc)).to(x.dtype)
    return (out, x) if residual is not None else out


def _median_ms(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _one_bucket(lens, width):
    """Every sequence of a ragged run padded to the run's longest (the variant the length
    buckets replaced)."""
    return [list(range(len(lens)))]


def attention_case(b_img, l_img, lens, H, K, dtype, repeats):
    """Former (per-sequence), pad-to-longest and current (bucketed) varlen reference, fwd+bwd;
    ``b_img = 0``: the text run alone."""
    cu = torch.tensor([0] + torch.tensor([l_img] * b_img + lens).cumsum(0).tolist(), dtype=torch.int32)
    flags = torch.tensor([False] * b_img + [True] * len(lens))
    T = int(cu[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, K, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    go = torch.randn(T, H, K, generator=g, dtype=dtype)

    def step(fn, buckets=None):
        def f():
            real = _att._length_buckets
            if buckets is not None:
                _att._length_buckets = buckets
            try:
                out = fn(q, k, v, cu, flags)
            finally:
                _att._length_buckets = real
            torch.autograd.grad(out, (q, k, v), go)
        return f

    def new(q, k, v, cu, c):
        return ops.attention(q, k, v, cu_seqlens=cu, causal=c, backend="reference")

    ms = _median_ms({"per-sequence": step(per_sequence_attention), "pad-to-longest": step(new, _one_bucket),
                     "bucketed": step(new)}, repeats)
    n_buckets = len(_att._length_buckets(lens, H * K))
    name = f"attention {b_img}x{l_img}+{len(lens)} texts" if b_img else f"attention {len(lens)} texts"
    return {"op": name, "rows": T, "former": "per-sequence", "former_ms": ms["per-sequence"],
            "pad_to_longest_ms": ms["pad-to-longest"], "current": f"bucketed({n_buckets})",
            "current_ms": ms["bucketed"], "ratio": ms["per-sequence"] / ms["bucketed"]}


def layer_norm_case(b_img, l_img, lens, D, dtype, repeats, residual: bool):
    n_img = b_img * l_img
    T = n_img + sum(lens)
    ids = torch.cat([torch.zeros(n_img, dtype=torch.int8), torch.ones(T - n_img, dtype=torch.int8)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, dtype=dtype).requires_grad_()
    r = torch.randn(T, D, generator=g, dtype=dtype).requires_grad_() if residual else None
    w = torch.randn(2, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(2, D, generator=g, dtype=dtype).requires_grad_()
    go = torch.randn(T, D, generator=g, dtype=dtype)
    leaves = (x, w, b) + ((r,) if residual else ())

    def step(fn):
        def f():
            out = fn(x, w, b, ids, 1e-12, r)
            o = out[0] if residual else out
            torch.autograd.grad(o, leaves, go)
        return f

    def new(x, w, b, i, e, r):
        return ops.modality_layer_norm(x, w, b, i, eps=e, residual=r, backend="reference")

    ms = _median_ms({"gather": step(gather_layer_norm), "segmented": step(new)}, repeats)
    return {"op": "layer_norm" + ("+residual" if residual else ""), "rows": T, "former": "gather",
            "former_ms": ms["gather"], "current": "segmented", "current_ms": ms["segmented"],
            "ratio": ms["gather"] / ms["segmented"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images and texts per batch (each)")
    p.add_argument("--image-len", type=int, default=50)
    p.add_argument("--text-len", default="5,40", help="lo,hi of the ragged caption lengths")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--width", type=int, default=768, help="LayerNorm width D")
    p.add_argument("--dtype", choices=("fp32", "fp64", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    lo, hi = (int(s) for s in args.text_len.split(","))
    lens = text_lengths(args.batch, lo, hi, seed=0)
    meta = _common.run_meta("cpu", "bench/bench_ref_segments.py", argv)
    rows = [
        attention_case(args.batch, args.image_len, lens, args.heads, args.head_dim, dtype, args.repeats),
        attention_case(0, args.image_len, lens, args.heads, args.head_dim, dtype, args.repeats),
        layer_norm_case(args.batch, args.image_len, lens, args.width, dtype, args.repeats, residual=False),
        layer_norm_case(args.batch, args.image_len, lens, args.width, dtype, args.repeats, residual=True),
    ]
    settings = {"batch": args.batch, "image_len": args.image_len, "text_lengths": lens,
                "mean_text_len": sum(lens) / len(lens), "heads": args.heads, "head_dim": args.head_dim,
                "width": args.width, "dtype": args.dtype, "repeats": args.repeats,
                "torch_threads": torch.get_num_threads()}
    print(f"reference paths, CPU, {args.dtype}: {args.batch} images x {args.image_len} + {args.batch} texts of "
          f"{lo}..{hi} tokens (mean {settings['mean_text_len']:.1f}); H={args.heads} K={args.head_dim} "
          f"D={args.width}; {torch.get_num_threads()} threads; median of {args.repeats}, fwd+bwd")
    print(f"{'op':<30}{'rows':>6}  {'former':<13}{'ms':>8}  {'pad-to-longest ms':>17}  {'current':<12}{'ms':>8}"
          f"  {'ratio':>6}")
    for r in rows:
        pad = r.get("pad_to_longest_ms")
        pad = "" if pad is None else f"{pad:.2f}"
        print(f"{r['op']:<30}{r['rows']:>6}  {r['former']:<13}{r['former_ms']:>8.2f}  {pad:>17}  "
              f"{r['current']:<12}{r['current_ms']:>8.2f}  {r['ratio']:>5.2f}x")
    doc = _common.payload("ref_segments", meta, settings, rows, {r["op"]: round(r["ratio"], 3) for r in rows})
    if args.json:
        _common.write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
