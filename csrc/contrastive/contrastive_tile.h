// Torch-free tile math of the fused CLIP contrastive (InfoNCE) loss, shared by the C++ CPU
// implementation (contrastive_cpu.cpp), the CUDA kernels (contrastive_cuda.cu) and the C++
// unit tests (csrc/tests/). Nothing here allocates; every function works on caller buffers.
//
// Notation (issue 4): I, T are (N, D) features, s the logit scale, raw = I·Tᵀ (never held whole),
// x = s·raw the logits. Row i of x is image i scored against every text, column j is text j
// against every image.
//   lse_row[i] = log Σ_j exp(x_ij),   lse_col[j] = log Σ_i exp(x_ij)
//   loss       = Σ_i (lse_row[i] + lse_col[i] − 2·x_ii) / (2N)
//   dloss/dx_ij = G_ij = (exp(x_ij − lse_row[i]) + exp(x_ij − lse_col[j]) − 2·δ_ij) / (2N)
//   dI = s·G·T,  dT = s·Gᵀ·I,  dloss/ds = Σ_ij G_ij·raw_ij
// Numerics: every exponent is x minus a running maximum (≤ 0), so nothing overflows for any
// scale; sums are fp32 (tile-local) and merged with the standard (max, sum) rescaling.
#pragma once

#include <cstdint>

#include "common/tile_math.h"  // MSCLIP_HD, neg_inf, exp_nonpos

namespace msclip {
namespace contrastive {

// Online log-sum-exp accumulator: value = m + log(s), with s = Σ exp(x − m).
// Empty: m = -inf, s = 0. Invariant: s >= 1 whenever m is finite (the max term contributes 1).
struct Lse {
  float m;
  float s;
};

MSCLIP_HD Lse lse_empty() { return Lse{neg_inf(), 0.0f}; }

// Merge two accumulators (commutative up to rounding). Safe with either one empty.
MSCLIP_HD Lse lse_merge(Lse a, Lse b) {
  if (b.m == neg_inf()) return a;
  if (a.m == neg_inf()) return b;
  if (a.m >= b.m) return Lse{a.m, a.s + b.s * exp_nonpos(b.m - a.m)};
  return Lse{b.m, b.s + a.s * exp_nonpos(a.m - b.m)};
}

// Add one value.
MSCLIP_HD Lse lse_add(Lse a, float x) { return lse_merge(a, Lse{x, 1.0f}); }

// log Σ exp; -inf when empty.
MSCLIP_HD float lse_value(Lse a) { return a.m == neg_inf() ? neg_inf() : a.m + logf(a.s); }

// ---------------------------------------------------------------------------------------------
// Tile updates. A tile is `rows` x `cols` raw dot products (row-major, leading dimension ld),
// covering global rows [r0, r0+rows) and columns [c0, c0+cols).

// Row statistics of one row of the tile: returns (max, Σ exp(x − max)) of x = scale·raw.
// Two sweeps over the row (max, then sum): both vectorize (MSCLIP_SIMD_*, common/tile_math.h).
MSCLIP_HD Lse row_lse(const float* raw, int cols, float scale) {
  float m = neg_inf();
  MSCLIP_SIMD_MAX(m)
  for (int j = 0; j < cols; ++j) {
    float x = scale * raw[j];
    m = x > m ? x : m;
  }
  float s = 0.0f;
  MSCLIP_SIMD_SUM(s)
  for (int j = 0; j < cols; ++j) s += exp_nonpos(scale * raw[j] - m);
  return Lse{m, s};
}

// Column statistics of a chunk of rows, merged into per-column accumulators
// (col_m, col_s: `cols` floats each, structure-of-arrays so the loops vectorize).
// One rescale exp per column per chunk, then one exp per element.
MSCLIP_HD void col_lse_update(const float* raw, int rows, int cols, int64_t ld, float scale,
                              float* col_m, float* col_s) {
  if (rows <= 0) return;
  for (int j = 0; j < cols; ++j) {
    float m = col_m[j];
    for (int i = 0; i < rows; ++i) {
      float x = scale * raw[i * ld + j];
      m = x > m ? x : m;
    }
    // rescale the old sum to the new max (old sum is 0 when empty, exp(-inf) -> 0)
    float old = col_m[j];
    col_s[j] = col_s[j] * (old == neg_inf() ? 0.0f : exp_nonpos(old - m));
    col_m[j] = m;
  }
  for (int i = 0; i < rows; ++i) {
    const float* r = raw + i * ld;
    MSCLIP_SIMD
    for (int j = 0; j < cols; ++j) col_s[j] += exp_nonpos(scale * r[j] - col_m[j]);
  }
}

// Backward: overwrite one tile row of raw dot products with G without its −2δ term, scaled by
// `coef` = upstream/(2N): G_ij = coef·(exp(x_ij − lse_r) + exp(x_ij − lse_c[j])).
// Returns the row's contribution Σ_j G_ij·raw_ij to dloss/ds.
MSCLIP_HD float grad_row(float* raw_g, int cols, float scale, float lse_r, const float* lse_c,
                         float coef) {
  float ds = 0.0f;
  MSCLIP_SIMD_SUM(ds)
  for (int j = 0; j < cols; ++j) {
    float raw = raw_g[j];
    float x = scale * raw;
    float g = coef * (exp_nonpos(x - lse_r) + exp_nonpos(x - lse_c[j]));
    raw_g[j] = g;
    ds += g * raw;
  }
  return ds;
}

// The −2·coef·δ_ij term of G for a row's own pair, applied after grad_row:
// G_ii −= 2·coef; returns the matching ds correction −2·coef·raw_ii.
MSCLIP_HD float grad_diag_fix(float* g_ii, float raw_ii, float coef) {
  *g_ii -= 2.0f * coef;
  return -2.0f * coef * raw_ii;
}

// Note: x − lse <= 0 mathematically (x is a term of the sum) but rounding can push it an ulp
// above 0; exp_nonpos stays accurate there (n = 0, polynomial on a tiny r), so no clamp.

// ---------------------------------------------------------------------------------------------
// Loss assembly: loss = Σ_i (lse_row[i] + lse_col[i] − 2·scale·diag_raw[i]) / (2N), summed in
// double (N up to 2^20 terms).
MSCLIP_HD double loss_from_lse(const float* lse_row, const float* lse_col, const float* diag_raw,
                               int64_t n, float scale) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i)
    acc += static_cast<double>(lse_row[i]) + static_cast<double>(lse_col[i]) -
           2.0 * static_cast<double>(scale) * static_cast<double>(diag_raw[i]);
  return n > 0 ? acc / (2.0 * static_cast<double>(n)) : 0.0;
}

}  // namespace contrastive
}  // namespace msclip
