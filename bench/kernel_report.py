"""Static kernel report: every Triton kernel variant the GPU path launches at CLIP shapes,
compiled for sm_90 on this (CPU-only) machine, with ptxas's resource usage and the occupancy
it implies on an H100/H200.

Usage::

    python -m bench.kernel_report [--json PATH] [--write [bench/RESULTS.md]] [--check]
                                  [--dtypes bf16,fp32[,fp16]] [--arch 90] [--compare JSON]
                                  [--expect-triton 3.6] [--jobs N] [--quiet]

``make kernel-report`` (a prerequisite of ``make test``) runs ``--check``; ``make triton36-check``
does the same with Triton 3.6 (the device machine's) shadowing the venv's through PYTHONPATH.
RESULTS.md is refreshed by hand: ``make triton36-check`` then
``python -m bench.kernel_report --write --compare build/kernel_report_triton36.json``.

How the variants are found: the report calls the launchers of ``kernels/`` (``attention_fwd``,
``layer_norm_bwd``, ...) on fake CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes,
strides and dtypes, no memory, no GPU) at CLIP shapes, with every ``@triton.jit`` kernel of the
module replaced by a recorder. So the configuration of each launch (tiles, warps, stages,
``EMULATE``/``DOT_F32``, ``PREC``, layout flags) is whatever the launcher's own config function
chose, whatever shape its return value has (tuple or NamedTuple). Each recorded launch is then
specialized exactly as ``JITFunction.run`` would (Triton's own binder: ``do_not_specialize``,
16-byte divisibility of pointers and ints, ints equal to 1 folded to constants) and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", ARCH, 32))``, the PTX through
Triton's bundled ``ptxas -v``.

Shapes (CLIP): ViT-B/32 (50 image tokens), ViT-B/16 (197), text 77 (causal), width 768,
12 heads of 64, FFN 3072 (QuickGELU), embedding 512 for the loss; attention batched
``(B, H, L, K)`` as ``modules/attention.py`` lays it out and packed varlen with a per-sequence
causal flag (``CAUSAL_MODE=2``, images and texts in one launch, ``max_seqlen`` 77 or 197).

Per compiled variant the report gives: registers per thread, spill store/load bytes and stack
frame (``ptxas -v``), shared memory (Triton's ``metadata.shared``, dynamic, plus ptxas's static
``bytes smem``, normally 0), whether the PTX uses tensor cores (``wgmma.mma_async`` or
``mma.sync``), whether the kernel has a ``tl.dot`` at all (``tt.dot`` in its TTIR), and:

Occupancy on sm_90 (H100/H200; the rules of CUDA's ``cuda_occupancy.h``)::

    W  = num_warps (warps per block), T = 32 W threads
    regs_per_warp   = ceil(regs * 32 / 256) * 256            # allocation unit: 256 regs per warp
    block fits      : regs_per_warp * ceil(W / 4) * 4 <= 65536 and smem_block <= 227 KiB
    blocks_regs     = floor(4 * floor(16384 / regs_per_warp) / W)   # 4 sub-partitions of 16384
    smem_alloc      = ceil((smem_block + 1 KiB reserved) / 128) * 128
    blocks_smem     = floor(228 KiB / smem_alloc)
    blocks_threads  = floor(2048 / T)
    blocks_per_sm   = min(32, blocks_regs, blocks_smem, blocks_threads)
    occupancy       = blocks_per_sm * W / 64                 # resident warps / 64 warp slots

``--check`` exits 1 when a bf16 kernel at a CLIP shape spills (spill stores or loads > 0), or
contains a ``tl.dot`` and uses no tensor-core instruction; and, for every dtype, when a variant
cannot launch (over 227 KiB of shared memory, or 0 blocks per SM), runs the CPU emulation
(``EMULATE``/``DOT_F32`` true) on the GPU, or does not compile. fp32 rows are reported, not gated.

The Triton cache is ``build/triton_cache_report`` unless ``TRITON_CACHE_DIR`` is set; ptxas
results are cached next to it (keyed by the PTX and the ptxas binary). Works with Triton 3.6
and 3.8 (the APIs used are the same in both; see ``_specialize`` for the fallback).
This module imports torch and triton only inside functions, so its parser and occupancy
functions can be imported (tests) without them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/_common.py (no torch import)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "kernel_report"
BEGIN, END = _common.markers(NAME)
DEFAULT_CACHE = ROOT / "build" / "triton_cache_report"
DEFAULT_RESULTS = ROOT / "bench" / "RESULTS.md"

# H100 / H200 (compute capability 9.0) per-SM limits used by :func:`occupancy`
SM90 = dict(
    regs_per_sm=65536, reg_alloc_unit=256, sub_partitions=4, max_regs_per_block=65536,
    smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_block=1024, smem_alloc_unit=128,
    max_threads_per_sm=2048, max_blocks_per_sm=32, max_warps_per_sm=64, warp_size=32,
)
N_SMS = 132  # H100 SXM / H200: the launchers' "programs = k x SMs" caps are passed explicitly
GATED_DTYPES = ("bf16",)
DTYPES = ("bf16", "fp16", "fp32")
# the GPU path's numerics switch, under its old and new name (CPU interpreter emulation)
EMULATE_NAMES = ("EMULATE", "DOT_F32")


# ----------------------------------------------------------------------------- pure helpers


def _ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, smem: int, num_warps: int, limits: dict | None = None) -> dict:
    """Resident blocks and warps per SM for a kernel using ``regs`` registers per thread and
    ``smem`` bytes of shared memory per block (static + dynamic), launched with ``num_warps``
    warps per block (the formula in the module docstring).

    Returns:
        ``dict(blocks_per_sm, warps_per_sm, occupancy, limiter, regs_per_warp,
        blocks_regs, blocks_smem, blocks_threads)``; ``limiter`` names the binding limit
        ("registers", "smem", "threads", "blocks") or why nothing fits ("regs/block",
        "smem/block").
    """
    L = dict(SM90, **(limits or {}))
    w = int(num_warps)
    if w < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    regs = max(int(regs), 1)
    regs_per_warp = _ceil_to(regs * L["warp_size"], L["reg_alloc_unit"])
    per_sub = L["regs_per_sm"] // L["sub_partitions"]
    if regs_per_warp * _ceil_to(w, L["sub_partitions"]) > L["max_regs_per_block"]:
        blocks_regs = 0
    else:
        blocks_regs = (per_sub // regs_per_warp) * L["sub_partitions"] // w
    if smem > L["smem_per_block"]:
        blocks_smem = 0
    else:
        alloc = _ceil_to(int(smem) + L["smem_reserved_per_block"], L["smem_alloc_unit"])
        blocks_smem = L["smem_per_sm"] // alloc
    blocks_threads = L["max_threads_per_sm"] // (w * L["warp_size"])
    limits_by = {"registers": blocks_regs, "smem": blocks_smem, "threads": blocks_threads,
                 "blocks": L["max_blocks_per_sm"]}
    blocks = min(limits_by.values())
    if blocks_regs == 0 and regs_per_warp * _ceil_to(w, L["sub_partitions"]) > L["max_regs_per_block"]:
        limiter = "regs/block"
    elif smem > L["smem_per_block"]:
        limiter = "smem/block"
    else:
        # the first binding limit, in a fixed order of preference
        limiter = next(k for k in ("registers", "smem", "threads", "blocks") if limits_by[k] == blocks)
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * w, occupancy=blocks * w / L["max_warps_per_sm"],
                limiter=limiter, regs_per_warp=regs_per_warp, blocks_regs=blocks_regs,
                blocks_smem=blocks_smem, blocks_threads=blocks_threads)


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
_RE_SPILL_ST = re.compile(r"(\d+) bytes spill stores")
_RE_SPILL_LD = re.compile(r"(\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(log: str, kernel: str | None = None) -> dict:
    """Resource usage of one entry function from ``ptxas -v`` output.

    Args:
        log: ptxas's stdout+stderr (``ptxas info : Used 64 registers, ...`` lines).
        kernel: the entry function; None takes the first (Triton's PTX holds one).
    Returns:
        ``dict(kernel, registers, spill_stores, spill_loads, stack_frame, smem_static,
        barriers)`` (bytes; absent figures are 0).
    Raises:
        ValueError: no such entry function, or no "Used N registers" line for it.
    """
    # split into per-entry chunks: from "Compiling entry function 'X'" to the next one
    starts = [(m.start(), m.group(1)) for m in _RE_ENTRY.finditer(log)]
    if not starts:
        raise ValueError("no 'Compiling entry function' line in the ptxas output:\n" + log[-2000:])
    chunks = {name: log[pos:(starts[i + 1][0] if i + 1 < len(starts) else len(log))]
              for i, (pos, name) in enumerate(starts)}
    name = kernel if kernel is not None else starts[0][1]
    if name not in chunks:
        raise ValueError(f"entry function {name!r} not in the ptxas output (found {sorted(chunks)})")
    chunk = chunks[name]
    # the entry's own "Function properties" block (device functions, if any, have their own)
    props = chunk
    for m in _RE_PROPS.finditer(chunk):
        if m.group(1) == name:
            props = chunk[m.end():]
            break
    regs = _RE_REGS.search(chunk)
    if regs is None:
        raise ValueError(f"no 'Used N registers' line for {name!r}:\n{chunk[-2000:]}")

    def first(rx, text):
        m = rx.search(text)
        return int(m.group(1)) if m else 0

    return dict(kernel=name, registers=int(regs.group(1)), spill_stores=first(_RE_SPILL_ST, props),
                spill_loads=first(_RE_SPILL_LD, props), stack_frame=first(_RE_STACK, props),
                smem_static=first(_RE_SMEM, chunk), barriers=first(_RE_BARRIERS, chunk))


def tensor_core_ops(ptx: str) -> str:
    """"wgmma" (Hopper warpgroup MMA), "mma.sync" (Ampere-style MMA) or "none"."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def ptx_target(ptx: str) -> str:
    """The architecture of the PTX ``.target`` line (``sm_90a``)."""
    m = re.search(r"^\s*\.target\s+([A-Za-z0-9_]+)", ptx, flags=re.MULTILINE)
    if not m:
        raise ValueError("no .target line in the PTX")
    return m.group(1)


def check_failures(row: dict) -> list[str]:
    """Why ``row`` fails ``--check`` (empty: it passes). bf16 rows: spills, or a ``tl.dot``
    without tensor-core instructions. Every dtype: compile errors, shared memory over the
    per-block limit, no block fits on an SM, GPU launches that run the CPU emulation."""
    if row.get("error"):
        return [f"does not compile: {row['error'].splitlines()[0][:200]}"]
    why = []
    if row["smem_total"] > SM90["smem_per_block"]:
        why.append(f"{row['smem_total']} bytes of shared memory > 227 KiB per block")
    if row["blocks_per_sm"] == 0:
        why.append(f"no block fits on an SM ({row['limiter']})")
    if row.get("emulate"):
        why.append("EMULATE/DOT_F32 is true on the GPU (CPU-interpreter numerics)")
    if row["dtype"] in GATED_DTYPES:
        if row["spill_stores"] > 0 or row["spill_loads"] > 0:
            why.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
        if row["has_dot"] and row["tensor_cores"] == "none":
            why.append("tl.dot without tensor-core instructions (no wgmma/mma in the PTX)")
    return why


def would_fail_ungated(row: dict) -> list[str]:
    """The bf16 gates applied to a row of another dtype (reported, not enforced)."""
    if row.get("error") or row["dtype"] in GATED_DTYPES:
        return []
    return check_failures(dict(row, dtype=GATED_DTYPES[0], emulate=False, smem_total=0, blocks_per_sm=1))


# ----------------------------------------------------------------------------- environment


def prepare_env() -> None:
    """Compile for real (no interpreter) and keep the cache under build/ unless set. Must run
    before the kernels are imported; refuses if they were already built for the interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", str(DEFAULT_CACHE))
    for name in ("attention", "layer_norm", "bias_act", "contrastive", "sigmoid_loss"):
        mod = sys.modules.get(f"msclip_fast.kernels.{name}") or sys.modules.get(f"kernels.{name}")
        if mod is not None and getattr(mod, "INTERPRETED", False):
            raise RuntimeError("the Triton kernels were imported under TRITON_INTERPRET=1 in this process; "
                               "run the report in a fresh process")


def kernel_module(name: str):
    prepare_env()
    from msclip_fast.ops._triton import kernels

    return kernels(name)


def triton_version() -> str:
    import triton

    return triton.__version__


def ptxas_path(arch: int = 90) -> str:
    """Triton's bundled ptxas (``triton.backends.nvidia.compiler.get_ptxas``; older layouts:
    ``knobs.nvidia.ptxas``, then the wheel's bin/ folder)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        pass
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        pass
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if p.exists():
        return str(p)
    found = shutil.which("ptxas")
    if found:
        return found
    raise FileNotFoundError("ptxas not found (triton's bundled one is missing)")


def ptxas_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\S+), V(\S+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


# ----------------------------------------------------------------------------- launch capture


class TensorArg:
    """What a launch needs of a tensor to be specialized: dtype and address alignment (the
    storage offset of the fake tensor; allocations themselves are 256-byte aligned)."""

    def __init__(self, dtype, ptr: int = 0):
        self.dtype = dtype
        self._ptr = int(ptr)

    def data_ptr(self) -> int:
        return self._ptr

    def __repr__(self):
        return f"TensorArg({self.dtype}, ptr%16={self._ptr % 16})"


def _to_arg(x):
    import torch

    if isinstance(x, torch.Tensor):
        return TensorArg(x.dtype, x.storage_offset() * x.element_size())
    return x


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    fn: Any  # the JITFunction
    grid: Any
    args: tuple
    kwargs: dict
    config: str = ""  # autotuner config, if any


class _Recorder:
    def __init__(self, kernel, sink: list):
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args = tuple(_to_arg(a) for a in args)
            kwargs = {k: _to_arg(v) for k, v in kwargs.items()}
            for fn, kw, label in _expand(self.kernel, kwargs):
                self.sink.append(Launch(fn, grid, args, kw, label))
        return launch

    def __call__(self, *args, **kwargs):  # a device function called from Python: not a launch
        raise RuntimeError(f"{self.kernel} called outside a kernel")


def _expand(kernel, kwargs):
    """(JITFunction, kwargs, label) for a launched object: a JITFunction, or an Autotuner
    (one entry per config, unpruned)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return [(kernel, kwargs, "")]
    configs = getattr(kernel, "configs", None)
    inner = getattr(kernel, "fn", None)
    if configs is not None and inner is not None:
        out = []
        for cfg in configs:
            extra = cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else dict(
                cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            for fn, kw, label in _expand(inner, {**kwargs, **extra}):
                out.append((fn, kw, str(cfg)))
        return out
    raise TypeError(f"cannot expand launches of {type(kernel).__name__} (not a JITFunction or Autotuner)")


@contextlib.contextmanager
def capture(module):
    """Within the block every ``@triton.jit``/autotuned kernel of ``module`` records its
    launches into the yielded list instead of running; the module is restored after."""
    from triton.runtime.jit import KernelInterface

    sink: list[Launch] = []
    saved = {k: v for k, v in vars(module).items() if isinstance(v, KernelInterface)}
    try:
        for k, v in saved.items():
            setattr(module, k, _Recorder(v, sink))
        yield sink
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


@contextlib.contextmanager
def fake_cuda():
    """Tensors created inside are fake CUDA tensors (no GPU, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        yield


# ----------------------------------------------------------------------------- CLIP cases


@dataclasses.dataclass
class Case:
    """One op at one CLIP shape: ``run(module, dtype)`` calls the launchers (under
    :func:`fake_cuda` and :func:`capture`)."""

    group: str  # kernel module: attention, layer_norm, bias_act, contrastive, sigmoid_loss
    shape: str  # human label
    run: Callable
    dtypes: tuple | None = None  # only for these io dtypes (None: all)
    optional: bool = False  # a launcher that refuses it (ValueError/TypeError) is noted, not an error


IMAGES = TEXTS = 128  # per-GPU batch: only the divisibility of sizes and strides matters
HEADS, HEAD_DIM, WIDTH, FFN, EMBED, TEXT_LEN, MODALITIES = 12, 64, 768, 3072, 512, 77, 2
LOSS_N = 4096


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attention_batched(A, dtype, L, causal, heads=HEADS, head_dim=HEAD_DIM, batch=IMAGES):
    """Forward + backward as ``modules/attention.py`` calls them: q/k/v are views of one
    ``(B, L, 3, H, K)`` projection, ``do`` a transposed view of a ``(B, L, H, K)`` gradient."""
    import torch

    qkv = torch.empty(batch, L, 3, heads, head_dim, dtype=dtype, device="cuda")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o, lse = A.attention_fwd(q, k, v, None, causal, None, L)
    do = torch.empty(batch, L, heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    A.attention_bwd(do, q, k, v, o, lse, None, causal, None, L)


def attention_packed(A, dtype, image_len, text_len=TEXT_LEN, heads=HEADS, head_dim=HEAD_DIM,
                     images=IMAGES, texts=TEXTS):
    """Packed varlen (``modules/packing.py``): images then texts, per-sequence causal flags."""
    import torch

    T = images * image_len + texts * text_len
    qkv = torch.empty(T, 3, heads, head_dim, dtype=dtype, device="cuda")
    q, k, v = qkv.unbind(1)
    cu = torch.empty(images + texts + 1, dtype=torch.int32, device="cuda")
    causal = torch.empty(images + texts, dtype=torch.bool, device="cuda")
    max_len = max(image_len, text_len)
    o, lse = A.attention_fwd(q, k, v, cu, causal, None, max_len)
    do = torch.empty(T, heads, head_dim, dtype=dtype, device="cuda")
    A.attention_bwd(do, q, k, v, o, lse, cu, causal, None, max_len)


def layer_norm_packed(LN, dtype, width=WIDTH, tokens=IMAGES * 50 + TEXTS * TEXT_LEN, modalities=MODALITIES):
    """Fused residual add + modality-indexed LayerNorm over a packed batch, and its backward
    (weights in the io dtype, as a bf16 model holds them)."""
    import torch

    x = torch.empty(tokens, width, dtype=dtype, device="cuda")
    r = torch.empty(tokens, width, dtype=dtype, device="cuda")
    w = torch.empty(modalities, width, dtype=dtype, device="cuda")
    b = torch.empty(modalities, width, dtype=dtype, device="cuda")
    ids = torch.empty(tokens, dtype=torch.int8, device="cuda")
    y, s, shift, rstd = LN.layer_norm_fwd(x, w, b, ids, 1e-5, r)
    LN.layer_norm_bwd(torch.empty_like(y), s, w, ids, shift, rstd, torch.empty_like(s), max_programs=4 * N_SMS)


def layer_norm_autocast(LN, dtype, width=WIDTH, tokens=IMAGES * 50 + TEXTS * TEXT_LEN, modalities=MODALITIES):
    """Under autocast the residual stream stays fp32 while the update ``x`` is 16-bit: the fused
    residual LayerNorm reads both (the sum and output are fp32)."""
    import torch

    x = torch.empty(tokens, width, dtype=dtype, device="cuda")
    r = torch.empty(tokens, width, dtype=torch.float32, device="cuda")
    w = torch.empty(modalities, width, dtype=torch.float32, device="cuda")
    b = torch.empty(modalities, width, dtype=torch.float32, device="cuda")
    ids = torch.empty(tokens, dtype=torch.int8, device="cuda")
    y, s, shift, rstd = LN.layer_norm_fwd(x, w, b, ids, 1e-5, r)
    LN.layer_norm_bwd(torch.empty_like(y), s, w, ids, shift, rstd, torch.empty_like(s), max_programs=4 * N_SMS)


def bias_act_ffn(BA, dtype, hidden=FFN, rows=IMAGES * 50 + TEXTS * TEXT_LEN, act="quick_gelu"):
    """``quick_gelu(x W1ᵀ + b1)`` of the FFN and its backward."""
    import torch

    x = torch.empty(rows, hidden, dtype=dtype, device="cuda")
    bias = torch.empty(hidden, dtype=dtype, device="cuda")
    BA.bias_act_fwd(x, bias, act)
    BA.bias_act_bwd(torch.empty_like(x), x, bias, act, max_row_programs=2 * N_SMS)


def contrastive_loss(C, dtype, d=EMBED, n=LOSS_N):
    """The fused InfoNCE loss forward and backward on ``(N, D)`` image/text embeddings."""
    import torch

    img = torch.empty(n, d, dtype=dtype, device="cuda")
    txt = torch.empty(n, d, dtype=dtype, device="cuda")
    scale = torch.empty(1, dtype=torch.float32, device="cuda")
    loss, lse_row, lse_col = C.contrastive_fwd(img, txt, scale)
    C.contrastive_bwd(img, txt, scale, lse_row, lse_col, torch.empty((), dtype=torch.float32, device="cuda"))


def sigmoid_loss(S, dtype, d=EMBED, n=LOSS_N):
    """The fused sigmoid (SigLIP) loss forward and backward on ``(N, D)`` image/text embeddings."""
    import torch

    img = torch.empty(n, d, dtype=dtype, device="cuda")
    txt = torch.empty(n, d, dtype=dtype, device="cuda")
    scale = torch.empty(1, dtype=torch.float32, device="cuda")
    bias = torch.empty(1, dtype=torch.float32, device="cuda")
    S.sigmoid_fwd(img, txt, scale, bias, False)
    S.sigmoid_bwd(img, txt, scale, bias, torch.empty((), dtype=torch.float32, device="cuda"), False)


CLIP_CASES = [
    Case("attention", "B/32 image L=50", lambda A, dt: attention_batched(A, dt, 50, False)),
    Case("attention", "B/16 image L=197", lambda A, dt: attention_batched(A, dt, 197, False)),
    Case("attention", "text L=77 causal", lambda A, dt: attention_batched(A, dt, TEXT_LEN, True)),
    Case("attention", "packed B/32 varlen max 77", lambda A, dt: attention_packed(A, dt, 50)),
    Case("attention", "packed B/16 varlen max 197", lambda A, dt: attention_packed(A, dt, 197)),
    Case("layer_norm", "width 768 +residual, ids", lambda LN, dt: layer_norm_packed(LN, dt)),
    Case("layer_norm", "width 768 +fp32 residual (autocast), ids", lambda LN, dt: layer_norm_autocast(LN, dt),
         dtypes=("bf16", "fp16"), optional=True),
    Case("bias_act", "FFN 3072 quick_gelu", lambda BA, dt: bias_act_ffn(BA, dt)),
    Case("contrastive", "embed 512, N=4096", lambda C, dt: contrastive_loss(C, dt)),
    Case("sigmoid_loss", "embed 512, N=4096", lambda S, dt: sigmoid_loss(S, dt)),
]


def record_calls(group: str, call: Callable) -> list[Launch]:
    """The launches ``call(module)`` makes, ``module`` being ``kernels/<group>.py``, run on
    fake CUDA tensors with the module's kernels recording instead of running."""
    mod = kernel_module(group)
    with capture(mod) as launches, fake_cuda():
        call(mod)
    if not launches:
        raise RuntimeError(f"{group}: the launchers launched nothing")
    return launches


def record(cases: Iterable[Case], dtypes: Iterable[str], notes: list | None = None) -> list[tuple[Case, str, Launch]]:
    """Run every case's launchers on fake CUDA tensors; (case, dtype, launch) per launch. An
    optional case that the launchers refuse is described in ``notes`` instead."""
    out = []
    for dt in dtypes:
        for case in cases:
            if case.dtypes is not None and dt not in case.dtypes:
                continue
            try:
                launches = record_calls(case.group, lambda mod: case.run(mod, _torch_dtype(dt)))
            except (ValueError, TypeError) as e:
                if not case.optional:
                    raise
                if notes is not None:
                    notes.append(f"{case.group} [{case.shape}] {dt}: not launched ({type(e).__name__}: {e})")
                continue
            out.extend((case, dt, ln) for ln in launches)
    return out


# ----------------------------------------------------------------------------- compile


@dataclasses.dataclass
class Spec:
    """A launch specialized as ``JITFunction.run`` would: the ``ASTSource`` arguments."""

    fn: Any
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    how: str  # "jit-binder" (Triton's own) or "fallback"

    def key(self) -> str:
        def enc(d):
            return sorted((str(k), repr(v)) for k, v in d.items())

        opts = {k: v for k, v in self.options.items() if k != "extern_libs"}
        return json.dumps([self.fn.__module__, self.fn.__name__, enc(self.signature), enc(self.constexprs),
                           enc(self.attrs), enc(opts)], default=str)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _specialize(launch: Launch, arch: int = 90) -> Spec:
    """Specialize with Triton's own binder (``create_function_from_signature`` + the kernel's
    ``_pack_args``, the path ``JITFunction.run`` takes, identical in 3.6 and 3.8); if those
    internals are missing, a plain equivalent: pointers and ints divisible by 16 get
    ``tt.divisibility``, ints equal to 1 become constants, unless ``do_not_specialize``."""
    fn, kwargs = launch.fn, dict(launch.kwargs)
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(_target(arch))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
        return Spec(fn, signature, constexprs, attrs, dict(options.__dict__), "jit-binder")
    except (ImportError, AttributeError, TypeError):
        pass
    return _specialize_fallback(launch)


def _specialize_fallback(launch: Launch) -> Spec:
    import torch

    fn = launch.fn
    names = list(fn.arg_names)
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    dns = set()
    dns_align = set()
    for p in getattr(fn, "params", []):
        if getattr(p, "do_not_specialize", False):
            dns.add(p.name)
        if getattr(p, "do_not_specialize_on_alignment", False):
            dns_align.add(p.name)
    constexpr_names = {names[i] for i in getattr(fn, "constexprs", [])}
    tnames = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
              torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
    sig, cx, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = values[n]
        if n in constexpr_names:
            sig[n], cx[(i,)] = "constexpr", v
        elif hasattr(v, "data_ptr"):
            sig[n] = "*" + tnames[v.dtype]
            if n not in dns_align and v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            if v == 1 and n not in dns:
                sig[n], cx[(i,)] = "constexpr", 1
                continue
            sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
            if n not in dns and n not in dns_align and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {n}={v!r}")
    opts = {k: v for k, v in launch.kwargs.items() if k not in names}
    return Spec(fn, sig, cx, attrs, opts, "fallback")


def compile_spec(spec: Spec, arch: int = 90):
    """``triton.compile`` of a specialized launch for ``sm_<arch>``; the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    return triton.compile(src, target=_target(arch), options=spec.options)


def compile_kernel(fn, constexprs: dict, ptrs: dict, num_warps: int = 4, num_stages: int = 2,
                   arch: int = 90, floats: Iterable[str] = ("eps", "qk_scale", "sm_scale")):
    """Compile ``fn`` from explicit constexprs and pointer types (ints i32, ``floats`` fp32, no
    specialization attributes): for checks of configurations no launcher produces."""
    sig = {n: ("constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in floats else "i32"))
           for n in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return compile_spec(Spec(fn, sig, cx, {}, dict(num_warps=num_warps, num_stages=num_stages), "explicit"), arch)


def _ptxas_report(ptx: str, kernel: str, ptxas: str, cache_dir: Path) -> dict:
    """``ptxas -v --gpu-name=<PTX target>`` of ``ptx``, parsed (cached by PTX and ptxas)."""
    arch = ptx_target(ptx)
    flags = ["-v", f"--gpu-name={arch}"]
    key = hashlib.sha256("\0".join([ptx, os.path.realpath(ptxas), str(os.path.getsize(ptxas)), *flags])
                         .encode()).hexdigest()
    cached = cache_dir / f"{key}.json"
    if cached.exists():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        p = subprocess.run([ptxas, *flags, str(src), "-o", str(Path(tmp) / "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = parse_ptxas(p.stdout + p.stderr, kernel)
    res["ptxas_arch"] = arch
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmpf = cached.with_suffix(f".{os.getpid()}.tmp")
    tmpf.write_text(json.dumps(res))
    os.replace(tmpf, cached)
    return res


def _cubin_registers(cubin: bytes | None, ptxas: str) -> int | None:
    """Registers per thread of Triton's own cubin (``cuobjdump --dump-resource-usage``, bundled
    next to ptxas): a cross-check that the separate ``ptxas -v`` run matches the real build."""
    tool = Path(ptxas).with_name("cuobjdump")
    if not cubin or not tool.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        p = subprocess.run([str(tool), "--dump-resource-usage", str(f)], capture_output=True, text=True, timeout=60)
    m = re.search(r"REG:(\d+)", p.stdout)
    return int(m.group(1)) if p.returncode == 0 and m else None


def measure(spec: Spec, arch: int = 90, ptxas: str | None = None) -> dict:
    """Compile one specialized launch and measure it (the numeric fields of a report row)."""
    ptxas = ptxas or ptxas_path(arch)
    t0 = time.perf_counter()
    k = compile_spec(spec, arch)
    compile_s = time.perf_counter() - t0
    ptx = k.asm["ptx"]
    ttir = k.asm.get("ttir", "") if hasattr(k.asm, "get") else k.asm["ttir"]
    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR", DEFAULT_CACHE)) / "kernel_report_ptxas"
    pt = _ptxas_report(ptx, k.metadata.name if hasattr(k.metadata, "name") else spec.fn.__name__, ptxas, cache_dir)
    regs_cubin = _cubin_registers(k.asm.get("cubin") if hasattr(k.asm, "get") else None, ptxas)
    smem_triton = int(k.metadata.shared)
    num_warps = int(k.metadata.num_warps)
    smem_total = smem_triton + pt["smem_static"]
    occ = occupancy(pt["registers"], smem_total, num_warps)
    return dict(
        registers=pt["registers"], spill_stores=pt["spill_stores"], spill_loads=pt["spill_loads"],
        stack_frame=pt["stack_frame"], smem_triton=smem_triton, smem_static=pt["smem_static"],
        smem_total=smem_total, tensor_cores=tensor_core_ops(ptx), has_dot=bool(re.search(r"\btt\.dot\b", ttir)),
        num_warps=num_warps, num_stages=int(getattr(k.metadata, "num_stages", spec.options.get("num_stages", 0))),
        ptxas_arch=pt["ptxas_arch"], registers_cubin=regs_cubin, compile_s=round(compile_s, 3), **occ,
    )


# ----------------------------------------------------------------------------- report


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _constexpr_names(spec: Spec) -> tuple[dict, dict]:
    """(declared ``tl.constexpr`` parameters, int arguments the specialization folded to
    constants (== 1)), by name."""
    names = spec.fn.arg_names
    declared = {names[i] for i in getattr(spec.fn, "constexprs", range(len(names)))}
    cx, folded = {}, {}
    for k, v in spec.constexprs.items():
        n = names[k[0]] if isinstance(k, tuple) else k
        (cx if n in declared else folded)[n] = _jsonable(v)
    return cx, folded


def _emulate(cx: dict):
    for n in EMULATE_NAMES:
        if n in cx:
            return bool(cx[n])
    return None


def build_rows(dtypes=("bf16", "fp32"), cases=None, arch: int = 90, log=print, jobs: int = 1,
               notes: list | None = None) -> list[dict]:
    """Record, dedupe, compile and measure: one row per distinct compiled variant, with the
    shapes that launch it (``notes``: see :func:`record`)."""
    cases = CLIP_CASES if cases is None else cases
    ptxas = ptxas_path(arch)
    variants: dict[str, dict] = {}
    for case, dt, launch in record(cases, dtypes, notes):
        spec = _specialize(launch, arch)
        key = f"{dt} {spec.key()}"  # per io dtype: the autocast LN backward is the fp32 binary
        if key not in variants:
            cx, folded = _constexpr_names(spec)
            variants[key] = dict(
                kernel=f"{case.group}.{spec.fn.__name__}", group=case.group, function=spec.fn.__name__,
                dtype=dt, shapes=[], constexprs=cx, specialized_ints=folded, emulate=_emulate(cx),
                autotune_config=launch.config or None, specialization=spec.how,
                signature={k: v for k, v in spec.signature.items() if v != "constexpr"}, _spec=spec,
            )
        if case.shape not in variants[key]["shapes"]:
            variants[key]["shapes"].append(case.shape)
    rows = list(variants.values())
    specs = [row.pop("_spec") for row in rows]
    for i, (row, res) in enumerate(zip(rows, _measure_all(specs, arch, ptxas, jobs))):
        row.update(res)
        row["check"] = check_failures(row)
        if log:
            log(f"[{i + 1}/{len(rows)}] {_row_line(row)}")
    return rows


_JOBS: list = []  # (spec, arch, ptxas) of the running _measure_all, inherited by forked workers


def _measure_job(i: int) -> dict:
    spec, arch, ptxas = _JOBS[i]
    try:
        return measure(spec, arch, ptxas)
    except Exception as e:  # noqa: BLE001  (reported per row; --check fails on it)
        return dict(error=f"{type(e).__name__}: {e}")


def _measure_all(specs: list, arch: int, ptxas: str, jobs: int):
    """measure() of every spec, in order; ``jobs`` forked workers when more than 1 (the specs
    hold JITFunctions, which do not pickle: workers read them from the inherited ``_JOBS``)."""
    import multiprocessing as mp

    global _JOBS
    _JOBS = [(s, arch, ptxas) for s in specs]
    try:
        if jobs > 1 and len(specs) > 1 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(min(jobs, len(specs))) as pool:
                yield from pool.imap(_measure_job, range(len(specs)))
        else:
            for i in range(len(specs)):
                yield _measure_job(i)
    finally:
        _JOBS = []


def default_jobs() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 8))


def _config_str(row: dict) -> str:
    cx = row["constexprs"]
    tiles = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in cx.items()
                     if k.startswith("BLOCK_") or k in ("ROWS", "M_PAD"))
    ws = f"w{row.get('num_warps', '?')} s{row.get('num_stages', '?')}"
    return f"{tiles} {ws}".strip()


def _flags_str(row: dict) -> str:
    cx = row["constexprs"]
    out = []
    for k, v in cx.items():
        if k.startswith("BLOCK_") or k in ("ROWS", "M_PAD") or k in EMULATE_NAMES:
            continue
        if isinstance(v, bool):
            if v:
                out.append(k)
        elif k == "PREC" and row["dtype"] != "fp32":
            continue  # input precision only matters for fp32 tiles
        else:
            out.append(f"{k}={v}")
    return " ".join(out)


def _row_line(row: dict) -> str:
    head = f"{row['kernel']} {row['dtype']} [{'; '.join(row['shapes'])}] {_flags_str(row)} {_config_str(row)}"
    if row.get("error"):
        return f"{head}: ERROR {row['error'].splitlines()[0]}"
    return (f"{head}: regs={row['registers']} spill={row['spill_stores']}/{row['spill_loads']} "
            f"smem={row['smem_total']} tc={row['tensor_cores']} blocks/SM={row['blocks_per_sm']} "
            f"occ={row['occupancy']:.0%} ({row['limiter']})"
            + (f"  FAIL: {'; '.join(row['check'])}" if row["check"] else ""))


def _short(why: str) -> str:
    return "spills" if why.startswith("spills") else "no tensor cores" if "tensor-core" in why else why


def row_key(r: dict) -> str:
    """Identity of a variant across runs (e.g. two Triton versions): kernel, dtype, constexprs,
    warps, stages."""
    return json.dumps([r["kernel"], r["dtype"], r["constexprs"], r.get("num_warps"), r.get("num_stages")],
                      sort_keys=True, default=str)


def markdown_table(rows: list[dict], other: dict | None = None) -> str:
    """The report table; with ``other`` (the JSON of a run with another Triton) two more columns
    give that run's registers and spills for the same variants."""
    extra = {row_key(r): r for r in (other or {}).get("rows", [])}
    ov = (other or {}).get("triton_version")
    head = ("| kernel | dtype | used at | variant | tiles, warps, stages | regs | spill st/ld (B) | smem (B) "
            "| tensor cores | blocks/SM | occupancy (limit) | check |")
    rule = "|---|---|---|---|---|---:|---:|---:|---|---:|---|---|"
    if other:
        head += f" Triton {ov}: regs | Triton {ov}: spill st/ld |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        tail = ""
        if other:
            o = extra.get(row_key(r))
            tail = (" - | - |" if o is None or o.get("error") else
                    f" {o['registers']} | {o['spill_stores']}/{o['spill_loads']} |")
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['dtype']} | {'; '.join(r['shapes'])} | {_flags_str(r)} | "
                         f"{_config_str(r)} | - | - | - | - | - | - | **does not compile** |" + tail)
            continue
        tc = r["tensor_cores"] if r["has_dot"] else f"{r['tensor_cores']} (no dot)"
        ungated = [_short(w) for w in would_fail_ungated(r)]
        check = ("**FAIL**: " + "; ".join(r["check"])) if r["check"] else (
            "ok" if r["dtype"] in GATED_DTYPES else "not gated" + (f" ({', '.join(ungated)})" if ungated else ""))
        lines.append(
            f"| {r['kernel'].split('.', 1)[1]} | {r['dtype']} | {'; '.join(r['shapes'])} | {_flags_str(r)} | "
            f"{_config_str(r)} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem_total']} | "
            f"{tc} | {r['blocks_per_sm']} | {r['occupancy']:.0%} ({r['limiter']}) | {check} |" + tail)
    return "\n".join(lines)


