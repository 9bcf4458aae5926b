// The DeepSeek-V3 router (noaux_tc) of one token in one warp, its scores in registers: lane l holds
// experts 8l .. 8l+7 (experts <= kMaxFastExperts), so a lower lane holds lower experts.
//   s = sigmoid(logits); choice = s + bias; group score = sum of the group's top-2 choices;
//   keep the topk_group best groups; top_k experts by choice among them; weights = s of the chosen,
//   normalized (+1e-20) when asked, times routed_scaling_factor.
// Every selection breaks ties towards the lower index, as the torch reference's stable sort does. A
// selection is one max reduction of order-preserving keys (redux.sync), a ballot for the lowest lane
// holding the max, and a shuffle of that lane's pick; only the winning lane rescans its 8 values.
// NaN logits as in the shared-memory kernel (moe_route.cu): ignored by the group scores, never chosen
// in a kept group, -inf (selectable) in a dropped one; once nothing is left, expert 0 with score[0].
#pragma once

#include <cstdint>

#include "router/params.h"

namespace nmoe::router {

constexpr int kLaneExperts = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// A non-NaN float as an unsigned that orders as the float does; every key is above 0 (-inf is 0x007fffff),
// so 0 marks "not selectable". -0 is read as +0: they tie, as they compare.
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// v[j] = row[8 lane + j] below `experts`, else 0. vec: row 16-byte aligned and experts % 8 == 0.
__device__ __forceinline__ void load_lane_experts(const float* row, int experts, bool vec, float (&v)[kLaneExperts]) {
  const int e0 = kLaneExperts * (threadIdx.x % 32);
  if (vec) {
    const float4 a = e0 < experts ? *reinterpret_cast<const float4*>(row + e0) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 b = e0 < experts ? *reinterpret_cast<const float4*>(row + e0 + 4) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < kLaneExperts; ++j) v[j] = e0 + j < experts ? row[e0 + j] : 0.f;
}

// (m1, m2) = the two largest values seen (with multiplicity); NaN is ignored, as in a scan with `>`.
__device__ __forceinline__ void top2_push(float& m1, float& m2, float c) {
  if (c > m1)
    m2 = m1, m1 = c;
  else if (c > m2)
    m2 = c;
}

// Merges another top-2 (o1 >= o2, neither NaN) into (m1 >= m2).
__device__ __forceinline__ void top2_merge(float& m1, float& m2, float o1, float o2) {
  if (o1 > m1) {
    m2 = fmaxf(m1, o2);
    m1 = o1;
  } else {
    m2 = fmaxf(m2, o1);
  }
}

// Group scores: lane g < n_group returns group g's score. Groups of whole lanes (group size % 8 == 0)
// merge lane top-2s by shuffles; other sizes stage the choices in `scratch` (256 floats of this warp's
// shared memory) and let lane g scan its group.
__device__ __forceinline__ float group_score(const float (&c)[kLaneExperts], const RouteRule& r, float* scratch) {
  const int lane = threadIdx.x % 32, e0 = kLaneExperts * lane;
  const int gsize = r.experts / r.n_group;
  const float ninf = -__int_as_float(0x7f800000);
  float m1 = ninf, m2 = ninf;
  if (gsize % kLaneExperts == 0) {
    const int lanes = gsize / kLaneExperts;
    if (e0 < r.experts) {
#pragma unroll
      for (int j = 0; j < kLaneExperts; ++j) top2_push(m1, m2, c[j]);
    }
    // Segmented reduction towards each group's first lane: after the step of `off`, lane l holds the
    // top-2 of lanes [l, l + 2 off) of its group.
    for (int off = 1; off < lanes; off *= 2) {
      const float o1 = __shfl_down_sync(kFullMask, m1, off);
      const float o2 = __shfl_down_sync(kFullMask, m2, off);
      if (lane % lanes + off < lanes) top2_merge(m1, m2, o1, o2);
    }
    return __shfl_sync(kFullMask, m1 + m2, min(lane, r.n_group - 1) * lanes);
  }
#pragma unroll
  for (int j = 0; j < kLaneExperts; ++j) {
    if (e0 + j < r.experts) scratch[e0 + j] = c[j];
  }
  __syncwarp();
  if (lane < r.n_group) {
    for (int j = 0; j < gsize; ++j) top2_push(m1, m2, scratch[lane * gsize + j]);
  }
  __syncwarp();
  return m1 + m2;
}

// Bit g set: group g is kept. A NaN group score (only with a non-finite bias) ranks below -inf.
__device__ __forceinline__ uint32_t kept_groups(float gscore, const RouteRule& r) {
  const int lane = threadIdx.x % 32;
  const bool member = lane < r.n_group;
  const uint32_t key = member && gscore == gscore ? order_key(gscore) : 0u;
  uint32_t kept = 0;
  for (int k = 0; k < r.topk_group; ++k) {
    const bool open = member && !((kept >> lane) & 1u);
    const uint32_t best = __reduce_max_sync(kFullMask, open ? key : 0u);
    const uint32_t ties = __ballot_sync(kFullMask, open && key == best);
    kept |= ties & (0u - ties);  // the lowest group among the best
  }
  return kept;
}

// Routes one token. logit, bias: the lane's 8 values (anything past `experts`); scratch: 256 floats of
// this warp's shared memory (used for group sizes that are not a multiple of 8). Writes
// weights[0, top_k) and ids[0, top_k) of the token.
__device__ __forceinline__ void route_warp(const float (&logit)[kLaneExperts], const float (&bias)[kLaneExperts],
                                           const RouteRule& r, float* scratch, float* weights, int64_t* ids) {
  const int lane = threadIdx.x % 32, e0 = kLaneExperts * lane;
  const int gsize = r.experts / r.n_group;
  float s[kLaneExperts], c[kLaneExperts];
#pragma unroll
  for (int j = 0; j < kLaneExperts; ++j) {
    s[j] = 1.0f / (1.0f + expf(-logit[j]));  // as the shared-memory kernel (and ATen's CUDA sigmoid)
    c[j] = s[j] + bias[j];
  }
  const uint32_t kept = kept_groups(group_score(c, r, scratch), r);

  // Selection keys: 0 = not selectable (past `experts`, NaN in a kept group, taken); dropped groups -inf.
  const uint32_t ninf_key = order_key(-__int_as_float(0x7f800000));
  uint32_t key[kLaneExperts];
  int g = e0 / gsize, in_group = e0 % gsize;
#pragma unroll
  for (int j = 0; j < kLaneExperts; ++j) {
    const bool kept_g = g < r.n_group && ((kept >> g) & 1u);
    key[j] = e0 + j >= r.experts ? 0u : !kept_g ? ninf_key : c[j] == c[j] ? order_key(c[j]) : 0u;
    if (++in_group == gsize) in_group = 0, ++g;
  }
  // The lane's best (key, slot, score); with nothing selectable: (0, 0, s[0]), so that an exhausted
  // warp picks lane 0's slot 0 - expert 0, as the shared-memory kernel does.
  uint32_t best_key = 0;
  int best_j = 0;
  float best_s = s[0];
  const auto rescan = [&] {
    best_key = 0, best_j = 0, best_s = s[0];
#pragma unroll
    for (int j = 0; j < kLaneExperts; ++j) {
      if (key[j] > best_key) best_key = key[j], best_j = j, best_s = s[j];
    }
  };
  rescan();

  float w_mine = 0.f, w_sum = 0.f;
  int id_mine = 0;
  for (int k = 0; k < r.top_k; ++k) {
    const uint32_t best = __reduce_max_sync(kFullMask, best_key);
    const int win = __ffs(__ballot_sync(kFullMask, best_key == best)) - 1;
    const int j = __shfl_sync(kFullMask, best_j, win);
    const float w = __shfl_sync(kFullMask, best_s, win);
    w_sum += w;
    if (lane == k) w_mine = w, id_mine = kLaneExperts * win + j;
    if (lane == win) {
#pragma unroll
      for (int jj = 0; jj < kLaneExperts; ++jj) {
        if (jj == j) key[jj] = 0u;  // taken (a static index: the keys stay in registers)
      }
      rescan();
    }
  }
  if (lane < r.top_k) {
    float w = w_mine;
    if (r.norm_topk_prob) w = w / (w_sum + 1e-20f);
    weights[lane] = w * r.routed_scaling_factor;
    ids[lane] = id_mine;
  }
}

}  // namespace nmoe::router
