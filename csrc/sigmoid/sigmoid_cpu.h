// Torch-free CPU driver of the fused sigmoid (SigLIP) loss: sweeps row/column tiles of
// s·I·Tᵀ + b (OpenMP over row chunks inside each tile). The tile products come from a
// TileProducts object (common/tile_products.h): sigmoid_api.cpp implements it with torch's BLAS,
// the C++ unit tests with naive loops. All per-element math is sigmoid_tile.h.
//
// Memory: one tile buffer (tile_rows x tile_cols fp32) and a few doubles per row chunk. Never
// N_I x N_T, and no per-row state at all (the loss is a plain sum: nothing like an LSE is kept).
#pragma once

#include <cstdint>

#include "common/tile_products.h"

namespace msclip {
namespace sigmoid {

// Loss of one sweep and, from forward_backward_cpu, the scalar parameters' gradients.
struct Sums {
  double loss = 0.0;     // (1/N_I) Σ_ij softplus(q_ij)
  double d_scale = 0.0;  // grad_out · dloss/ds
  double d_bias = 0.0;   // grad_out · dloss/db
};

// Loss only. n_img, n_txt >= 1; n_img == n_txt unless negative_only (positives: the diagonal).
double forward_cpu(TileProducts& tp, int64_t n_img, int64_t n_txt, float scale, float bias,
                   bool negative_only, const CpuOptions& opt = CpuOptions());

// Loss and gradients of loss·grad_out in one sweep: each tile is formed once, turned into
// G·grad_out and handed to tp.accumulate(alpha = scale) (dI += s·G·T, dT += s·Gᵀ·I).
Sums forward_backward_cpu(TileProducts& tp, int64_t n_img, int64_t n_txt, float scale,
                          float bias, bool negative_only, float grad_out,
                          const CpuOptions& opt = CpuOptions());

}  // namespace sigmoid
}  // namespace msclip
