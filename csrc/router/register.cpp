// Registers the router as torch.ops.nmoe.moe_route and torch.ops.nmoe.moe_gate_route.
#include <torch/library.h>

#include "router/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def(
      "moe_route(Tensor logits, Tensor bias, int n_group, int topk_group, int top_k, bool norm_topk_prob,"
      " float routed_scaling_factor) -> (Tensor, Tensor)");
  m.def(
      "moe_gate_route(Tensor x, Tensor gate_weight, Tensor bias, int n_group, int topk_group, int top_k,"
      " bool norm_topk_prob, float routed_scaling_factor) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("moe_route", &nmoe::router::moe_route);
  m.impl("moe_gate_route", &nmoe::router::moe_gate_route);
}
