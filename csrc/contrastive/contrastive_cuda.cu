// CUDA kernels of the fused contrastive loss (torch-free; launched from contrastive_api.cpp).
//
// Same math as the CPU path, from the same header (contrastive_tile.h): tiles of raw = A·Bᵀ are
// computed on the fly (bf16/fp16 on tensor cores through WMMA 16x16x16 with fp32 accumulation,
// fp32 inputs with fp32 FMAs), log-sum-exps merged online, G assembled from the LSEs.
// Scheduling: each CTA owns BM = 64 rows of A and sweeps every column block of B (flash-attention
// style), so row statistics and row gradients are CTA-local: no atomics, bitwise deterministic.
// Column quantities are the row quantities of the transposed problem (B, A): the forward runs the
// row kernel on (I, T) and on (T, I); the backward runs the gradient kernel on (I, T) for dI
// (and d(scale)) and on (T, I) for dT, since G is symmetric in its two roles. This costs one
// more tile product per pass than the CPU schedule in exchange for determinism without atomics;
// an atomic column-merge schedule behind a flag is the known next step (see issue 4 notes).
// Extra memory: O(N) floats (LSEs, per-CTA d(scale) partials). Needs sm_80+ (bf16 WMMA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "contrastive/contrastive_cuda.h"
#include "contrastive/contrastive_tile.h"

