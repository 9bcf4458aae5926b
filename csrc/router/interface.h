// Tensor-level entry points of the router (registered in router/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nmoe::router {

// logits fp32 [T, E], bias fp32 [E] -> (weights fp32 [T, top_k], ids int64 [T, top_k]).
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group,
                                             int64_t topk_group, int64_t top_k, bool norm_topk_prob,
                                             double routed_scaling_factor);

// x bf16 [T, hidden], gate_weight bf16 [E, hidden], bias fp32 [E] -> moe_route(x @ gate_weight^T, bias, ...),
// the logits from exact bf16 products with fp32 accumulation. T <= kMaxFusedTokens, E <= kMaxFusedExperts.
std::tuple<at::Tensor, at::Tensor> moe_gate_route(const at::Tensor& x, const at::Tensor& gate_weight,
                                                  const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                                                  int64_t top_k, bool norm_topk_prob, double routed_scaling_factor);

}  // namespace nmoe::router