def git_commit() -> str:
    """Short HEAD hash, marked when the tree has uncommitted changes (bench/_common.git_state)."""
    head, dirty = _common.git_state()
    return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")


def section(doc: dict, other: dict | None = None) -> str:
    """The RESULTS.md section (markers included); ``other``: see :func:`markdown_table`."""
    fails = [r for r in doc["rows"] if r["check"]]
    summary = (f"{len(doc['rows'])} compiled variants; --check: "
               + ("passes." if not fails else f"{len(fails)} failing rows (marked **FAIL**)."))
    if other:
        ofails = other.get("failures", [])
        summary += (f" Triton {other['triton_version']} (the device machine's version; last two columns, "
                    f"run {other.get('date', '?')}): " + ("--check passes." if not ofails else
                                                         f"{len(ofails)} rows fail --check."))
    return "\n".join([
        BEGIN,
        "## Static kernel report (sm_90, ptxas)",
        "",
        f"- Command: `{doc['command']}`",
        f"- Date: {doc['date']}",
        f"- Commit: {doc['commit']}",
        f"- Triton {doc['triton_version']}, its bundled ptxas {doc['ptxas_version']}; target "
        f"{doc['target']}; no GPU used (compiled only)",
        f"- {summary}",
        "",
        "Every Triton kernel variant the GPU path launches at CLIP shapes (ViT-B/32 and B/16 image "
        "towers, the causal 77-token text tower, the packed varlen batch, width 768, 12 heads of 64, "
        "FFN 3072, loss embedding 512), found by calling the launchers on fake CUDA tensors and "
        "compiled for sm_90 with Triton's own ptxas; one row per distinct binary. *regs* is registers "
        "per thread (255 is the hardware maximum, beyond which ptxas spills), *spill* the bytes each "
        "thread stores to and reloads from local memory (slow, off-chip), *smem* the shared memory a "
        "block needs, *tensor cores* whether the PTX uses wgmma (Hopper) or mma.sync instructions for "
        "the kernel's tl.dot. *blocks/SM* and *occupancy* (resident warps out of 64) follow from "
        "registers, shared memory and warps per block on an H100/H200 (65536 registers, 228 KiB "
        "shared memory, 2048 threads, 32 blocks per SM; formula in bench/kernel_report.py); low "
        "occupancy is not a defect by itself for tensor-core kernels that hide latency with "
        "pipelining, but a spill or a dot without tensor cores is. CI (`make kernel-report`) fails on "
        "any bf16 row that spills or runs a dot without tensor cores; fp32 rows are reported, not gated "
        "(fp32 dots use IEEE FMA by design, so they have no tensor-core instructions), and "
        "`make triton36-check` applies the same check with Triton 3.6, the device machine's version. "
        "These are compile-time figures: no kernel ran.",
        "",
        markdown_table(doc["rows"], other),
        END,
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Replace this report's marked section of ``path`` (or append it); nothing else changes."""
    _common.replace_section(path, text, NAME)


def run(dtypes=("bf16", "fp32"), arch: int = 90, command: str | None = None, log=print, jobs: int = 1) -> dict:
    prepare_env()
    t0 = time.time()
    ptxas = ptxas_path(arch)
    notes: list[str] = []
    rows = build_rows(dtypes, arch=arch, log=log, jobs=jobs, notes=notes)
    return dict(
        report=NAME, command=command or "python -m bench.kernel_report",
        date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), commit=git_commit(),
        triton_version=triton_version(), ptxas=ptxas, ptxas_version=ptxas_version(ptxas),
        target=f"cuda sm_{arch} (ptxas --gpu-name {rows[0].get('ptxas_arch', '?') if rows else '?'})",
        dtypes=list(dtypes), gated_dtypes=list(GATED_DTYPES), limits=SM90,
        elapsed_s=round(time.time() - t0, 1), notes=notes, rows=rows,
        failures=[dict(kernel=r["kernel"], dtype=r["dtype"], shapes=r["shapes"], why=r["check"])
                  for r in rows if r["check"]],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows and run metadata as JSON here")
    ap.add_argument("--write", type=Path, nargs="?", const=DEFAULT_RESULTS,
                    help=f"replace the {NAME} section of this markdown file (default bench/RESULTS.md)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a bf16 kernel spills or a dot kernel has no tensor-core instruction")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp16, fp32")
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    ap.add_argument("--quiet", action="store_true", help="no per-variant lines")
    ap.add_argument("--compare", type=Path, metavar="JSON",
                    help="with --write: add the registers/spills of another run's JSON (e.g. Triton 3.6)")
    ap.add_argument("--jobs", type=int, default=default_jobs(),
                    help="compile in this many forked processes (default: usable cores, at most 8)")
    ap.add_argument("--expect-triton", metavar="VERSION",
                    help="exit 2 unless the imported Triton's version starts with this (e.g. 3.6)")
    args = ap.parse_args(argv)
    if args.expect_triton:
        prepare_env()
        v = triton_version()
        if not v.startswith(args.expect_triton):
            print(f"kernel_report: expected Triton {args.expect_triton}, imported {v} "
                  f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')!r})", file=sys.stderr)
            return 2
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtypes {bad} (choose from {DTYPES})")
    shown = ["python -m bench.kernel_report", *(argv if argv is not None else sys.argv[1:])]
    doc = run(dtypes, args.arch, " ".join(shown), log=None if args.quiet else print, jobs=max(1, args.jobs))
    errors = [r for r in doc["rows"] if r.get("error")]
    print(f"kernel_report: {len(doc['rows'])} variants compiled for sm_{args.arch} with Triton "
          f"{doc['triton_version']} in {doc['elapsed_s']} s ({len(errors)} failed to compile)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.write:
        other = json.loads(args.compare.read_text()) if args.compare else None
        write_section(args.write, section(doc, other))
        print(f"wrote the {NAME} section of {args.write}")
    for n in doc.get("notes", []):
        print(f"note: {n}")
    ungated = [r for r in doc["rows"] if not r["check"] and would_fail_ungated(r)]
    if args.quiet and ungated:
        print(f"note: {len(ungated)} {'/'.join(sorted({r['dtype'] for r in ungated}))} rows would fail the "
              f"bf16 gates (reported, not gated; without --quiet they are listed)")
    for r in ungated if not args.quiet else []:
        print(f"note (not gated): {r['kernel']} {r['dtype']} [{'; '.join(r['shapes'])}]: "
              f"{'; '.join(would_fail_ungated(r))}")
    for r in doc["rows"]:
        if r.get("registers_cubin") not in (None, r.get("registers")):
            print(f"warning: {r['kernel']} {r['dtype']}: ptxas -v reports {r['registers']} registers, "
                  f"Triton's cubin {r['registers_cubin']} (ptxas flags differ?)")
    if doc["failures"]:
        print(f"\n{len(doc['failures'])} rows fail the check:")
        for f in doc["failures"]:
            print(f"  FAIL {f['kernel']} {f['dtype']} [{'; '.join(f['shapes'])}]: {'; '.join(f['why'])}")
    if args.check and doc["failures"]:
        return 1
    if errors:
        return 1
    if args.check:
        print("kernel_report --check: ok (no bf16 kernel spills, every bf16 dot uses tensor cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
