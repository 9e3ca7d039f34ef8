// Torch-aware entry points of the fused contrastive loss (bound in csrc/bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace msclip {
namespace contrastive {

// img, txt: (N, D) contiguous float32/float16/bfloat16 on one device; scale: 1-element float
// tensor (exp(logit_scale)). Returns {loss 0-d float32, lse_row (N,) float32, lse_col (N,)
// float32}. `tile` = rows/columns per tile (CPU; <= 0: default).
std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt,
                                const at::Tensor& scale, int64_t tile);

// Gradients of loss·grad_out: {d_img (img dtype), d_txt (txt dtype), d_scale 0-d float32}.
// lse_row / lse_col are forward's outputs; grad_out a 1-element tensor.
std::vector<at::Tensor> backward(const at::Tensor& img, const at::Tensor& txt,
                                 const at::Tensor& scale, const at::Tensor& lse_row,
                                 const at::Tensor& lse_col, const at::Tensor& grad_out,
                                 int64_t tile);

bool built_with_cuda();

}  // namespace contrastive
}  // namespace msclip
