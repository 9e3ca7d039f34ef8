// CUDA kernels of the fused sigmoid (SigLIP) loss (torch-free; launched from sigmoid_api.cpp).
//
// Math and notation: sigmoid_tile.h (Zhai et al. 2023, "Sigmoid Loss for Language Image
// Pre-Training"): loss = (1/N_I) Σ_ij softplus(q_ij), q = -z·(s·raw + b), raw = I·Tᵀ,
// G = -z·σ(q)/N_I, dI = s·G·T, dT = s·Gᵀ·I, d(scale) = Σ G·raw, d(bias) = Σ G. The per-element
// math (softplus, σ, the positive of a row) is the header's row_terms / row_grads, the same code
// the CPU driver runs, so the CPU tests exercise it.
//
// Schedule: the fused InfoNCE kernels' (contrastive_cuda.cu), on the shared tile machinery of
// common/tile_product_cuda.cuh. Each CTA owns BM = 64 rows of A and sweeps every BN-row block
// of B; tiles of raw = A·Bᵀ are formed on the fly (WMMA with fp32 accumulation for bf16/fp16,
// fp32 FMAs for fp32) and never stored beyond one CTA's shared memory. Per-CTA partial sums are
// reduced by a one-CTA kernel in a fixed order: no atomics, bitwise deterministic.
// - forward: loss_rows_kernel on (I, T) -> per-CTA float64 loss partials -> loss_reduce_kernel.
//   The loss is a plain sum (no log-sum-exp), so nothing is saved for the backward.
// - backward: grad_rows_kernel on (I, T) -> dI and per-CTA d(scale), d(bias) partials; the same
//   kernel on (T, I) -> dT, since the transposed problem has the same positives (the diagonal)
//   and G^T_ji = G_ij is the same function of q (the coefficient stays 1/N_I in both passes,
//   also for negative_only with N_I != N_T); grad_reduce_kernel -> d(scale), d(bias).
//   The backward thus forms each raw tile twice (once per pass) where a column-merging schedule
//   would form it once (3 tile products per pair over forward + backward instead of 2): the
//   price of determinism without atomics, as in the InfoNCE kernels.
// Extra memory: O(N_I / BM) doubles of workspace. Needs sm_80+ (bf16 WMMA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/tile_product_cuda.cuh"
#include "sigmoid/sigmoid_cuda.h"
#include "sigmoid/sigmoid_tile.h"

