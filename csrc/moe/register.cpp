// Registers the MoE row-bookkeeping ops as torch.ops.nmoe.*.
#include <torch/library.h>

#include "moe/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def("moe_align(Tensor ids, int experts, Tensor? expert_map=None) -> (Tensor, Tensor, Tensor)");
  m.def("moe_combine(Tensor ys, Tensor pos, Tensor weights, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("moe_align", &nmoe::moe::moe_align);
  m.impl("moe_combine", &nmoe::moe::moe_combine);
}
