// Torch-free launchers of the fused contrastive loss CUDA kernels (contrastive_cuda.cu).
// Every pointer is device memory; scale and grad_out are 1-float device buffers (no host sync).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.h"

namespace msclip {
namespace contrastive {

// Floats of workspace launch_backward needs for n pairs.
int64_t backward_workspace_floats(int64_t n);

// img, txt: (n, d) row-major of `dtype`. Writes lse_row[n], lse_col[n], diag[n] (raw I_i·T_i)
// and loss[0] (fp32 mean of both cross-entropy directions).
cudaError_t launch_forward(const void* img, const void* txt, CudaDType dtype, int64_t n, int64_t d,
                           const float* scale, float* lse_row, float* lse_col, float* diag,
                           float* loss, cudaStream_t stream);

// Gradients of loss·grad_out: d_img, d_txt (n, d) fp32, d_scale[0] fp32. `workspace` holds
// backward_workspace_floats(n) floats.
cudaError_t launch_backward(const void* img, const void* txt, CudaDType dtype, int64_t n,
                            int64_t d, const float* scale, const float* lse_row,
                            const float* lse_col, const float* grad_out, float* d_img,
                            float* d_txt, float* workspace, float* d_scale, cudaStream_t stream);

}  // namespace contrastive
}  // namespace msclip