namespace msclip {
namespace sigmoid {
namespace {

using namespace ::msclip::tiles;  // BM, BN, ..., kSmem, tile_product, grad_product, from_f

// The 16-bit G tile holds Ĝ = kGScale·(-z·σ(q)), i.e. G without its 1/N_I (times grad_out)
// coefficient, which alpha re-applies after the product in fp32: G itself is ~σ/N and would
// fall into fp16's subnormals at large N. fp16 additionally takes a power-of-two scale
// (exact) so that σ down to ~4e-9 stays a normal fp16 number (|Ĝ| <= 2^14 < 65504); bf16
// has fp32's exponent range and fp32 needs neither.
template <typename T>
struct GScale {
  static constexpr float value = 1.0f;
};
template <>
struct GScale<__half> {
  static constexpr float value = 16384.0f;
};

// Column of the positive pair (global row grow) within a thread's half row starting at global
// column c0 with `cols` valid columns; -1 when it is not there (or negative_only).
__device__ __forceinline__ int positive_col(bool negative_only, int64_t grow, int64_t c0,
                                            int cols) {
  if (negative_only) return -1;
  const int64_t p = grow - c0;
  return (p >= 0 && p < cols) ? static_cast<int>(p) : -1;
}

// Valid columns of the half row [c0, c0 + BN/2) of a problem with n_b columns (<= 0: none).
__device__ __forceinline__ int half_row_cols(int64_t c0, int64_t n_b) {
  const int64_t left = n_b - c0;
  return left < BN / 2 ? static_cast<int>(left > 0 ? left : 0) : BN / 2;
}

// Σ over the CTA's kThreads threads of v, as a fixed-order tree in red[0 .. kThreads) (shared),
// returned to every thread. All threads call it; reusing red afterwards needs a barrier first
// (the threads read red[0] after the last one).
__device__ __forceinline__ double cta_sum(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) red[tid] += red[tid + w];
    __syncthreads();
  }
  return red[0];
}

// Loss terms of the CTA's BM rows of A against all of B:
// partial[blockIdx.x] = Σ_{i in rows, j < n_b} softplus(q_ij) (float64, before the 1/N_I).
// A (n_a, d), B (n_b, d) row-major; scale_ptr, bias_ptr: 1-float device buffers. Two threads per
// tile row (adjacent lanes), BN/2 columns each; each thread sums its half row of a tile in fp32
// (row_terms) and the tiles in float64.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n_a, int64_t n_b,
                     int64_t d, const float* __restrict__ scale_ptr,
                     const float* __restrict__ bias_ptr, bool negative_only,
                     double* __restrict__ partial) {
  __shared__ __align__(128) unsigned char smem[kSmem];
  const float* S = reinterpret_cast<const float*>(smem + kOffS);
  const float scale = *scale_ptr, bias = *bias_ptr;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int r = threadIdx.x >> 1, cb = (threadIdx.x & 1) * (BN / 2);
  const int64_t grow = row0 + r;
  double acc = 0.0;
  for (int64_t col0 = 0; col0 < n_b; col0 += BN) {
    tile_product<T>(A, B, n_a, n_b, d, row0, col0, smem);
    const int64_t c0 = col0 + cb;
    const int cols = half_row_cols(c0, n_b);
    if (grow < n_a && cols > 0)
      acc += row_terms(S + r * SLD + cb, cols, scale, bias,
                       positive_col(negative_only, grow, c0, cols));
    __syncthreads();  // S is overwritten by the next tile
  }
  // the loop ended on a barrier: the tile buffer is free for the reduction
  const double total = cta_sum(acc, reinterpret_cast<double*>(smem));
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// loss[0] = Σ partial[0 .. m) / n_img in one CTA (kReduceThreads threads), fixed order.
__global__ void __launch_bounds__(kReduceThreads)
    loss_reduce_kernel(const double* __restrict__ partial, int64_t m, int64_t n_img,
                       float* __restrict__ loss) {
  __shared__ double red[kReduceThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += kReduceThreads) acc += partial[i];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = static_cast<float>(red[0] / static_cast<double>(n_img));
}

// dA[rows] = scale·G·B for the CTA's BM rows of A (dA (n_a, d) fp32, zeroed beforehand), with
// G_ij = coef·(-z_ij·σ(q_ij)), coef = grad_out / n_norm (n_norm = N_I in both passes); positives
// on the diagonal i == j unless negative_only. When ds_partial is non-null, also
// ds_partial[blockIdx.x] = Σ Ĝ·raw and db_partial[blockIdx.x] = Σ Ĝ over the CTA's rows, in
// units of Ĝ = G·kGScale/coef (grad_reduce_kernel applies coef/kGScale).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n_a, int64_t n_b,
                     int64_t d, const float* __restrict__ scale_ptr,
                     const float* __restrict__ bias_ptr, bool negative_only,
                     const float* __restrict__ grad_out, int64_t n_norm, float* __restrict__ dA,
                     double* __restrict__ ds_partial, double* __restrict__ db_partial) {
  __shared__ __align__(128) unsigned char smem[kSmem];
  float* S = reinterpret_cast<float*>(smem + kOffS);
  constexpr float kGScale = GScale<T>::value;
  const float scale = *scale_ptr, bias = *bias_ptr;
  const float coef = static_cast<float>(static_cast<double>(*grad_out) / static_cast<double>(n_norm));
  const float alpha = scale * coef * (1.0f / kGScale);  // 1/kGScale: a power of two, exact
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int tid = threadIdx.x;
  const int r = tid >> 1, cb = (tid & 1) * (BN / 2);
  const int64_t grow = row0 + r;
  double ds = 0.0, db = 0.0;
  for (int64_t col0 = 0; col0 < n_b; col0 += BN) {
    tile_product<T>(A, B, n_a, n_b, d, row0, col0, smem);
    const int64_t c0 = col0 + cb;
    const int cols = half_row_cols(c0, n_b);
    const int valid = grow < n_a ? cols : 0;  // columns of this half row inside the problem
    float* row = S + r * SLD + cb;
    if (valid > 0) {
      float gs = 0.f, gb = 0.f;  // fp32 within a half row, float64 across tiles
      row_grads(row, valid, scale, bias, positive_col(negative_only, grow, c0, valid), kGScale,
                &gs, &gb);
      ds += gs;
      db += gb;
    }
    // the G tile grad_product reads (zero outside the problem: padding rows/columns of S hold
    // raw = 0, which is not G = 0)
    if constexpr (std::is_same<T, float>::value) {
      for (int c = valid; c < BN / 2; ++c) row[c] = 0.f;
    } else {
      T* g = reinterpret_cast<T*>(smem + kOffG) + r * GLD + cb;
      for (int c = 0; c < BN / 2; ++c) g[c] = from_f<T>(c < valid ? row[c] : 0.f);
    }
    __syncthreads();
    // dA[rows, :] += (scale·coef/kGScale)·Ĝ·B[col0 : col0 + BN, :]
    grad_product<T>(B, n_a, n_b, d, row0, col0, alpha, dA, smem);
  }
  if (ds_partial != nullptr) {
    // grad_product ended on a barrier: the tile buffer is free for the reductions
    double* red = reinterpret_cast<double*>(smem);
    const double ds_cta = cta_sum(ds, red);
    if (tid == 0) ds_partial[blockIdx.x] = ds_cta;
    __syncthreads();  // every thread has read red[0] before the second tree overwrites it
    const double db_cta = cta_sum(db, red);
    if (tid == 0) db_partial[blockIdx.x] = db_cta;
  }
}

