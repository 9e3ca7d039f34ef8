// Torch-free launchers of the fused sigmoid (SigLIP) loss CUDA kernels (sigmoid_cuda.cu).
// Every pointer is device memory; scale, bias and grad_out are 1-float device buffers (no host
// sync). Math and notation: sigmoid_tile.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.h"

namespace msclip {
namespace sigmoid {

// Floats of workspace launch_forward / launch_backward need for n_img images, n_txt texts.
int64_t workspace_floats(int64_t n_img, int64_t n_txt);

// img (n_img, d), txt (n_txt, d) row-major of `dtype` (n_img == n_txt unless negative_only).
// Writes loss[0]: (1/n_img) Σ_ij softplus(-z_ij·(s·I_i·T_j + b)) in fp32 (float64 partial sums,
// fixed reduction order: deterministic).
cudaError_t launch_forward(const void* img, const void* txt, CudaDType dtype, int64_t n_img,
                           int64_t n_txt, int64_t d, const float* scale, const float* bias,
                           bool negative_only, float* workspace, float* loss, cudaStream_t stream);

// Gradients of loss·grad_out: d_img (n_img, d) and d_txt (n_txt, d) fp32, d_scale[0], d_bias[0]
// fp32. Deterministic (no atomics).
cudaError_t launch_backward(const void* img, const void* txt, CudaDType dtype, int64_t n_img,
                            int64_t n_txt, int64_t d, const float* scale, const float* bias,
                            bool negative_only, const float* grad_out, float* d_img, float* d_txt,
                            float* workspace, float* d_scale, float* d_bias, cudaStream_t stream);

}  // namespace sigmoid
}  // namespace msclip
