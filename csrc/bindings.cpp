// pybind11 module msclip_fast._C: the compiled ops. Imported lazily by msclip_fast.ops.
#include <torch/extension.h>

#include "contrastive/contrastive_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msclip_fast compiled ops (fused contrastive loss)";
  m.def("contrastive_forward", &msclip::contrastive::forward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("tile") = 0,
        "Fused CLIP loss forward: (img (N,D), txt (N,D), scale) -> [loss, lse_row, lse_col]");
  m.def("contrastive_backward", &msclip::contrastive::backward, py::arg("img"), py::arg("txt"),
        py::arg("scale"), py::arg("lse_row"), py::arg("lse_col"), py::arg("grad_out"),
        py::arg("tile") = 0,
        "Fused CLIP loss backward -> [d_img, d_txt, d_scale]");
  m.attr("with_cuda") = py::bool_(msclip::contrastive::built_with_cuda());
}
