"""The GPU's matrix-multiply numerics, shared by every kernel that calls ``tl.dot``.

A kernel runs in one of two places: compiled for an NVIDIA GPU, or in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, the tests). The interpreter computes ``tl.dot`` with numpy: it ignores
``input_precision`` (no TF32) and multiplies bfloat16 operands as raw ``uint16`` bit patterns
(garbage). So that the tests execute the GPU's numerics and not the interpreter's, every dot
goes through :func:`dot`, which takes the numerics settings the GPU uses (operand dtypes chosen
by the kernel, ``input_precision``, fp32 accumulation) and, under ``EMULATE``, reproduces them
with exact fp32 arithmetic:

- fp16/bf16 operands: converted to fp32 (exact) and multiplied in IEEE fp32; products of two
  16-bit floats are exact in fp32, so this equals tensor-core math up to the order of the fp32
  accumulation.
- fp32 operands with ``input_precision="tf32"``: the 13 low mantissa bits are cleared (tensor
  cores read fp32 registers as TF32 by truncation), then multiplied in IEEE fp32.
- fp32 operands with ``"ieee"``: unchanged.

Operand rounding that a kernel does before a dot, and the rounding of its outputs, go through
:func:`round_to`: the GPU rounds fp32 -> bf16 to nearest even, Triton's interpreter truncates,
so under ``EMULATE`` the rounding is done in integer arithmetic first. (Kernels that still write
a bare ``.to(bf16)`` — attention, layer_norm, bias_act — get the interpreter's truncation there:
their bf16 interpreter errors are slightly pessimistic, never optimistic.) Launchers set ``EMULATE`` from where the kernel runs and
choose every numerics-affecting setting from the dtype alone (DESIGN §8): only tile sizes,
warps and stages may differ between the interpreter and the GPU.
Imports triton only (DESIGN §4).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_tf32(x):
    """fp32 ``x`` with its 13 low mantissa bits cleared (TF32 as the tensor cores read it)."""
    bits = x.to(tl.int32, bitcast=True) & -8192  # 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, as the GPU computes it.

    Args:
        a: ``(M, K)`` tile, fp32/fp16/bf16; b: ``(K, N)`` tile of the same dtype.
        acc: ``(M, N)`` fp32 accumulator.
        PREC: ``tl.dot`` input precision for fp32 operands ("ieee" or "tf32"; ignored by the
            GPU for 16-bit operands).
        EMULATE: True in the CPU interpreter (see the module docstring).
    """
    if EMULATE:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if PREC == "tf32":
            if a.dtype == tl.float32:
                a32 = round_tf32(a32)
                b32 = round_tf32(b32)
        return tl.dot(a32, b32, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``x`` (finite) rounded to ``dtype`` to nearest even, as the GPU converts. Triton's
    interpreter truncates fp32 -> bf16 (its ``create_fp_trunc`` drops the low 16 bits), a
    biased error that adds up coherently over a row of same-signed values (it tripled the bf16
    d_image error of a negative_only sigmoid-loss test); under ``EMULATE`` the rounding to nearest even is
    done here in integer arithmetic, so the final conversion is exact. The interpreter already
    rounds fp16 to nearest (numpy)."""
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + (32767 + ((bits >> 16) & 1))) & -65536  # 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
