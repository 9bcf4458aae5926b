// Interface layer of the router: checks every tensor and argument (messages name them), fills
// MoeRouteParams, launches on the current stream.
#include "router/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "router/params.h"

namespace nmoe::router {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group,
                                             int64_t topk_group, int64_t top_k, bool norm_topk_prob,
                                             double routed_scaling_factor) {
  constexpr const char* op = "moe_route";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(bias.device() == logits.device(), op, ": bias is on ", bias.device(), ", logits on ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [tokens, experts], got shape ", logits.sizes());
  const int64_t tokens = logits.size(0), experts = logits.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == experts, op, ": bias must be [", experts, "], got ", bias.sizes());
  TORCH_CHECK(logits.numel() == 0 || logits.stride(1) == 1, op,
              ": logits must have unit stride in its last dim, got strides ", logits.strides());
  TORCH_CHECK(bias.stride(0) == 1 || experts <= 1, op, ": bias must be contiguous, got strides ", bias.strides());
  TORCH_CHECK(experts >= 1 && experts <= kMaxExperts, op, ": experts = ", experts, " must be in [1, ", kMaxExperts,
              "]");
  TORCH_CHECK(n_group >= 1 && n_group <= 32 && experts % n_group == 0 && experts / n_group >= 2, op,
              ": n_group = ", n_group, " must be in [1, 32], divide experts = ", experts,
              " and leave at least 2 experts per group");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group = ", topk_group,
              " must be in [1, n_group = ", n_group, "]");
  TORCH_CHECK(top_k >= 1 && top_k <= 32 && top_k <= experts, op, ": top_k = ", top_k,
              " must be in [1, min(32, experts)]");

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
  p.experts = static_cast<int>(experts);
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.top_k = static_cast<int>(top_k);
  p.norm_topk_prob = norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  const char* err = moe_route_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {weights, ids};
}

}  // namespace nmoe::router
