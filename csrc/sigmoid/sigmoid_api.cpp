// Torch-aware API of the fused sigmoid (SigLIP) loss: input checks (errors name the argument),
// dtype handling, the tile products through torch's BLAS (common/torch_tiles.h) for the torch-free
// CPU driver (sigmoid_cpu.cpp); CUDA tensors go to the raw-pointer launchers of sigmoid_cuda.cu
// when the extension was built with CUDA (MSCLIP_FAST_WITH_CUDA).
#include "sigmoid/sigmoid_api.h"

#include "common/torch_tiles.h"
#include "sigmoid/sigmoid_cpu.h"

#ifdef MSCLIP_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "sigmoid/sigmoid_cuda.h"
#endif

namespace msclip {
namespace sigmoid {
namespace {

constexpr int64_t kDefaultTile = 1024;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_scalar(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& img) {
  TORCH_CHECK(t.defined() && t.numel() == 1, fn, ": ", name, " must be a 1-element tensor, got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.is_floating_point(), fn, ": ", name, " must be a float tensor, got ", t.scalar_type());
  if (!img.is_cuda())
    TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be on the CPU for CPU features, got ",
                t.device());
}

// Checks shared by forward and backward.
void check_inputs(const char* fn, const at::Tensor& img, const at::Tensor& txt,
                  const at::Tensor& scale, const at::Tensor& bias, bool negative_only) {
  TORCH_CHECK(img.defined() && txt.defined(), fn, ": img and txt must be defined");
  TORCH_CHECK(img.dim() == 2, fn, ": img must be 2-D (N_I, D), got shape ", img.sizes());
  TORCH_CHECK(txt.dim() == 2, fn, ": txt must be 2-D (N_T, D), got shape ", txt.sizes());
  TORCH_CHECK(img.size(1) == txt.size(1), fn, ": img and txt must share D, got ", img.size(1),
              " and ", txt.size(1));
  TORCH_CHECK(img.size(0) >= 1 && txt.size(0) >= 1, fn, ": img and txt need N >= 1 rows, got ",
              img.size(0), " and ", txt.size(0));
  TORCH_CHECK(img.size(1) >= 1, fn, ": img must have D >= 1 columns, got ", img.size(1));
  TORCH_CHECK(negative_only || img.size(0) == txt.size(0), fn,
              ": img and txt must have the same N unless negative_only, got ", img.size(0), " and ",
              txt.size(0));
  TORCH_CHECK(supported_dtype(img.scalar_type()), fn,
              ": img dtype must be float32, float16 or bfloat16, got ", img.scalar_type());
  TORCH_CHECK(txt.scalar_type() == img.scalar_type(), fn, ": txt dtype ", txt.scalar_type(),
              " differs from img dtype ", img.scalar_type());
  TORCH_CHECK(txt.device() == img.device(), fn, ": txt is on ", txt.device(), " but img is on ",
              img.device());
  TORCH_CHECK(img.is_contiguous(), fn, ": img must be contiguous (call .contiguous()), got strides ",
              img.strides());
  TORCH_CHECK(txt.is_contiguous(), fn, ": txt must be contiguous (call .contiguous()), got strides ",
              txt.strides());
  check_scalar(fn, "scale", scale, img);
  check_scalar(fn, "bias", bias, img);
}

CpuOptions cpu_options(int64_t tile) {
  CpuOptions opt;
  opt.tile_rows = opt.tile_cols = tile > 0 ? tile : kDefaultTile;
  opt.num_threads = at::get_num_threads();  // honours torch.set_num_threads
  return opt;
}

#ifdef MSCLIP_FAST_WITH_CUDA
CudaDType cuda_dtype(at::ScalarType t) {
  return t == at::kFloat ? CudaDType::kFloat32
                         : (t == at::kHalf ? CudaDType::kFloat16 : CudaDType::kBFloat16);
}

void cuda_check(cudaError_t e, const char* fn) {
  TORCH_CHECK(e == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(e));
}

// 0-d fp32 copy on the features' device (the kernels read scalars there: no host sync).
at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& img) {
  return t.to(img.device(), at::kFloat).reshape({}).contiguous();
}
#endif

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt,
                                const at::Tensor& scale, const at::Tensor& bias,
                                bool negative_only, bool with_grad, int64_t tile) {
  const char* fn = "sigmoid_forward";
  check_inputs(fn, img, txt, scale, bias, negative_only);
  const int64_t n_img = img.size(0), n_txt = txt.size(0);
  const auto f32 = img.options().dtype(at::kFloat);
  if (img.is_cuda()) {
    TORCH_CHECK(!with_grad, fn, ": with_grad is CPU-only (CUDA computes gradients in backward)");
#ifdef MSCLIP_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(img.device());
    at::Tensor s = device_scalar(scale, img), b = device_scalar(bias, img);
    at::Tensor loss = at::empty({}, f32);
    at::Tensor ws = at::empty({workspace_floats(n_img, n_txt)}, f32);
    cuda_check(launch_forward(img.data_ptr(), txt.data_ptr(), cuda_dtype(img.scalar_type()), n_img,
                              n_txt, img.size(1), s.data_ptr<float>(), b.data_ptr<float>(),
                              negative_only, ws.data_ptr<float>(), loss.data_ptr<float>(),
                              at::cuda::getCurrentCUDAStream().stream()),
               fn);
    return {loss};
#else
    TORCH_CHECK(false, fn, ": img is a CUDA tensor but msclip_fast._C was built without CUDA");
#endif
  }
  TORCH_CHECK(img.device().is_cpu(), fn, ": img must be a CPU or CUDA tensor, got ", img.device());
  TorchTiles tp(img, txt);
  const float s = scale.item<float>(), b = bias.item<float>();
  if (!with_grad) {
    const double loss = forward_cpu(tp, n_img, n_txt, s, b, negative_only, cpu_options(tile));
    return {at::scalar_tensor(loss, f32)};
  }
  tp.dI = at::zeros(img.sizes(), f32);
  tp.dT = at::zeros(txt.sizes(), f32);
  const Sums r = forward_backward_cpu(tp, n_img, n_txt, s, b, negative_only, 1.0f, cpu_options(tile));
  return {at::scalar_tensor(r.loss, f32), tp.dI, tp.dT, at::scalar_tensor(r.d_scale, f32),
          at::scalar_tensor(r.d_bias, f32)};
}

std::vector<at::Tensor> backward(const at::Tensor& img, const at::Tensor& txt,
                                 const at::Tensor& scale, const at::Tensor& bias,
                                 const at::Tensor& grad_out, bool negative_only, int64_t tile) {
  const char* fn = "sigmoid_backward";
  check_inputs(fn, img, txt, scale, bias, negative_only);
  TORCH_CHECK(grad_out.defined() && grad_out.numel() == 1, fn,
              ": grad_out must be a 1-element tensor");
  const int64_t n_img = img.size(0), n_txt = txt.size(0);
  const auto f32 = img.options().dtype(at::kFloat);
  const bool is_f32 = img.scalar_type() == at::kFloat;
  if (img.is_cuda()) {
#ifdef MSCLIP_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(img.device());
    at::Tensor s = device_scalar(scale, img), b = device_scalar(bias, img);
    at::Tensor g = device_scalar(grad_out, img);
    at::Tensor dI = at::empty(img.sizes(), f32), dT = at::empty(txt.sizes(), f32);
    at::Tensor ds = at::empty({}, f32), db = at::empty({}, f32);
    at::Tensor ws = at::empty({workspace_floats(n_img, n_txt)}, f32);
    cuda_check(launch_backward(img.data_ptr(), txt.data_ptr(), cuda_dtype(img.scalar_type()),
                               n_img, n_txt, img.size(1), s.data_ptr<float>(), b.data_ptr<float>(),
                               negative_only, g.data_ptr<float>(), dI.data_ptr<float>(),
                               dT.data_ptr<float>(), ws.data_ptr<float>(), ds.data_ptr<float>(),
                               db.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
               fn);
    if (!is_f32) return {dI.to(img.scalar_type()), dT.to(txt.scalar_type()), ds, db};
    return {dI, dT, ds, db};
#else
    TORCH_CHECK(false, fn, ": img is a CUDA tensor but msclip_fast._C was built without CUDA");
#endif
  }
  TORCH_CHECK(img.device().is_cpu(), fn, ": img must be a CPU or CUDA tensor, got ", img.device());
  TorchTiles tp(img, txt);
  tp.dI = at::zeros(img.sizes(), f32);
  tp.dT = at::zeros(txt.sizes(), f32);
  const Sums r = forward_backward_cpu(tp, n_img, n_txt, scale.item<float>(), bias.item<float>(),
                                      negative_only, grad_out.item<float>(), cpu_options(tile));
  at::Tensor ds = at::scalar_tensor(r.d_scale, f32), db = at::scalar_tensor(r.d_bias, f32);
  if (!is_f32) return {tp.dI.to(img.scalar_type()), tp.dT.to(txt.scalar_type()), ds, db};
  return {tp.dI, tp.dT, ds, db};
}

}  // namespace sigmoid
}  // namespace msclip