namespace msclip {
namespace contrastive {
namespace {

constexpr int BM = 64;       // rows of A per CTA
constexpr int BN = 64;       // rows of B per tile
constexpr int BK = 32;       // K (feature) chunk of the tile product
constexpr int BD = 64;       // feature chunk of the gradient product (half path)
constexpr int kThreads = 128;
constexpr int SLD = BN + 4;  // fp32 tile leading dimension (multiple of 4 for WMMA stores)
constexpr int HLD = BK + 8;  // 16-bit K-chunk leading dimension (multiple of 8)
constexpr int GLD = BN + 8;  // 16-bit G / B-chunk leading dimension
constexpr int FLD = BK + 1;  // fp32 K-chunk leading dimension (odd: no bank conflicts)

// Shared memory layout in bytes (one static buffer, carved per path; offsets are multiples of
// 32 bytes as WMMA requires).
constexpr int kOffS = 0;                                  // float S[BM][SLD]
constexpr int kOffA = kOffS + BM * SLD * 4;               // 17408
constexpr int kOffB = kOffA + BM * HLD * 2;               // half: As[BM][HLD]
constexpr int kOffG = kOffB + BN * HLD * 2;               // half: Gs[BM][GLD]
constexpr int kOffB2 = kOffG + BM * GLD * 2;              // half: B2s[BN][GLD]
constexpr int kSmemHalf = kOffB2 + BN * GLD * 2;          // 46080
constexpr int kOffBf = kOffA + BM * FLD * 4;              // float: Bs[BN][FLD]
constexpr int kSmemFloat = kOffBf + BN * FLD * 4;         // 34304
constexpr int kSmem = kSmemHalf > kSmemFloat ? kSmemHalf : kSmemFloat;
constexpr int kReduceThreads = 256;  // threads of the one-CTA reductions (loss_kernel, sum_kernel)
static_assert(kSmem <= 48 * 1024, "static shared memory limit");
static_assert(kOffA % 32 == 0 && kOffB % 32 == 0 && kOffG % 32 == 0 && kOffB2 % 32 == 0, "align");

// Tile-shape assumptions the kernels below are written for: changing one constant must stop
// the build here rather than silently compute a wrong loss.
// - tile_product loads the A and the B tile in ONE loop over BM x BK elements (row rr of both),
//   so a B tile has BM rows.
static_assert(BM == BN, "tile_product loads A and B tiles with one BM x BK loop: BN must equal BM");
// - two threads per tile row: lse_rows_kernel / grad_rows_kernel take r = tid >> 1 and each half
//   of the row's BN columns (BK/2 features in the fp32 gradient product); the fp32 tile product
//   takes r = tid & (BM - 1) and ch = tid / BM in {0, 1}.
static_assert(kThreads == 2 * BM, "two threads per tile row: kThreads must be 2 * BM");
static_assert((BM & (BM - 1)) == 0, "tid & (BM - 1) stands for tid % BM: BM must be a power of two");
static_assert(BN % 2 == 0 && BK % 2 == 0, "the two threads of a row split BN columns and BK features in halves");
// - whole warps: __shfl_xor_sync(0xffffffff, v, 1) merges the two threads of a row (adjacent
//   lanes) and needs every lane of the warp; the WMMA path gives warp w tile rows [16w, 16w + 16).
static_assert(kThreads % 32 == 0, "whole warps only (full-mask shuffles)");
static_assert(BM == 16 * (kThreads / 32), "WMMA path: one 16-row slab of the tile per warp");
static_assert(BN % 16 == 0 && BK % 16 == 0 && BD % 16 == 0, "WMMA 16x16x16 fragments tile BN, BK and BD");
// - tree reductions halve their thread count down to 1.
static_assert((kThreads & (kThreads - 1)) == 0, "grad_rows_kernel's d(scale) reduction needs a power of two");
static_assert((kReduceThreads & (kReduceThreads - 1)) == 0, "loss/sum reductions need a power of two");
// - shared-memory tiles: leading dimensions cover their rows, the dA chunk (BD features) is staged
//   in S, the fp32 gradient path reuses As's region for its [BN][FLD] B chunk.
static_assert(SLD >= BN && HLD >= BK && GLD >= BN && FLD >= BK, "leading dimensions cover a tile row");
static_assert(BD <= BN && BD <= GLD, "the dA chunk (BD columns) fits S's rows and the B2s rows");
static_assert(BN * FLD * 4 <= kOffBf - kOffA, "fp32 gradient path: B chunk [BN][FLD] fits As's region");
// - WMMA: leading dimensions multiple of 8 (16-bit) / 4 (fp32); every fragment pointer (16-row
//   slab offsets, 16-column offsets) 256-bit aligned.
static_assert(HLD % 8 == 0 && GLD % 8 == 0 && SLD % 4 == 0, "WMMA leading dimensions");
static_assert((16 * HLD * 2) % 32 == 0 && (16 * GLD * 2) % 32 == 0 && (16 * SLD * 4) % 32 == 0,
              "WMMA fragment pointers stay 32-byte aligned");

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// S[r][c] = Σ_k A[row0 + r]·B[col0 + c] (fp32), zero outside [0, n). Ends with __syncthreads.
template <typename T>
__device__ void tile_product(const T* __restrict__ A, const T* __restrict__ B, int64_t n,
                             int64_t d, int64_t row0, int64_t col0, unsigned char* smem) {
  float* S = reinterpret_cast<float*>(smem + kOffS);
  const int tid = threadIdx.x;
  if constexpr (std::is_same<T, float>::value) {
    float* As = reinterpret_cast<float*>(smem + kOffA);
    float* Bs = reinterpret_cast<float*>(smem + kOffBf);
    const int r = tid & (BM - 1), ch = tid / BM;  // row, half of the columns (0/1)
    float acc[BN / 2];
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) acc[c] = 0.f;
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int rr = e / BK, kk = e % BK;
        const int64_t ga = row0 + rr, gb = col0 + rr, gk = k0 + kk;
        As[rr * FLD + kk] = (ga < n && gk < d) ? A[ga * d + gk] : 0.f;
        Bs[rr * FLD + kk] = (gb < n && gk < d) ? B[gb * d + gk] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        const float a = As[r * FLD + kk];
#pragma unroll
        for (int c = 0; c < BN / 2; ++c) acc[c] += a * Bs[(ch * (BN / 2) + c) * FLD + kk];
      }
      __syncthreads();
    }
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) S[r * SLD + ch * (BN / 2) + c] = acc[c];
  } else {
    using namespace nvcuda;
    T* As = reinterpret_cast<T*>(smem + kOffA);
    T* Bs = reinterpret_cast<T*>(smem + kOffB);
    const int warp = tid / 32;  // warp w: rows [16w, 16w + 16), all BN columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
    for (int c = 0; c < BN / 16; ++c) wmma::fill_fragment(acc[c], 0.f);
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int rr = e / BK, kk = e % BK;
        const int64_t ga = row0 + rr, gb = col0 + rr, gk = k0 + kk;
        As[rr * HLD + kk] = (ga < n && gk < d) ? A[ga * d + gk] : from_f<T>(0.f);
        Bs[rr * HLD + kk] = (gb < n && gk < d) ? B[gb * d + gk] : from_f<T>(0.f);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, As + warp * 16 * HLD + kk, HLD);
