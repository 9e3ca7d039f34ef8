// pybind11 module msclip_fast._C: the compiled ops. Imported lazily by msclip_fast.ops.
#include <torch/extension.h>

#include "contrastive/contrastive_api.h"
#include "sigmoid/sigmoid_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msclip_fast compiled ops (fused contrastive and sigmoid losses)";
  m.def("contrastive_forward", &msclip::contrastive::forward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("tile") = 0,
        "Fused CLIP loss forward: (img (N,D), txt (N,D), scale) -> [loss, lse_row, lse_col]");
  m.def("contrastive_backward", &msclip::contrastive::backward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("lse_row"), py::arg("lse_col"), py::arg("grad_out"),
        py::arg("tile") = 0,
        "Fused CLIP loss backward -> [d_img, d_txt, d_scale]");
  m.def("sigmoid_forward", &msclip::sigmoid::forward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("bias"), py::arg("negative_only") = false,
        py::arg("with_grad") = false, py::arg("tile") = 0,
        "Fused SigLIP loss forward: (img (N_I,D), txt (N_T,D), scale, bias) -> [loss] or, with "
        "with_grad (CPU), [loss, d_img, d_txt, d_scale, d_bias] of the loss itself");
  m.def("sigmoid_backward", &msclip::sigmoid::backward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("bias"), py::arg("grad_out"), py::arg("negative_only") = false,
        py::arg("tile") = 0, "Fused SigLIP loss backward -> [d_img, d_txt, d_scale, d_bias]");
  m.attr("with_cuda") = py::bool_(msclip::contrastive::built_with_cuda());
}
