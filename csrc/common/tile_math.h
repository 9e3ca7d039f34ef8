// Torch-free scalar math shared by every fused loss's tile code (csrc/<op>/<op>_tile.h), on the
// host (C++ CPU drivers, C++ unit tests) and on the device (CUDA kernels).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MSCLIP_HD __host__ __device__ __forceinline__
#else
#define MSCLIP_HD inline
#endif

// `omp simd` on the host loops of the tile math: GCC 12 at -O3 does not reorder fp32 sums by
// itself, and 8- or 16-wide exp/log1p is most of the CPU losses' elementwise time. The CPU builds
// also pass -fno-trapping-math (setup.py, CMakeLists.txt): without it GCC keeps the float
// compares of these selects as branches ("control flow in loop") and nothing vectorizes. Empty on the device and without
// OpenMP (the reductions then stay scalar, same results up to summation order).
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define MSCLIP_PRAGMA(x) _Pragma(#x)
#define MSCLIP_SIMD MSCLIP_PRAGMA(omp simd)
#define MSCLIP_SIMD_SUM(...) MSCLIP_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define MSCLIP_SIMD_MAX(...) MSCLIP_PRAGMA(omp simd reduction(max : __VA_ARGS__))
#else
#define MSCLIP_SIMD
#define MSCLIP_SIMD_SUM(...)
#define MSCLIP_SIMD_MAX(...)
#endif

namespace msclip {

// -inf (INFINITY from <cmath> is a constant expression on host and device).
MSCLIP_HD float neg_inf() { return -INFINITY; }

// exp(x) for x <= 0 (the only domain the losses need: x minus a running max, or -|x|).
// Cephes-style range reduction + degree-6 polynomial, ~2 ulp on [-87, 0], 0 below -87
// (e^-87 < 2e-38 is far below one ulp of any sum that contains its max term, which is 1).
// Written branch-free with integer truncation so GCC vectorizes it at -O3 (no libm call).
MSCLIP_HD float exp_nonpos(float x) {
  const float log2e = 1.44269504088896341f;
  const float c1 = 0.693359375f;      // ln 2 split in two for an exact n·ln2
  const float c2 = -2.12194440e-4f;
  float xc = x < -87.0f ? -87.0f : x;  // also maps -inf to -87 (result forced to 0 below)
  // round to nearest for t <= 0: truncation of t - 0.5
  int n = static_cast<int>(xc * log2e - 0.5f);
  float fn = static_cast<float>(n);
  float r = xc - fn * c1 - fn * c2;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n by building the exponent bits (n in [-126, 0] here)
  int32_t bits = (n + 127) << 23;
#if defined(__CUDA_ARCH__)
  float two_n = __int_as_float(bits);
#else
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
#endif
  float y = p * two_n;
  // 0 below -87 (and for -inf) as a multiply by the mask rather than a select, so the loop
  // vectorizes (with -fno-trapping-math); NaN stays NaN (the mask is 1 and y is NaN)
  return y * static_cast<float>(!(x < -87.0f));
}

// log(1 + e) for e in [0, 1], accurate to a few ulp in relative terms for every e, tiny ones
// included (log1p(1e-30) = 1e-30, where log(1 + e) would round to 0). Branch-free, one
// division, so it vectorizes: log(1 + e) = 2·atanh(t) with t = e / (2 + e) in [0, 1/3], and
// atanh(t) = t·Σ_k t^(2k) / (2k + 1), truncated after t^14 (the next term is below 2^-28
// relative at t = 1/3).
MSCLIP_HD float log1p_unit(float e) {
  const float t = e / (2.0f + e);
  const float t2 = t * t;
  float p = 1.0f / 15.0f;
  p = p * t2 + 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

}  // namespace msclip
