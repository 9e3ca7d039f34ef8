// Torch-free tile math of the fused sigmoid (SigLIP) loss, shared by the C++ CPU driver
// (sigmoid_cpu.cpp), the CUDA kernels (sigmoid_cuda.cu) and the C++ unit tests (csrc/tests/).
// Nothing here allocates; every function works on caller buffers.
//
// Notation (issue 10; Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): I is
// (N_I, D) image features, T is (N_T, D) text features, s the logit scale (already exp'd), b the
// logit bias, raw = I·Tᵀ (never held whole), y = s·raw + b the logits. z_ij = +1 for a positive
// pair (i == j, unless negative_only) and -1 otherwise. With q = -z·y:
//   loss        = (1/N_I) Σ_ij softplus(q_ij)            (= -(1/N_I) Σ log σ(z·y), open_clip's
//                                                          normalization: by the image count)
//   dloss/dy_ij = G_ij = -z_ij·σ(q_ij) / N_I              (σ(y) for negatives, -σ(-y) for positives)
//   dI = s·G·T,  dT = s·Gᵀ·I,  dloss/ds = Σ_ij G_ij·raw_ij,  dloss/db = Σ_ij G_ij
// Numerics: softplus and σ both come from e = exp(-|q|) <= 1 (nothing overflows for any s, b):
// softplus(q) = max(q, 0) + log1p(e), σ(q) = (q >= 0 ? 1 : e) / (1 + e). The positive of a row is
// computed on its own, never as a negative plus a correction (softplus(y) − y cancels for large y).
// No state is saved between passes: the loss is a plain sum, so there is no LSE.
#pragma once

#include <cstdint>

#include "common/tile_math.h"  // MSCLIP_HD, exp_nonpos, log1p_unit

namespace msclip {
namespace sigmoid {

// softplus(q) = log(1 + exp(q)), stable for every q.
MSCLIP_HD float softplus(float q) {
  const float e = exp_nonpos(-fabsf(q));
  return (q > 0.0f ? q : 0.0f * q) + log1p_unit(e);  // 0·q: a NaN logit gives a NaN loss
}

// σ(q) = 1 / (1 + exp(-q)), stable for every q.
MSCLIP_HD float sigma(float q) {
  const float e = exp_nonpos(-fabsf(q));
  return (q >= 0.0f ? 1.0f : e) / (1.0f + e);
}

// Σ_{j in [j0, j1)} softplus(s·raw_j + b): the loss terms of negatives (q = y).
MSCLIP_HD float neg_terms(const float* raw, int j0, int j1, float s, float b) {
  float acc = 0.0f;
  MSCLIP_SIMD_SUM(acc)
  for (int j = j0; j < j1; ++j) acc += softplus(s * raw[j] + b);
  return acc;
}

// Loss terms of one tile row: Σ_j softplus(q_j), the positive at column `pos` of this tile row
// (pos < 0 or pos >= cols: none in this tile).
MSCLIP_HD float row_terms(const float* raw, int cols, float s, float b, int pos) {
  if (pos < 0 || pos >= cols) return neg_terms(raw, 0, cols, s, b);
  return neg_terms(raw, 0, pos, s, b) + neg_terms(raw, pos + 1, cols, s, b) +
         softplus(-(s * raw[pos] + b));
}

// Gradient of negatives in [j0, j1): raw_g[j] (raw on entry) becomes coef·σ(y_j); adds
// Σ G·raw to *ds and Σ G to *db, and returns Σ softplus(y_j) (the loss terms, one pass).
MSCLIP_HD float neg_grads(float* raw_g, int j0, int j1, float s, float b, float coef, float* ds,
                          float* db) {
  float loss = 0.0f, gs = 0.0f, gb = 0.0f;
  MSCLIP_SIMD_SUM(loss, gs, gb)
  for (int j = j0; j < j1; ++j) {
    const float raw = raw_g[j];
    const float y = s * raw + b;
    const float e = exp_nonpos(-fabsf(y));
    loss += (y > 0.0f ? y : 0.0f * y) + log1p_unit(e);
    const float g = coef * ((y >= 0.0f ? 1.0f : e) / (1.0f + e));
    raw_g[j] = g;
    gs += g * raw;
    gb += g;
  }
  *ds += gs;
  *db += gb;
  return loss;
}

// One tile row: raw_g (raw on entry) becomes G = coef·(-z·σ(q)), the positive at column `pos`
// (none when outside [0, cols)). Adds Σ G·raw to *ds and Σ G to *db; returns the row's loss
// terms Σ softplus(q) (before coef). coef = grad_out / N_I.
MSCLIP_HD float row_grads(float* raw_g, int cols, float s, float b, int pos, float coef, float* ds,
                          float* db) {
  if (pos < 0 || pos >= cols) return neg_grads(raw_g, 0, cols, s, b, coef, ds, db);
  float loss = neg_grads(raw_g, 0, pos, s, b, coef, ds, db) +
               neg_grads(raw_g, pos + 1, cols, s, b, coef, ds, db);
  const float raw = raw_g[pos];
  const float q = -(s * raw + b);
  const float g = -coef * sigma(q);
  raw_g[pos] = g;
  *ds += g * raw;
  *db += g;
  return loss + softplus(q);
}

}  // namespace sigmoid
}  // namespace msclip
