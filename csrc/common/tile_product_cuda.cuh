// CUDA tile machinery shared by the fused-loss kernels (csrc/contrastive/contrastive_cuda.cu,
// csrc/sigmoid/sigmoid_cuda.cu): the shared-memory layout of one CTA, the raw tile product
// S = A_blk·B_blkᵀ and the gradient product dA_blk += alpha·G·B_blk. Torch-free, device code only
// (a .cuh: included by the .cu files, never compiled alone).
//
// Schedule both ops follow (flash-attention style): a CTA of kThreads threads owns BM rows of A
// (n_a rows in all) and sweeps every BN-row block of B (n_b rows); both share the feature width d.
// Row statistics and row gradients therefore stay CTA-local: no atomics, bitwise deterministic.
// bf16/fp16 tiles go through WMMA 16x16x16 with fp32 accumulation, fp32 tiles through fp32 FMAs.
// Needs sm_80+ (bf16 WMMA).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace msclip {
namespace tiles {

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
constexpr int kReduceThreads = 256;  // threads of the one-CTA reductions of per-CTA partials
static_assert(kSmem <= 48 * 1024, "static shared memory limit");
static_assert(kOffA % 32 == 0 && kOffB % 32 == 0 && kOffG % 32 == 0 && kOffB2 % 32 == 0, "align");

// Tile-shape assumptions the kernels are written for: changing one constant must stop the build
// here rather than silently compute a wrong loss.
// - tile_product loads the A and the B tile in ONE loop over BM x BK elements (row rr of both),
//   so a B tile has BM rows.
static_assert(BM == BN, "tile_product loads A and B tiles with one BM x BK loop: BN must equal BM");
// - two threads per tile row: the row kernels of both ops (and grad_product's fp32 path) take
//   r = tid >> 1 and each half of the row's BN columns (BK/2 features in the fp32 gradient
//   product); the fp32 tile product takes r = tid & (BM - 1) and ch = tid / BM in {0, 1}.
static_assert(kThreads == 2 * BM, "two threads per tile row: kThreads must be 2 * BM");
static_assert((BM & (BM - 1)) == 0, "tid & (BM - 1) stands for tid % BM: BM must be a power of two");
static_assert(BN % 2 == 0 && BK % 2 == 0, "the two threads of a row split BN columns and BK features in halves");
// - whole warps: __shfl_xor_sync(0xffffffff, v, 1) merges the two threads of a row (adjacent
//   lanes) and needs every lane of the warp; the WMMA path gives warp w tile rows [16w, 16w + 16).
static_assert(kThreads % 32 == 0, "whole warps only (full-mask shuffles)");
static_assert(BM == 16 * (kThreads / 32), "WMMA path: one 16-row slab of the tile per warp");
static_assert(BN % 16 == 0 && BK % 16 == 0 && BD % 16 == 0, "WMMA 16x16x16 fragments tile BN, BK and BD");
// - tree reductions halve their thread count down to 1.
static_assert((kThreads & (kThreads - 1)) == 0, "per-CTA tree reductions need a power of two");
static_assert((kReduceThreads & (kReduceThreads - 1)) == 0, "one-CTA reductions need a power of two");
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

// S[r][c] = Σ_k A[row0 + r]·B[col0 + c] (fp32) for the CTA's BM x BN tile, zero where
// row0 + r >= n_a or col0 + c >= n_b (the padding rows/columns hold exact zeros).
// A: (n_a, d), B: (n_b, d), row-major, T in {float, __half, __nv_bfloat16}; S is float
// [BM][SLD] at smem + kOffS. All kThreads threads call it; it ends with __syncthreads.
template <typename T>
__device__ void tile_product(const T* __restrict__ A, const T* __restrict__ B, int64_t n_a,
                             int64_t n_b, int64_t d, int64_t row0, int64_t col0,
                             unsigned char* smem) {
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
        As[rr * FLD + kk] = (ga < n_a && gk < d) ? A[ga * d + gk] : 0.f;
        Bs[rr * FLD + kk] = (gb < n_b && gk < d) ? B[gb * d + gk] : 0.f;
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
        As[rr * HLD + kk] = (ga < n_a && gk < d) ? A[ga * d + gk] : from_f<T>(0.f);
        Bs[rr * HLD + kk] = (gb < n_b && gk < d) ? B[gb * d + gk] : from_f<T>(0.f);
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

// dA[row0 + r, :] += alpha·Σ_c G[r][c]·B[col0 + c, :] for the rows r with row0 + r < n_a, i.e.
// the CTA's rows of alpha·G·B_blk (dA: (n_a, d) fp32, row-major; B: (n_b, d) as in tile_product).
// G is the BM x BN gradient tile, already in shared memory and followed by a __syncthreads:
// fp32 path (T = float) in S (float [BM][SLD] at kOffS), 16-bit paths in Gs (T [BM][GLD] at
// kOffG); its entries for columns col0 + c >= n_b must be zero (they multiply B's zero padding,
// but a NaN/inf there would still leak). Overwrites S (the 16-bit path stages each product chunk
// there) and the As/B2s regions. Only the CTA's rows of dA are touched, in a fixed order: no
// atomics. All kThreads threads call it; it ends with __syncthreads.
template <typename T>
__device__ void grad_product(const T* __restrict__ B, int64_t n_a, int64_t n_b, int64_t d,
                             int64_t row0, int64_t col0, float alpha, float* __restrict__ dA,
                             unsigned char* smem) {
  float* S = reinterpret_cast<float*>(smem + kOffS);
  const int tid = threadIdx.x;
  if constexpr (std::is_same<T, float>::value) {
    const int r = tid >> 1, half = tid & 1;
    const int64_t grow = row0 + r;
    float* B2 = reinterpret_cast<float*>(smem + kOffA);  // [BN][FLD], reused
    const int dh = half * (BK / 2);
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int jj = e / BK, kk = e % BK;
        const int64_t gb = col0 + jj, gk = k0 + kk;
        B2[jj * FLD + kk] = (gb < n_b && gk < d) ? B[gb * d + gk] : 0.f;
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
      if (grow < n_a)
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
        B2[jj * GLD + kk] = (gb < n_b && gk < d) ? B[gb * d + gk] : from_f<T>(0.f);
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
        if (gr < n_a && gk < d) dA[gr * d + gk] += alpha * S[rr * SLD + kk];
      }
      __syncthreads();
    }
  }
}

}  // namespace tiles
}  // namespace msclip