// d_scale[0] = unit·Σ ds_partial, d_bias[0] = unit·Σ db_partial (one CTA, fixed order), with
// unit = grad_out / n_norm / g_scale (the coefficient the partials were summed without).
__global__ void __launch_bounds__(kReduceThreads)
    grad_reduce_kernel(const double* __restrict__ ds_partial, const double* __restrict__ db_partial,
                       int64_t m, const float* __restrict__ grad_out, int64_t n_norm,
                       float g_scale, float* __restrict__ d_scale, float* __restrict__ d_bias) {
  __shared__ double red_s[kReduceThreads], red_b[kReduceThreads];
  double as = 0.0, ab = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += kReduceThreads) {
    as += ds_partial[i];
    ab += db_partial[i];
  }
  red_s[threadIdx.x] = as;
  red_b[threadIdx.x] = ab;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      red_s[threadIdx.x] += red_s[threadIdx.x + w];
      red_b[threadIdx.x] += red_b[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double unit =
        static_cast<double>(*grad_out) / static_cast<double>(n_norm) / static_cast<double>(g_scale);
    d_scale[0] = static_cast<float>(red_s[0] * unit);
    d_bias[0] = static_cast<float>(red_b[0] * unit);
  }
}

int64_t row_blocks(int64_t n) { return (n + BM - 1) / BM; }

// gridDim.x holds one CTA per BM rows
bool grid_fits(int64_t n) { return row_blocks(n) <= 0x7fffffff; }

bool valid_problem(int64_t n_img, int64_t n_txt, int64_t d, bool negative_only) {
  return n_img >= 1 && n_txt >= 1 && d >= 1 && grid_fits(n_img) && grid_fits(n_txt) &&
         (negative_only || n_img == n_txt);
}

// The float workspace holds float64 partials: round its start up to 8 bytes (workspace_floats
// reserves the float this can skip).
double* doubles(float* ws) {
  const uintptr_t p = (reinterpret_cast<uintptr_t>(ws) + 7) & ~static_cast<uintptr_t>(7);
  return reinterpret_cast<double*>(p);
}

