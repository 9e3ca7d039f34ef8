// Torch-aware entry points of the fused sigmoid (SigLIP) loss (bound in csrc/bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace msclip {
namespace sigmoid {

// img (N_I, D), txt (N_T, D): contiguous float32/float16/bfloat16 on one device (N_I == N_T
// unless negative_only); scale, bias: 1-element float tensors (exp(logit_scale), logit_bias).
// Returns {loss 0-d float32}; with `with_grad` (CPU tensors only) the loss and the gradients of
// the loss itself, computed in the same sweep: {loss, d_img (N_I, D) float32, d_txt (N_T, D)
// float32, d_scale 0-d float32, d_bias 0-d float32}. `tile` = rows/columns per CPU tile (<= 0:
// default).
std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt,
                                const at::Tensor& scale, const at::Tensor& bias,
                                bool negative_only, bool with_grad, int64_t tile);

// Gradients of loss·grad_out (grad_out a 1-element tensor), recomputing every tile:
// {d_img (img dtype), d_txt (txt dtype), d_scale 0-d float32, d_bias 0-d float32}.
std::vector<at::Tensor> backward(const at::Tensor& img, const at::Tensor& txt,
                                 const at::Tensor& scale, const at::Tensor& bias,
                                 const at::Tensor& grad_out, bool negative_only, int64_t tile);

}  // namespace sigmoid
}  // namespace msclip