#pragma unroll
        for (int c = 0; c < BN / 16; ++c) {
          // Bᵀ as a K x BN column-major matrix is B's rows as stored: Bs[col][k]
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, Bs + c * 16 * HLD + kk, HLD);
          wmma::mma_sync(acc[c], fa, fb, acc[c]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int c = 0; c < BN / 16; ++c)
      wmma::store_matrix_sync(S + warp * 16 * SLD + c * 16, acc[c], SLD, wmma::mem_row_major);
  }
  __syncthreads();
}

// Row log-sum-exp of scale·A·Bᵀ: lse[i] for the CTA's rows; diag[i] = raw A_i·B_i if non-null.
// Two threads per row (adjacent lanes), 32 columns each, merged with a shuffle.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n, int64_t d,
                    const float* __restrict__ scale_ptr, float* __restrict__ lse,
                    float* __restrict__ diag) {
  __shared__ __align__(128) unsigned char smem[kSmem];
  const float* S = reinterpret_cast<const float*>(smem + kOffS);
  const float scale = *scale_ptr;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t grow = row0 + r;
  Lse acc = lse_empty();
  float dval = 0.f;
  for (int64_t col0 = 0; col0 < n; col0 += BN) {
    tile_product<T>(A, B, n, d, row0, col0, smem);
    Lse part = lse_empty();
    const int cb = half * (BN / 2);
    float m = neg_inf();
    for (int c = 0; c < BN / 2; ++c)
      if (col0 + cb + c < n) m = fmaxf(m, scale * S[r * SLD + cb + c]);
    if (m != neg_inf()) {
      float s = 0.f;
      for (int c = 0; c < BN / 2; ++c)
        if (col0 + cb + c < n) s += exp_nonpos(scale * S[r * SLD + cb + c] - m);
      part = Lse{m, s};
    }
    const int64_t dc = grow - col0 - cb;
    if (dc >= 0 && dc < BN / 2) dval = S[r * SLD + cb + dc];
    Lse other{__shfl_xor_sync(0xffffffffu, part.m, 1), __shfl_xor_sync(0xffffffffu, part.s, 1)};
    acc = lse_merge(acc, half == 0 ? lse_merge(part, other) : lse_merge(other, part));
    __syncthreads();  // S is overwritten by the next tile
  }
  dval += __shfl_xor_sync(0xffffffffu, dval, 1);  // only one of the pair found it
  if (half == 0 && grow < n) {
    lse[grow] = lse_value(acc);
    if (diag != nullptr) diag[grow] = dval;
  }
}

// loss = Σ_i (lse_row + lse_col − 2·scale·diag) / (2N) in one CTA, fixed reduction order.
__global__ void loss_kernel(const float* __restrict__ lse_row, const float* __restrict__ lse_col,
                            const float* __restrict__ diag, int64_t n,
                            const float* __restrict__ scale_ptr, float* __restrict__ loss) {
  __shared__ double red[kReduceThreads];  // launched with kReduceThreads threads
  const float scale = *scale_ptr;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    acc += static_cast<double>(lse_row[i]) + lse_col[i] - 2.0 * scale * static_cast<double>(diag[i]);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = static_cast<float>(red[0] / (2.0 * static_cast<double>(n)));
}

