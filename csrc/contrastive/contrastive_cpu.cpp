// CPU driver of the fused contrastive loss; see contrastive_cpu.h. Tile loop order: row blocks
// outer, column blocks inner. Inside a tile the rows are split among OpenMP threads in chunks of
// kChunk rows: each chunk's row statistics and its column statistics are computed while the
// chunk is hot in L1/L2; per-thread column partials are merged in a fixed thread order after the
// tile (deterministic for a given thread count).
#include "contrastive/contrastive_cpu.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "contrastive/contrastive_tile.h"

// Hot loops get AVX-512 / AVX2 clones picked at load time (ifunc), so a generic x86-64 build still
// vectorizes the exp polynomial at full width; other architectures use the plain build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MSCLIP_NO_CLONES)
#define MSCLIP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSCLIP_CLONES
#endif

namespace msclip {
namespace contrastive {
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

// Row statistics of rows [i0, i1) merged into row_m/row_s (global row accumulators at the tile's
// first row), and column statistics of those rows merged into the thread's partials pm/ps.
MSCLIP_CLONES void stats_rows(const float* tile, int64_t i0, int64_t i1, int64_t cols, float scale,
                              float* row_m, float* row_s, float* pm, float* ps) {
  for (int64_t c = i0; c < i1; c += kChunk) {
    const int64_t ce = std::min(c + kChunk, i1);
    for (int64_t i = c; i < ce; ++i) {
      Lse r = row_lse(tile + i * cols, static_cast<int>(cols), scale);
      Lse acc = lse_merge(Lse{row_m[i], row_s[i]}, r);
      row_m[i] = acc.m;
      row_s[i] = acc.s;
    }
    col_lse_update(tile + c * cols, static_cast<int>(ce - c), static_cast<int>(cols), cols, scale,
                   pm, ps);
  }
}

// Rows [i0, i1) of the tile become G (times coef); returns Σ G·raw over them.
MSCLIP_CLONES double grad_rows(float* tile, int64_t i0, int64_t i1, int64_t r0, int64_t c0,
                               int64_t cols, float scale, const float* lse_row,
                               const float* lse_col_tile, float coef) {
  double ds = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    float* row = tile + i * cols;
    const int64_t gi = r0 + i;  // global row; its pair sits at column gi - c0 when in the tile
    const int64_t d = gi - c0;
    const float raw_ii = (d >= 0 && d < cols) ? row[d] : 0.0f;
    ds += grad_row(row, static_cast<int>(cols), scale, lse_row[gi], lse_col_tile, coef);
    if (d >= 0 && d < cols) ds += grad_diag_fix(row + d, raw_ii, coef);
  }
  return ds;
}

void split(int64_t n, int t, int nt, int64_t* b, int64_t* e) {
  const int64_t per = (n + nt - 1) / nt;
  *b = std::min(n, per * t);
  *e = std::min(n, *b + per);
}

}  // namespace

double forward_cpu(TileProducts& tp, int64_t n, float scale, float* lse_row, float* lse_col,
                   const CpuOptions& opt) {
  const int64_t br = std::max<int64_t>(1, std::min(opt.tile_rows, n));
  const int64_t bc = std::max<int64_t>(1, std::min(opt.tile_cols, n));
  const int nt = threads_for(opt);
  std::vector<float> tile(static_cast<size_t>(br * bc));
  std::vector<float> row_m(n, neg_inf()), row_s(n, 0.0f), col_m(n, neg_inf()), col_s(n, 0.0f);
  std::vector<float> part_m(static_cast<size_t>(nt) * bc), part_s(static_cast<size_t>(nt) * bc);
  std::vector<float> diag(n, 0.0f);

  for (int64_t r0 = 0; r0 < n; r0 += br) {
    const int64_t rows = std::min(br, n - r0);
    for (int64_t c0 = 0; c0 < n; c0 += bc) {
      const int64_t cols = std::min(bc, n - c0);
      tp.logits(r0, rows, c0, cols, tile.data());
      const float* t = tile.data();
      // diagonal raw values of the pairs inside this tile
      for (int64_t i = std::max(r0, c0); i < std::min(r0 + rows, c0 + cols); ++i)
        diag[i] = t[(i - r0) * cols + (i - c0)];
#pragma omp parallel num_threads(nt)
      {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        float* pm = part_m.data() + static_cast<size_t>(tid) * bc;
        float* ps = part_s.data() + static_cast<size_t>(tid) * bc;
        std::fill(pm, pm + cols, neg_inf());
        std::fill(ps, ps + cols, 0.0f);
        int64_t i0, i1;
        split(rows, tid, nth, &i0, &i1);
        stats_rows(t, i0, i1, cols, scale, row_m.data() + r0, row_s.data() + r0, pm, ps);
#pragma omp barrier
        int64_t j0, j1;
        split(cols, tid, nth, &j0, &j1);
        for (int64_t j = j0; j < j1; ++j) {
          Lse acc{col_m[c0 + j], col_s[c0 + j]};
          for (int u = 0; u < nth; ++u)
            acc = lse_merge(acc, Lse{part_m[static_cast<size_t>(u) * bc + j],
                                     part_s[static_cast<size_t>(u) * bc + j]});
          col_m[c0 + j] = acc.m;
          col_s[c0 + j] = acc.s;
        }
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    lse_row[i] = lse_value(Lse{row_m[i], row_s[i]});
    lse_col[i] = lse_value(Lse{col_m[i], col_s[i]});
  }
  return loss_from_lse(lse_row, lse_col, diag.data(), n, scale);
}

double backward_cpu(TileProducts& tp, int64_t n, float scale, const float* lse_row,
                    const float* lse_col, float grad_out, const CpuOptions& opt) {
  const int64_t br = std::max<int64_t>(1, std::min(opt.tile_rows, n));
  const int64_t bc = std::max<int64_t>(1, std::min(opt.tile_cols, n));
  const int nt = threads_for(opt);
  const float coef = static_cast<float>(static_cast<double>(grad_out) / (2.0 * n));
  std::vector<float> tile(static_cast<size_t>(br * bc));
  std::vector<double> chunk_ds(static_cast<size_t>((br + kChunk - 1) / kChunk));
  double ds = 0.0;
  for (int64_t r0 = 0; r0 < n; r0 += br) {
    const int64_t rows = std::min(br, n - r0);
    for (int64_t c0 = 0; c0 < n; c0 += bc) {
      const int64_t cols = std::min(bc, n - c0);
      tp.logits(r0, rows, c0, cols, tile.data());
      const int64_t nchunks = (rows + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t k = 0; k < nchunks; ++k)
        chunk_ds[k] = grad_rows(tile.data(), k * kChunk, std::min((k + 1) * kChunk, rows), r0, c0,
                                cols, scale, lse_row, lse_col + c0, coef);
      for (int64_t k = 0; k < nchunks; ++k) ds += chunk_ds[k];  // fixed order: deterministic
      tp.accumulate(r0, rows, c0, cols, tile.data(), scale);
    }
  }
  return ds;
}

}  // namespace contrastive
}  // namespace msclip
