// The tile products a torch-free CPU loss driver asks for (csrc/<op>/<op>_cpu.cpp). The
// torch-aware API files implement it with torch's BLAS (common/torch_tiles.h), the C++ unit tests
// with naive loops. Shared by the InfoNCE and the sigmoid (SigLIP) loss.
#pragma once

#include <cstdint>

namespace msclip {

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

// Tiling of a CPU driver.
struct CpuOptions {
  int64_t tile_rows = 1024;  // rows of I per tile (clamped to N_I)
  int64_t tile_cols = 1024;  // rows of T per tile (clamped to N_T)
  int num_threads = 0;       // OpenMP threads inside a tile; 0: omp_get_max_threads()
};

}  // namespace msclip
