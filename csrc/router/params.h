// Plain parameters and launchers of the fused DeepSeek-V3 router (kernels never see at::Tensor).
//
// moe_route: logits fp32 [tokens, experts] (row stride in elements), bias fp32 [experts]
//   -> weights fp32 [tokens, top_k], ids int64 [tokens, top_k] (the index dtype torch consumes), both contiguous.
// moe_gate_route: x bf16 [tokens, hidden] (row stride in elements), gate weight bf16 [experts, hidden]
//   contiguous, bias fp32 [experts] -> the same outputs, with logits = x @ weight^T (exact bf16 products,
//   fp32 accumulation) summed from `slices` K slices of the workspace partials fp32 [slices, tokens, ldp].
//
// Limits of the rule (checked by the interface): experts <= kMaxExperts, n_group <= 32,
// experts % n_group == 0, group size >= 2, 1 <= topk_group <= n_group, 1 <= top_k <= 32 and top_k <= experts.
// moe_gate_route also: experts <= kMaxFusedExperts, tokens <= kMaxFusedTokens, hidden % kGateChunk == 0,
// x rows and weight 16-byte aligned.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::router {

constexpr int kMaxExperts = 1024;
// The register-resident router: 8 experts per lane of one warp.
constexpr int kMaxFastExperts = 256;
constexpr int kMaxFusedExperts = kMaxFastExperts;
// The fused gate's bound on tokens: past it the partials (32 KB a token at DeepSeek-V3's shape) and the
// x re-reads of the expert tiles cost more than cuBLAS's GEMM saves (see docs/kernels.md, moe_route).
constexpr int kMaxFusedTokens = 128;
// K of one 16-byte fragment load by 4 lanes, and K of one slice (7168 = 32 slices of 224).
constexpr int kGateChunk = 32;
constexpr int kGateSliceChunks = 7;
constexpr int kGateSliceK = kGateChunk * kGateSliceChunks;

// The routing rule, shared by both ops.
struct RouteRule {
  int experts;
  int n_group;
  int topk_group;
  int top_k;
  bool norm_topk_prob;
  float routed_scaling_factor;
};

struct MoeRouteParams {
  const float* logits;
  const float* bias;
  float* weights;
  int64_t* ids;
  int64_t tokens;
  int64_t logits_stride;
  RouteRule rule;
};

struct MoeGateRouteParams {
  const void* x;       // bf16 [tokens, hidden], row stride x_stride
  const void* weight;  // bf16 [experts, hidden], contiguous
  const float* bias;
  float* partials;  // [slices, tokens, ldp]
  float* weights;
  int64_t* ids;
  int64_t x_stride;
  int tokens;
  int hidden;
  int slices;
  int ldp;
  RouteRule rule;
};

// K slices of the fused gate: a function of hidden alone, so that a row's sum order never depends on the batch.
inline int gate_route_slices(int hidden) { return (hidden + kGateSliceK - 1) / kGateSliceK; }
// Row stride of the partials: experts rounded up to 4 (16-byte rows for the reduction's float4 loads).
inline int gate_route_ldp(int experts) { return (experts + 3) / 4 * 4; }

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream);
const char* moe_gate_route_launch(const MoeGateRouteParams& p, cudaStream_t stream);

}  // namespace nmoe::router
