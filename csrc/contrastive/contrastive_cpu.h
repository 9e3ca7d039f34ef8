// Torch-free CPU driver of the fused contrastive loss (forward and backward over row/column
// tiles, OpenMP inside each tile). The tile products (I·Tᵀ blocks and the gradient GEMMs) come
// from a TileProducts object: contrastive_api.cpp implements it with torch's BLAS, the C++ unit
// tests with naive loops. All LSE merging and gradient assembly is contrastive_tile.h.
//
// Memory: one tile buffer (tile_rows x tile_cols fp32), 4N floats of row/column accumulators,
// per-thread column partials (threads x tile_cols x 2 floats). Never N x N.
#pragma once

#include <cstdint>

#include "common/tile_products.h"

namespace msclip {
namespace contrastive {

// TileProducts and CpuOptions (common/tile_products.h): the I·Tᵀ blocks and gradient GEMMs the
// driver asks for, and its tiling.

// Forward over all tiles: fills lse_row[N], lse_col[N] (log-sum-exp of the logits' rows and
// columns) and returns the loss (mean of both cross-entropy directions). n >= 1.
double forward_cpu(TileProducts& tp, int64_t n, float scale, float* lse_row, float* lse_col,
                   const CpuOptions& opt = CpuOptions());

// Backward: recomputes each tile once, turns it into G·grad_out and hands it to
// tp.accumulate(alpha = scale); returns dloss/dscale · grad_out.
double backward_cpu(TileProducts& tp, int64_t n, float scale, const float* lse_row,
                    const float* lse_col, float grad_out, const CpuOptions& opt = CpuOptions());

}  // namespace contrastive
}  // namespace msclip
