// Registers the fused RMSNorm as torch.ops.nmoe.rms_norm / add_rms_norm (and their _quant forms).
#include <torch/library.h>

#include "norm/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_quant(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_quant(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("rms_norm", &nmoe::norm::rms_norm);
  m.impl("add_rms_norm", &nmoe::norm::add_rms_norm);
  m.impl("rms_norm_quant", &nmoe::norm::rms_norm_quant);
  m.impl("add_rms_norm_quant", &nmoe::norm::add_rms_norm_quant);
}