// dA[rows] = scale·G·B for the CTA's rows (dA zeroed beforehand), with
// G_ij = coef·(exp(x_ij − lse_a[i]) + exp(x_ij − lse_b[j]) − 2δ_ij), coef = grad_out / (2N);
// ds_partial[blockIdx.x] = Σ G·raw over the CTA's rows when ds_partial is non-null.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n, int64_t d,
                     const float* __restrict__ scale_ptr, const float* __restrict__ lse_a,
                     const float* __restrict__ lse_b, const float* __restrict__ grad_out,
                     float* __restrict__ dA, float* __restrict__ ds_partial) {
  __shared__ __align__(128) unsigned char smem[kSmem];
  __shared__ float red[kThreads];
  float* S = reinterpret_cast<float*>(smem + kOffS);
  const float scale = *scale_ptr;
  const float coef = static_cast<float>(static_cast<double>(*grad_out) / (2.0 * n));
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int tid = threadIdx.x;
  const int r = tid >> 1, half = tid & 1, cb = half * (BN / 2);
  const int64_t grow = row0 + r;
  const float lr = grow < n ? lse_a[grow] : 0.f;
  float ds = 0.f;
  for (int64_t col0 = 0; col0 < n; col0 += BN) {
    tile_product<T>(A, B, n, d, row0, col0, smem);
    // G / coef = P_row + P_col − 2δ in [−2, 2]: stored unscaled so 16-bit types keep precision
    for (int c = cb; c < cb + BN / 2; ++c) {
      const int64_t gc = col0 + c;
      float g = 0.f;
      if (grow < n && gc < n) {
        const float raw = S[r * SLD + c];
        const float x = scale * raw;
        g = exp_nonpos(x - lr) + exp_nonpos(x - lse_b[gc]) - (gc == grow ? 2.f : 0.f);
        ds += coef * g * raw;
      }
      if constexpr (std::is_same<T, float>::value) {
        S[r * SLD + c] = g;
      } else {
        reinterpret_cast<T*>(smem + kOffG)[r * GLD + c] = from_f<T>(g);
      }
    }
    __syncthreads();
    // dA[rows, :] += (scale·coef)·Ĝ·B[col0 : col0 + BN, :]
    const float alpha = scale * coef;
    if constexpr (std::is_same<T, float>::value) {
      float* B2 = reinterpret_cast<float*>(smem + kOffA);  // [BN][FLD], reused
      const int dh = half * (BK / 2);
      for (int64_t k0 = 0; k0 < d; k0 += BK) {
        for (int e = tid; e < BN * BK; e += kThreads) {
          const int jj = e / BK, kk = e % BK;
          const int64_t gb = col0 + jj, gk = k0 + kk;
          B2[jj * FLD + kk] = (gb < n && gk < d) ? B[gb * d + gk] : 0.f;
        }
        __syncthreads();
        float acc[BK / 2];
#pragma unroll
        for (int q = 0; q < BK / 2; ++q) acc[q] = 0.f;
        for (int j = 0; j < BN; ++j) {
          const float g = S[r * SLD + j];
#pragma unroll
          for (int q = 0; q < BK / 2; ++q) acc[q] += g * B2[j * FLD + dh + q];
        }
        if (grow < n)
          for (int q = 0; q < BK / 2; ++q)
            if (k0 + dh + q < d) dA[grow * d + k0 + dh + q] += alpha * acc[q];
        __syncthreads();
      }
    } else {
      using namespace nvcuda;
      const T* Gs = reinterpret_cast<const T*>(smem + kOffG);
      T* B2 = reinterpret_cast<T*>(smem + kOffB2);  // [BN][GLD]: B rows x feature chunk
      const int warp = tid / 32;
      for (int64_t k0 = 0; k0 < d; k0 += BD) {
        for (int e = tid; e < BN * BD; e += kThreads) {
          const int jj = e / BD, kk = e % BD;
          const int64_t gb = col0 + jj, gk = k0 + kk;
          B2[jj * GLD + kk] = (gb < n && gk < d) ? B[gb * d + gk] : from_f<T>(0.f);
        }
        __syncthreads();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BD / 16];
#pragma unroll
        for (int c = 0; c < BD / 16; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
        for (int kk = 0; kk < BN; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, Gs + warp * 16 * GLD + kk, GLD);
#pragma unroll
          for (int c = 0; c < BD / 16; ++c) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, B2 + kk * GLD + c * 16, GLD);
            wmma::mma_sync(acc[c], fa, fb, acc[c]);
          }
        }
        // S (the raw tile) is no longer needed: stage the product there, then add to dA
#pragma unroll
        for (int c = 0; c < BD / 16; ++c)
          wmma::store_matrix_sync(S + warp * 16 * SLD + c * 16, acc[c], SLD, wmma::mem_row_major);
        __syncthreads();
        for (int e = tid; e < BM * BD; e += kThreads) {
          const int rr = e / BD, kk = e % BD;
          const int64_t gr = row0 + rr, gk = k0 + kk;
          if (gr < n && gk < d) dA[gr * d + gk] += alpha * S[rr * SLD + kk];
        }
        __syncthreads();
      }
    }
  }
  if (ds_partial != nullptr) {
    red[tid] = ds;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (tid < w) red[tid] += red[tid + w];
      __syncthreads();
    }
    if (tid == 0) ds_partial[blockIdx.x] = red[0];
  }
}

