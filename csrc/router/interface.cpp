// Interface layer of the router: checks every tensor and argument (messages name them), fills
// MoeRouteParams / MoeGateRouteParams, allocates outputs (and moe_gate_route's partials) with the torch
// allocator, launches on the current stream - no host synchronization, so both ops are CUDA-graph capturable.
#include "router/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "router/params.h"

namespace nmoe::router {
namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_bias(const char* op, const at::Tensor& bias, const at::Tensor& ref, const char* ref_name,
                int64_t experts) {
  TORCH_CHECK(bias.device() == ref.device(), op, ": bias is on ", bias.device(), ", ", ref_name, " on ",
              ref.device());
  TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == experts, op, ": bias must be [", experts, "], got ", bias.sizes());
  TORCH_CHECK(bias.stride(0) == 1 || experts <= 1, op, ": bias must be contiguous, got strides ", bias.strides());
}

RouteRule check_rule(const char* op, int64_t experts, int64_t max_experts, int64_t n_group, int64_t topk_group,
                     int64_t top_k, bool norm_topk_prob, double routed_scaling_factor) {
  TORCH_CHECK(experts >= 1 && experts <= max_experts, op, ": experts = ", experts, " must be in [1, ", max_experts,
              "]");
  TORCH_CHECK(n_group >= 1 && n_group <= 32 && experts % n_group == 0 && experts / n_group >= 2, op,
              ": n_group = ", n_group, " must be in [1, 32], divide experts = ", experts,
              " and leave at least 2 experts per group");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group = ", topk_group,
              " must be in [1, n_group = ", n_group, "]");
  TORCH_CHECK(top_k >= 1 && top_k <= 32 && top_k <= experts, op, ": top_k = ", top_k,
              " must be in [1, min(32, experts)]");
  RouteRule rule{};
  rule.experts = static_cast<int>(experts);
  rule.n_group = static_cast<int>(n_group);
  rule.topk_group = static_cast<int>(topk_group);
  rule.top_k = static_cast<int>(top_k);
  rule.norm_topk_prob = norm_topk_prob;
  rule.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  return rule;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group,
                                             int64_t topk_group, int64_t top_k, bool norm_topk_prob,
                                             double routed_scaling_factor) {
  constexpr const char* op = "moe_route";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [tokens, experts], got shape ", logits.sizes());
  const int64_t tokens = logits.size(0), experts = logits.size(1);
  check_bias(op, bias, logits, "logits", experts);
  TORCH_CHECK(logits.numel() == 0 || logits.stride(1) == 1, op,
              ": logits must have unit stride in its last dim, got strides ", logits.strides());
  const RouteRule rule =
      check_rule(op, experts, kMaxExperts, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor);

  c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({tokens, top_k}, logits.options());
  auto ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  if (tokens == 0) return {weights, ids};
  MoeRouteParams p{};
  p.logits = logits.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int64_t>();
  p.tokens = tokens;
  p.logits_stride = logits.stride(0);
  p.rule = rule;
  const char* err = moe_route_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor> moe_gate_route(const at::Tensor& x, const at::Tensor& gate_weight,
                                                  const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                                                  int64_t top_k, bool norm_topk_prob, double routed_scaling_factor) {
  constexpr const char* op = "moe_gate_route";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, ": x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be [tokens, hidden], got shape ", x.sizes());
  const int64_t tokens = x.size(0), hidden = x.size(1);
  TORCH_CHECK(tokens <= kMaxFusedTokens, op, ": x has ", tokens, " tokens, at most ", kMaxFusedTokens,
              " are supported (use torch.mm + moe_route)");
  TORCH_CHECK(hidden >= kGateChunk && hidden % kGateChunk == 0 && hidden <= INT32_MAX, op, ": x's hidden size ",
              hidden, " must be a positive multiple of ", kGateChunk);
  TORCH_CHECK(x.stride(1) == 1 && (tokens <= 1 || x.stride(0) % 8 == 0) && aligned16(x), op,
              ": x rows must be unit-stride and start on 16-byte boundaries, got strides ", x.strides());
  TORCH_CHECK(gate_weight.device() == x.device(), op, ": gate_weight is on ", gate_weight.device(), ", x on ",
              x.device());
  TORCH_CHECK(gate_weight.scalar_type() == at::kBFloat16, op, ": gate_weight must be bfloat16, got ",
              gate_weight.scalar_type());
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(1) == hidden, op,
              ": gate_weight must be [experts, hidden = ", hidden, "], got shape ", gate_weight.sizes());
  TORCH_CHECK(gate_weight.is_contiguous() && aligned16(gate_weight), op,
              ": gate_weight must be contiguous and 16-byte aligned, got strides ", gate_weight.strides());
  const int64_t experts = gate_weight.size(0);
  check_bias(op, bias, x, "x", experts);
  const RouteRule rule =
      check_rule(op, experts, kMaxFusedExperts, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor);

  c10::cuda::CUDAGuard guard(x.device());
  auto weights = at::empty({tokens, top_k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  if (tokens == 0) return {weights, ids};
  MoeGateRouteParams p{};
  p.slices = gate_route_slices(static_cast<int>(hidden));
  p.ldp = gate_route_ldp(static_cast<int>(experts));
  auto partials = at::empty({p.slices, tokens, p.ldp}, x.options().dtype(at::kFloat));
  p.x = x.data_ptr();
  p.weight = gate_weight.data_ptr();
  p.bias = bias.data_ptr<float>();
  p.partials = partials.data_ptr<float>();
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int64_t>();
  p.x_stride = x.stride(0);
  p.tokens = static_cast<int>(tokens);
  p.hidden = static_cast<int>(hidden);
  p.rule = rule;
  const char* err = moe_gate_route_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {weights, ids};
}

}  // namespace nmoe::router
