// TileProducts through torch's BLAS (at::mm_out / addmm_), for the CPU drivers of the fused
// losses. Included by the torch-aware *_api.cpp files only.
#pragma once

#include <torch/extension.h>

#include "common/tile_products.h"

namespace msclip {

// 16-bit inputs are upcast one block at a time (the row block of I once per row of tiles, the
// column block of T per tile), so extra memory stays O(tile x D). I is (N_I, D), T is (N_T, D);
// dI / dT (fp32, zero-initialized by the caller) receive accumulate()'s products.
struct TorchTiles : TileProducts {
  at::Tensor I, T, dI, dT;
  int64_t a_r0 = -1, a_rows = 0, b_c0 = -1, b_cols = 0;
  at::Tensor A, B;

  TorchTiles(at::Tensor i, at::Tensor t) : I(std::move(i)), T(std::move(t)) {}

  static at::Tensor block(const at::Tensor& x, int64_t s, int64_t n) {
    at::Tensor b = x.narrow(0, s, n);
    return b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  }
  void fetch(int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
    if (r0 != a_r0 || rows != a_rows) A = block(I, r0, rows), a_r0 = r0, a_rows = rows;
    if (c0 != b_c0 || cols != b_cols) B = block(T, c0, cols), b_c0 = c0, b_cols = cols;
  }
  void logits(int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* out) override {
    fetch(r0, rows, c0, cols);
    at::Tensor o = at::from_blob(out, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
    at::mm_out(o, A, B.t());
  }
  void accumulate(int64_t r0, int64_t rows, int64_t c0, int64_t cols, const float* g,
                  float alpha) override {
    fetch(r0, rows, c0, cols);
    at::Tensor G = at::from_blob(const_cast<float*>(g), {rows, cols},
                                 at::TensorOptions().dtype(at::kFloat));
    dI.narrow(0, r0, rows).addmm_(G, B, 1.0, alpha);
    dT.narrow(0, c0, cols).addmm_(G.t(), A, 1.0, alpha);
  }
};

}  // namespace msclip
