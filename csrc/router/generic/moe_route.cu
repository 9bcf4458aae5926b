// The DeepSeek-V3 router (noaux_tc), one warp per token (the rule: router/generic/route_warp.cuh).
// Up to kMaxFastExperts experts the token's scores stay in registers (route_warp); more experts (up
// to kMaxExperts) take the shared-memory kernel below: scores and choices in shared memory, a scan of
// all experts per selection.
// Every selection breaks ties towards the lower index, as the torch reference's stable sort does.
#include <cstdint>

#include "pdl.cuh"
#include "router/generic/route_warp.cuh"
#include "router/params.h"

namespace nmoe::router {
namespace {

constexpr int kWarpsPerBlock = 4;

// (value, index) of the better of two candidates: larger value, then lower index.
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, i, off);
    better(v, i, ov, oi);
  }
}

// vec: logits rows and bias 16-byte aligned, experts % 8 == 0 (float4 loads).
__global__ void __launch_bounds__(kWarpsPerBlock * 32) moe_route_fast_kernel(const MoeRouteParams p, bool vec) {
  pdl_enter();  // first: see csrc/pdl.cuh
  __shared__ float scratch[kWarpsPerBlock][kLaneExperts * 32];
  const int warp = threadIdx.x / 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.tokens) return;
  float logit[kLaneExperts], bias[kLaneExperts];
  load_lane_experts(p.logits + t * p.logits_stride, p.rule.experts, vec, logit);
  load_lane_experts(p.bias, p.rule.experts, vec, bias);
  route_warp(logit, bias, p.rule, scratch[warp], p.weights + t * p.rule.top_k, p.ids + t * p.rule.top_k);
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) moe_route_kernel(const MoeRouteParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  extern __shared__ float smem[];  // per warp: score[E], choice[E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.tokens) return;
  const RouteRule& r = p.rule;
  const int E = r.experts, gsize = E / r.n_group;
  float* score = smem + warp * 2 * E;
  float* choice = score + E;
  const float* row = p.logits + t * p.logits_stride;
  const float ninf = -__int_as_float(0x7f800000);
  for (int e = lane; e < E; e += 32) {
    const float s = 1.0f / (1.0f + expf(-row[e]));
    score[e] = s;
    choice[e] = s + p.bias[e];
  }
  __syncwarp();

  // Lane g scores group g by the sum of its two largest choices.
  float gscore = ninf;
  if (lane < r.n_group) {
    float m1 = ninf, m2 = ninf;
    for (int j = 0; j < gsize; ++j) {
      const float c = choice[lane * gsize + j];
      if (c > m1)
        m2 = m1, m1 = c;
      else if (c > m2)
        m2 = c;
    }
    gscore = m1 + m2;
  }
  bool group_kept = false;
  for (int k = 0; k < r.topk_group; ++k) {
    float v = lane < r.n_group && !group_kept ? gscore : ninf;
    int i = lane < r.n_group && !group_kept ? lane : 0x7fffffff;
    warp_best(v, i);
    if (lane == i) group_kept = true;
  }
  // Experts of dropped groups become -inf (still selectable, lowest index first, as in the reference).
  const uint32_t kept_groups = __ballot_sync(kFullMask, group_kept);
  for (int e = lane; e < E; e += 32) {
    if (!((kept_groups >> (e / gsize)) & 1u)) choice[e] = ninf;
  }
  __syncwarp();

  float w_mine = 0.f, w_sum = 0.f;
  int id_mine = 0;
  for (int k = 0; k < r.top_k; ++k) {
    float v = ninf;
    int i = 0x7fffffff;
    for (int e = lane; e < E; e += 32) {
      const float c = choice[e];
      if (c == c) better(v, i, c, e);  // taken experts hold a NaN
    }
    warp_best(v, i);
    i = i < E ? i : 0;  // only reachable with NaN logits
    const float w = score[i];
    w_sum += w;
    if (lane == k) w_mine = w, id_mine = i;
    if (lane == 0) choice[i] = __int_as_float(0x7fffffff);  // NaN: never selected again
    __syncwarp();
  }
  if (lane < r.top_k) {
    float w = w_mine;
    if (r.norm_topk_prob) w = w / (w_sum + 1e-20f);
    p.weights[t * r.top_k + lane] = w * r.routed_scaling_factor;
    p.ids[t * r.top_k + lane] = id_mine;
  }
}

}  // namespace

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return nullptr;
  const int64_t blocks = (p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return "moe_route: too many tokens for one launch";
  const int E = p.rule.experts;
  cudaError_t launched;
  if (E <= kMaxFastExperts) {
    const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    const bool vec = E % kLaneExperts == 0 && p.logits_stride % 4 == 0 && aligned(p.logits) && aligned(p.bias);
    launched = launch_pdl(moe_route_fast_kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream, p, vec);
  } else {
    const size_t smem = static_cast<size_t>(kWarpsPerBlock) * 2 * E * sizeof(float);
    launched = launch_pdl(moe_route_kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream, p);
  }
  return launched == cudaSuccess ? nullptr : "moe_route: kernel launch failed";
}

}  // namespace nmoe::router
