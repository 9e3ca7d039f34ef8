// Torch-aware API of the fused contrastive loss: input checks (errors name the argument), dtype
// handling and the tile products through torch's BLAS (at::mm_out / addmm_) for the torch-free
// CPU driver in contrastive_cpu.cpp; CUDA tensors go to the raw-pointer launchers of
// contrastive_cuda.cu when the extension was built with CUDA (MSCLIP_FAST_WITH_CUDA).
#include "contrastive/contrastive_api.h"

#include <string>

#include "common/torch_tiles.h"
#include "contrastive/contrastive_cpu.h"

#ifdef MSCLIP_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "contrastive/contrastive_cuda.h"
#endif

namespace msclip {
namespace contrastive {
namespace {

constexpr int64_t kDefaultTile = 1024;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks shared by forward and backward; returns N.
int64_t check_features(const char* fn, const at::Tensor& img, const at::Tensor& txt,
                       const at::Tensor& scale) {
  TORCH_CHECK(img.defined(), fn, ": img is undefined");
  TORCH_CHECK(txt.defined(), fn, ": txt is undefined");
  TORCH_CHECK(img.dim() == 2, fn, ": img must be 2-D (N, D), got shape ", img.sizes());
  TORCH_CHECK(txt.dim() == 2, fn, ": txt must be 2-D (N, D), got shape ", txt.sizes());
  TORCH_CHECK(img.size(0) == txt.size(0), fn, ": img and txt must have the same N, got ",
              img.size(0), " and ", txt.size(0));
  TORCH_CHECK(img.size(1) == txt.size(1), fn, ": img and txt must share D, got ", img.size(1),
              " and ", txt.size(1));
  TORCH_CHECK(img.size(0) >= 1, fn, ": img must have N >= 1 rows, got ", img.size(0));
  TORCH_CHECK(img.size(1) >= 1, fn, ": img must have D >= 1 columns, got ", img.size(1));
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
  TORCH_CHECK(scale.defined() && scale.numel() == 1, fn,
              ": scale must be a 1-element tensor (exp(logit_scale)), got shape ",
              scale.defined() ? scale.sizes() : at::IntArrayRef{});
  TORCH_CHECK(scale.is_floating_point(), fn, ": scale must be a float tensor, got ",
              scale.scalar_type());
  if (!img.is_cuda())
    TORCH_CHECK(scale.device().is_cpu(), fn, ": scale must be on the CPU for CPU features, got ",
                scale.device());
  return img.size(0);
}

void check_lse(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& img) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == img.size(0), fn, ": ", name,
              " must have shape (", img.size(0), ",), got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == img.device(), fn, ": ", name, " is on ", t.device(),
              " but img is on ", img.device());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

#ifdef MSCLIP_FAST_WITH_CUDA
CudaDType cuda_dtype(at::ScalarType t) {
  return t == at::kFloat ? CudaDType::kFloat32
                         : (t == at::kHalf ? CudaDType::kFloat16 : CudaDType::kBFloat16);
}

void cuda_check(cudaError_t e, const char* fn) {
  TORCH_CHECK(e == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(e));
}
#endif

CpuOptions cpu_options(int64_t tile) {
  CpuOptions opt;
  opt.tile_rows = opt.tile_cols = tile > 0 ? tile : kDefaultTile;
  opt.num_threads = at::get_num_threads();  // honours torch.set_num_threads
  return opt;
}

}  // namespace

bool built_with_cuda() {
#ifdef MSCLIP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt,
                                const at::Tensor& scale, int64_t tile) {
  const char* fn = "contrastive_forward";
  const int64_t n = check_features(fn, img, txt, scale);
  const auto f32 = img.options().dtype(at::kFloat);
  at::Tensor lse_row = at::empty({n}, f32), lse_col = at::empty({n}, f32);
  if (img.is_cuda()) {
#ifdef MSCLIP_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(img.device());
    at::Tensor s = scale.to(img.device(), at::kFloat).reshape({}).contiguous();
    at::Tensor diag = at::empty({n}, f32), loss = at::empty({}, f32);
    cuda_check(launch_forward(img.data_ptr(), txt.data_ptr(), cuda_dtype(img.scalar_type()), n,
                              img.size(1), s.data_ptr<float>(), lse_row.data_ptr<float>(),
                              lse_col.data_ptr<float>(), diag.data_ptr<float>(),
                              loss.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
               fn);
    return {loss, lse_row, lse_col};
#else
    TORCH_CHECK(false, fn, ": img is a CUDA tensor but msclip_fast._C was built without CUDA");
#endif
  }
  TORCH_CHECK(img.device().is_cpu(), fn, ": img must be a CPU or CUDA tensor, got ", img.device());
  TorchTiles tp(img, txt);
  const double loss = forward_cpu(tp, n, scale.item<float>(), lse_row.data_ptr<float>(),
                                  lse_col.data_ptr<float>(), cpu_options(tile));
  return {at::scalar_tensor(loss, f32), lse_row, lse_col};
}

std::vector<at::Tensor> backward(const at::Tensor& img, const at::Tensor& txt,
                                 const at::Tensor& scale, const at::Tensor& lse_row,
                                 const at::Tensor& lse_col, const at::Tensor& grad_out,
                                 int64_t tile) {
  const char* fn = "contrastive_backward";
  const int64_t n = check_features(fn, img, txt, scale);
  check_lse(fn, "lse_row", lse_row, img);
  check_lse(fn, "lse_col", lse_col, img);
  TORCH_CHECK(grad_out.defined() && grad_out.numel() == 1, fn,
              ": grad_out must be a 1-element tensor");
  const auto f32 = img.options().dtype(at::kFloat);
  const bool is_f32 = img.scalar_type() == at::kFloat;
  if (img.is_cuda()) {
#ifdef MSCLIP_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(img.device());
    at::Tensor s = scale.to(img.device(), at::kFloat).reshape({}).contiguous();
    at::Tensor g = grad_out.to(img.device(), at::kFloat).reshape({}).contiguous();
    // fp32 accumulators (the outputs themselves for fp32 inputs)
    at::Tensor dI = at::empty_like(img, f32), dT = at::empty_like(txt, f32);
    at::Tensor ds = at::empty({}, f32);
    at::Tensor ws = at::empty({backward_workspace_floats(n)}, f32);
    cuda_check(launch_backward(img.data_ptr(), txt.data_ptr(), cuda_dtype(img.scalar_type()), n,
                               img.size(1), s.data_ptr<float>(), lse_row.data_ptr<float>(),
                               lse_col.data_ptr<float>(), g.data_ptr<float>(),
                               dI.data_ptr<float>(), dT.data_ptr<float>(), ws.data_ptr<float>(),
                               ds.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
               fn);
    if (!is_f32) return {dI.to(img.scalar_type()), dT.to(txt.scalar_type()), ds};
    return {dI, dT, ds};
#else
    TORCH_CHECK(false, fn, ": img is a CUDA tensor but msclip_fast._C was built without CUDA");
#endif
  }
  TORCH_CHECK(img.device().is_cpu(), fn, ": img must be a CPU or CUDA tensor, got ", img.device());
  TorchTiles tp(img, txt);
  tp.dI = at::zeros(img.sizes(), f32);
  tp.dT = at::zeros(txt.sizes(), f32);
  const double ds = backward_cpu(tp, n, scale.item<float>(), lse_row.data_ptr<float>(),
                                 lse_col.data_ptr<float>(), grad_out.item<float>(),
                                 cpu_options(tile));
  at::Tensor dscale = at::scalar_tensor(ds, f32);
  if (!is_f32) return {tp.dI.to(img.scalar_type()), tp.dT.to(txt.scalar_type()), dscale};
  return {tp.dI, tp.dT, dscale};
}

}  // namespace contrastive
}  // namespace msclip
