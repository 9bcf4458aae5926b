// The DeepSeek-V3 router (noaux_tc), one warp per token:
//   s = sigmoid(logits); choice = s + bias; group score = sum of the group's top-2 choices;
//   keep the topk_group best groups; top_k experts by choice among them; weights = s of the chosen,
//   normalized (+1e-20) when asked, times routed_scaling_factor.
// Every selection breaks ties towards the lower index, as the torch reference's stable sort does.
#include <cstdint>

#include "router/params.h"
#include "pdl.cuh"

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
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    better(v, i, ov, oi);
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) moe_route_kernel(const MoeRouteParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  extern __shared__ float smem[];  // per warp: score[E], choice[E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.tokens) return;
  const int E = p.experts, gsize = E / p.n_group;
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
  if (lane < p.n_group) {
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
  for (int k = 0; k < p.topk_group; ++k) {
    float v = lane < p.n_group && !group_kept ? gscore : ninf;
    int i = lane < p.n_group && !group_kept ? lane : 0x7fffffff;
    warp_best(v, i);
    if (lane == i) group_kept = true;
  }
  // Experts of dropped groups become -inf (still selectable, lowest index first, as in the reference).
  const uint32_t kept_groups = __ballot_sync(0xffffffffu, group_kept);
  for (int e = lane; e < E; e += 32) {
    if (!((kept_groups >> (e / gsize)) & 1u)) choice[e] = ninf;
  }
  __syncwarp();

  float w_mine = 0.f, w_sum = 0.f;
  int id_mine = 0;
  for (int k = 0; k < p.top_k; ++k) {
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
  if (lane < p.top_k) {
    float w = w_mine;
    if (p.norm_topk_prob) w = w / (w_sum + 1e-20f);
    p.weights[t * p.top_k + lane] = w * p.routed_scaling_factor;
    p.ids[t * p.top_k + lane] = id_mine;
  }
}

}  // namespace

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return nullptr;
  const int64_t blocks = (p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return "moe_route: too many tokens for one launch";
  const size_t smem = static_cast<size_t>(kWarpsPerBlock) * 2 * p.experts * sizeof(float);
  const cudaError_t launched = launch_pdl(moe_route_kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream, p);
  return launched == cudaSuccess ? nullptr : "moe_route: kernel launch failed";
}

}  // namespace nmoe::router
