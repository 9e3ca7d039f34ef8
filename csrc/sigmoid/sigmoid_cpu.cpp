// CPU driver of the fused sigmoid loss; see sigmoid_cpu.h. Tile loop order: row blocks outer,
// column blocks inner. Inside a tile the rows are split into chunks of kChunk rows handed to
// OpenMP threads; each chunk's sums go to their own slot and are added in chunk order after the
// tile, so the result is deterministic whatever the thread count.
#include "sigmoid/sigmoid_cpu.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sigmoid/sigmoid_tile.h"

// Hot loops get AVX-512 / AVX2 clones picked at load time (ifunc), so a generic x86-64 build still
// vectorizes the exp / log1p polynomials at full width; other architectures use the plain build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MSCLIP_NO_CLONES)
#define MSCLIP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSCLIP_CLONES
#endif

namespace msclip {
namespace sigmoid {
namespace {

constexpr int64_t kChunk = 16;  // rows per chunk: 16 x 1024 fp32 = 64 KiB, stays in L2

int threads_for(const CpuOptions& opt) {
#ifdef _OPENMP
  return opt.num_threads > 0 ? opt.num_threads : omp_get_max_threads();
#else
  (void)opt;
  return 1;
#endif
}

// Column of row `gi`'s positive inside a tile starting at column c0 (-1: none).
int64_t positive_col(int64_t gi, int64_t c0, bool negative_only) { return negative_only ? -1 : gi - c0; }

// Loss terms of tile rows [i0, i1) (tile rows start at global row r0).
MSCLIP_CLONES double loss_rows(const float* tile, int64_t i0, int64_t i1, int64_t r0, int64_t c0,
                               int64_t cols, float s, float b, bool negative_only) {
  double acc = 0.0;
  for (int64_t i = i0; i < i1; ++i)
    acc += row_terms(tile + i * cols, static_cast<int>(cols), s, b,
                     static_cast<int>(std::clamp<int64_t>(positive_col(r0 + i, c0, negative_only), -1, cols)));
  return acc;
}

// Tile rows [i0, i1) become G (times coef); their loss terms, Σ G·raw and Σ G go to *sums.
MSCLIP_CLONES void grad_rows(float* tile, int64_t i0, int64_t i1, int64_t r0, int64_t c0,
                             int64_t cols, float s, float b, bool negative_only, float coef,
                             double* sums) {
  double loss = 0.0, ds = 0.0, db = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    float rs = 0.0f, rb = 0.0f;
    loss += row_grads(tile + i * cols, static_cast<int>(cols), s, b,
                      static_cast<int>(std::clamp<int64_t>(positive_col(r0 + i, c0, negative_only), -1, cols)),
                      coef, &rs, &rb);
    ds += rs;
    db += rb;
  }
  sums[0] = loss;
  sums[1] = ds;
  sums[2] = db;
}

struct Tiling {
  int64_t br, bc;
  int nt;
};

Tiling tiling(int64_t n_img, int64_t n_txt, const CpuOptions& opt) {
  return Tiling{std::max<int64_t>(1, std::min(opt.tile_rows, n_img)),
                std::max<int64_t>(1, std::min(opt.tile_cols, n_txt)), threads_for(opt)};
}

}  // namespace

double forward_cpu(TileProducts& tp, int64_t n_img, int64_t n_txt, float scale, float bias,
                   bool negative_only, const CpuOptions& opt) {
  const Tiling t = tiling(n_img, n_txt, opt);
  std::vector<float> tile(static_cast<size_t>(t.br * t.bc));
  std::vector<double> part(static_cast<size_t>((t.br + kChunk - 1) / kChunk));
  double total = 0.0;
  for (int64_t r0 = 0; r0 < n_img; r0 += t.br) {
    const int64_t rows = std::min(t.br, n_img - r0);
    const int64_t nchunks = (rows + kChunk - 1) / kChunk;
    for (int64_t c0 = 0; c0 < n_txt; c0 += t.bc) {
      const int64_t cols = std::min(t.bc, n_txt - c0);
      tp.logits(r0, rows, c0, cols, tile.data());
#pragma omp parallel for num_threads(t.nt) schedule(static)
      for (int64_t k = 0; k < nchunks; ++k)
        part[k] = loss_rows(tile.data(), k * kChunk, std::min((k + 1) * kChunk, rows), r0, c0,
                            cols, scale, bias, negative_only);
      for (int64_t k = 0; k < nchunks; ++k) total += part[k];  // fixed order: deterministic
    }
  }
  return total / static_cast<double>(n_img);
}

Sums forward_backward_cpu(TileProducts& tp, int64_t n_img, int64_t n_txt, float scale,
                          float bias, bool negative_only, float grad_out, const CpuOptions& opt) {
  const Tiling t = tiling(n_img, n_txt, opt);
  const float coef = static_cast<float>(static_cast<double>(grad_out) / static_cast<double>(n_img));
  std::vector<float> tile(static_cast<size_t>(t.br * t.bc));
  std::vector<double> part(static_cast<size_t>(3 * ((t.br + kChunk - 1) / kChunk)));
  Sums out;
  for (int64_t r0 = 0; r0 < n_img; r0 += t.br) {
    const int64_t rows = std::min(t.br, n_img - r0);
    const int64_t nchunks = (rows + kChunk - 1) / kChunk;
    for (int64_t c0 = 0; c0 < n_txt; c0 += t.bc) {
      const int64_t cols = std::min(t.bc, n_txt - c0);
      tp.logits(r0, rows, c0, cols, tile.data());
#pragma omp parallel for num_threads(t.nt) schedule(static)
      for (int64_t k = 0; k < nchunks; ++k)
        grad_rows(tile.data(), k * kChunk, std::min((k + 1) * kChunk, rows), r0, c0, cols, scale,
                  bias, negative_only, coef, &part[3 * k]);
      for (int64_t k = 0; k < nchunks; ++k) {  // fixed order: deterministic
        out.loss += part[3 * k];
        out.d_scale += part[3 * k + 1];
        out.d_bias += part[3 * k + 2];
      }
      tp.accumulate(r0, rows, c0, cols, tile.data(), scale);
    }
  }
  out.loss /= static_cast<double>(n_img);
  return out;
}

}  // namespace sigmoid
}  // namespace msclip