// d_scale = Σ partials (one CTA, fixed order).
__global__ void sum_kernel(const float* __restrict__ part, int64_t m, float* __restrict__ out) {
  __shared__ double red[kReduceThreads];  // launched with kReduceThreads threads
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) acc += part[i];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(red[0]);
}

int64_t row_blocks(int64_t n) { return (n + BM - 1) / BM; }

// gridDim.x holds one CTA per BM rows
bool grid_fits(int64_t n) { return row_blocks(n) <= 0x7fffffff; }

template <typename T>
cudaError_t forward_t(const T* I, const T* Tx, int64_t n, int64_t d, const float* scale,
                      float* lse_row, float* lse_col, float* diag, float* loss, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(row_blocks(n)));
  lse_rows_kernel<T><<<grid, kThreads, 0, st>>>(I, Tx, n, d, scale, lse_row, diag);
  lse_rows_kernel<T><<<grid, kThreads, 0, st>>>(Tx, I, n, d, scale, lse_col, nullptr);
  loss_kernel<<<1, kReduceThreads, 0, st>>>(lse_row, lse_col, diag, n, scale, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const T* I, const T* Tx, int64_t n, int64_t d, const float* scale,
                       const float* lse_row, const float* lse_col, const float* grad_out,
                       float* dI, float* dT, float* ws, float* d_scale, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(row_blocks(n)));
  cudaError_t e = cudaMemsetAsync(dI, 0, sizeof(float) * n * d, st);
  if (e == cudaSuccess) e = cudaMemsetAsync(dT, 0, sizeof(float) * n * d, st);
  if (e != cudaSuccess) return e;
  grad_rows_kernel<T><<<grid, kThreads, 0, st>>>(I, Tx, n, d, scale, lse_row, lse_col, grad_out,
                                                 dI, ws);
  grad_rows_kernel<T><<<grid, kThreads, 0, st>>>(Tx, I, n, d, scale, lse_col, lse_row, grad_out,
                                                 dT, nullptr);
  sum_kernel<<<1, kReduceThreads, 0, st>>>(ws, row_blocks(n), d_scale);
  return cudaGetLastError();
}

}  // namespace

int64_t backward_workspace_floats(int64_t n) { return row_blocks(n) + 1; }

cudaError_t launch_forward(const void* img, const void* txt, CudaDType dtype, int64_t n, int64_t d,
                           const float* scale, float* lse_row, float* lse_col, float* diag,
                           float* loss, cudaStream_t stream) {
  if (n < 1 || d < 1 || !grid_fits(n)) return cudaErrorInvalidValue;
  switch (dtype) {
    case CudaDType::kFloat32:
      return forward_t(static_cast<const float*>(img), static_cast<const float*>(txt), n, d, scale,
                       lse_row, lse_col, diag, loss, stream);
    case CudaDType::kFloat16:
      return forward_t(static_cast<const __half*>(img), static_cast<const __half*>(txt), n, d,
                       scale, lse_row, lse_col, diag, loss, stream);
    case CudaDType::kBFloat16:
      return forward_t(static_cast<const __nv_bfloat16*>(img),
                       static_cast<const __nv_bfloat16*>(txt), n, d, scale, lse_row, lse_col, diag,
                       loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const void* img, const void* txt, CudaDType dtype, int64_t n,
                            int64_t d, const float* scale, const float* lse_row,
                            const float* lse_col, const float* grad_out, float* d_img,
                            float* d_txt, float* workspace, float* d_scale, cudaStream_t stream) {
  if (n < 1 || d < 1 || !grid_fits(n)) return cudaErrorInvalidValue;
  switch (dtype) {
    case CudaDType::kFloat32:
      return backward_t(static_cast<const float*>(img), static_cast<const float*>(txt), n, d,
                        scale, lse_row, lse_col, grad_out, d_img, d_txt, workspace, d_scale,
                        stream);
    case CudaDType::kFloat16:
      return backward_t(static_cast<const __half*>(img), static_cast<const __half*>(txt), n, d,
                        scale, lse_row, lse_col, grad_out, d_img, d_txt, workspace, d_scale,
                        stream);
    case CudaDType::kBFloat16:
      return backward_t(static_cast<const __nv_bfloat16*>(img),
                        static_cast<const __nv_bfloat16*>(txt), n, d, scale, lse_row, lse_col,
                        grad_out, d_img, d_txt, workspace, d_scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace contrastive
}  // namespace msclip
