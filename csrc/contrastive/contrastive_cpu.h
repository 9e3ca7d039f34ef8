// Torch-free CPU driver of the fused contrastive loss (forward and backward over row/column
// tiles, OpenMP inside each tile). The tile products (I·Tᵀ blocks and the gradient GEMMs) come
// from a TileProducts object: contrastive_api.cpp implements it with torch's BLAS, the C++ unit
// tests with naive loops. All LSE merging and gradient assembly is contrastive_tile.h.
//
// Memory: one tile buffer (tile_rows x tile_cols fp32), 4N floats of row/column accumulators,
// per-thread column partials (threads x tile_cols x 2 floats). Never N x N.
#pragma once

#include <cstdint>

namespace msclip {
namespace contrastive {

class TileProducts {
 public:
  virtual ~TileProducts() = default;
  // out[(i - r0) * cols + (j - c0)] = Σ_k I[i, k]·T[j, k] in fp32 for i in [r0, r0+rows),
  // j in [c0, c0+cols) (row-major, leading dimension = cols).
  virtual void logits(int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* out) = 0;
  // dI[r0:r0+rows] += alpha·G·T[c0:c0+cols] and dT[c0:c0+cols] += alpha·Gᵀ·I[r0:r0+rows],
  // G being `rows` x `cols` row-major (leading dimension = cols).
  virtual void accumulate(int64_t r0, int64_t rows, int64_t c0, int64_t cols, const float* g,
                          float alpha) = 0;
};

struct CpuOptions {
  int64_t tile_rows = 1024;  // rows of I per tile (clamped to N)
  int64_t tile_cols = 1024;  // rows of T per tile (clamped to N)
  int num_threads = 0;       // OpenMP threads inside a tile; 0: omp_get_max_threads()
};

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