template <typename T>
cudaError_t forward_t(const T* I, const T* Tx, int64_t n_img, int64_t n_txt, int64_t d,
                      const float* scale, const float* bias, bool negative_only, float* ws,
                      float* loss, cudaStream_t st) {
  const int64_t blocks = row_blocks(n_img);
  double* partial = doubles(ws);
  loss_rows_kernel<T><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, st>>>(
      I, Tx, n_img, n_txt, d, scale, bias, negative_only, partial);
  loss_reduce_kernel<<<1, kReduceThreads, 0, st>>>(partial, blocks, n_img, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const T* I, const T* Tx, int64_t n_img, int64_t n_txt, int64_t d,
                       const float* scale, const float* bias, bool negative_only,
                       const float* grad_out, float* dI, float* dT, float* ws, float* d_scale,
                       float* d_bias, cudaStream_t st) {
  const int64_t blocks_img = row_blocks(n_img), blocks_txt = row_blocks(n_txt);
  double* ds_partial = doubles(ws);
  double* db_partial = ds_partial + blocks_img;
  cudaError_t e = cudaMemsetAsync(dI, 0, sizeof(float) * static_cast<size_t>(n_img * d), st);
  if (e == cudaSuccess) e = cudaMemsetAsync(dT, 0, sizeof(float) * static_cast<size_t>(n_txt * d), st);
  if (e != cudaSuccess) return e;
  grad_rows_kernel<T><<<dim3(static_cast<unsigned>(blocks_img)), kThreads, 0, st>>>(
      I, Tx, n_img, n_txt, d, scale, bias, negative_only, grad_out, n_img, dI, ds_partial,
      db_partial);
  grad_rows_kernel<T><<<dim3(static_cast<unsigned>(blocks_txt)), kThreads, 0, st>>>(
      Tx, I, n_txt, n_img, d, scale, bias, negative_only, grad_out, n_img, dT, nullptr, nullptr);
  grad_reduce_kernel<<<1, kReduceThreads, 0, st>>>(ds_partial, db_partial, blocks_img, grad_out,
                                                   n_img, GScale<T>::value, d_scale, d_bias);
  return cudaGetLastError();
}

}  // namespace

// Forward: row_blocks(n_img) doubles; backward: 2·row_blocks(n_img) doubles (d(scale) and
// d(bias) partials of the (I, T) pass; the (T, I) pass writes none). Two doubles per block plus
// one float for the 8-byte alignment, rounded up to whole doubles.
int64_t workspace_floats(int64_t n_img, int64_t n_txt) {
  (void)n_txt;  // partials exist only for the (I, T) pass
  const int64_t blocks = n_img > 0 ? row_blocks(n_img) : 0;
  return 2 * (2 * blocks) + 2;
}

cudaError_t launch_forward(const void* img, const void* txt, CudaDType dtype, int64_t n_img,
                           int64_t n_txt, int64_t d, const float* scale, const float* bias,
                           bool negative_only, float* workspace, float* loss, cudaStream_t stream) {
  if (!valid_problem(n_img, n_txt, d, negative_only)) return cudaErrorInvalidValue;
  if (!img || !txt || !scale || !bias || !workspace || !loss) return cudaErrorInvalidValue;
  switch (dtype) {
    case CudaDType::kFloat32:
      return forward_t(static_cast<const float*>(img), static_cast<const float*>(txt), n_img,
                       n_txt, d, scale, bias, negative_only, workspace, loss, stream);
    case CudaDType::kFloat16:
      return forward_t(static_cast<const __half*>(img), static_cast<const __half*>(txt), n_img,
                       n_txt, d, scale, bias, negative_only, workspace, loss, stream);
    case CudaDType::kBFloat16:
      return forward_t(static_cast<const __nv_bfloat16*>(img),
                       static_cast<const __nv_bfloat16*>(txt), n_img, n_txt, d, scale, bias,
                       negative_only, workspace, loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const void* img, const void* txt, CudaDType dtype, int64_t n_img,
                            int64_t n_txt, int64_t d, const float* scale, const float* bias,
                            bool negative_only, const float* grad_out, float* d_img, float* d_txt,
                            float* workspace, float* d_scale, float* d_bias, cudaStream_t stream) {
  if (!valid_problem(n_img, n_txt, d, negative_only)) return cudaErrorInvalidValue;
  if (!img || !txt || !scale || !bias || !grad_out || !d_img || !d_txt || !workspace || !d_scale ||
      !d_bias)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case CudaDType::kFloat32:
      return backward_t(static_cast<const float*>(img), static_cast<const float*>(txt), n_img,
                        n_txt, d, scale, bias, negative_only, grad_out, d_img, d_txt, workspace,
                        d_scale, d_bias, stream);
    case CudaDType::kFloat16:
      return backward_t(static_cast<const __half*>(img), static_cast<const __half*>(txt), n_img,
                        n_txt, d, scale, bias, negative_only, grad_out, d_img, d_txt, workspace,
                        d_scale, d_bias, stream);
    case CudaDType::kBFloat16:
      return backward_t(static_cast<const __nv_bfloat16*>(img),
                        static_cast<const __nv_bfloat16*>(txt), n_img, n_txt, d, scale, bias,
                        negative_only, grad_out, d_img, d_txt, workspace, d_scale, d_bias, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sigmoid
}  // namespace msclip
