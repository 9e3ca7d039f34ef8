// TileProducts by naive loops (double accumulation of fp32 inputs), for the C++ unit tests of the
// CPU loss drivers. I is (n_i, d), T is (n_t, d), row-major; dI / dT accumulate in double.
#pragma once

#include <cstdint>
#include <vector>

#include "common/tile_products.h"

struct Naive : msclip::TileProducts {
  const std::vector<float>& I;
  const std::vector<float>& T;
  int64_t d;
  std::vector<double> dI, dT;
  Naive(const std::vector<float>& i, const std::vector<float>& t, int64_t n_i, int64_t n_t,
        int64_t d_)
      : I(i), T(t), d(d_), dI(n_i * d_, 0.0), dT(n_t * d_, 0.0) {}
  void logits(int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* out) override {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < d; ++k) acc += double(I[(r0 + i) * d + k]) * T[(c0 + j) * d + k];
        out[i * cols + j] = static_cast<float>(acc);
      }
  }
  void accumulate(int64_t r0, int64_t rows, int64_t c0, int64_t cols, const float* g,
                  float alpha) override {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const double gij = double(alpha) * g[i * cols + j];
        for (int64_t k = 0; k < d; ++k) {
          dI[(r0 + i) * d + k] += gij * T[(c0 + j) * d + k];
          dT[(c0 + j) * d + k] += gij * I[(r0 + i) * d + k];
        }
      }
  }
};
