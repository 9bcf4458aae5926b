// Plain parameters and launcher of the fused DeepSeek-V3 router (kernels never see at::Tensor).
//   logits fp32 [tokens, experts] (row stride in elements), bias fp32 [experts]
//   weights fp32 [tokens, top_k], ids int64 [tokens, top_k] (the index dtype torch consumes), both contiguous
// Limits (checked by the interface): experts <= kMaxExperts, n_group <= 32, experts % n_group == 0,
// group size >= 2, 1 <= topk_group <= n_group, 1 <= top_k <= 32 and top_k <= experts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::router {

constexpr int kMaxExperts = 1024;

struct MoeRouteParams {
  const float* logits;
  const float* bias;
  float* weights;
  int64_t* ids;
  int64_t tokens;
  int64_t logits_stride;
  int experts;
  int n_group;
  int topk_group;
  int top_k;
  bool norm_topk_prob;
  float routed_scaling_factor;
};

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream);

}  // namespace nmoe::router
