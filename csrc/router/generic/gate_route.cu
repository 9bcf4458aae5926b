// The router with its gate GEMM, for decode-sized batches, in two kernels:
//
// 1. gate_partials: logits partials [slices, tokens, ldp] = x[:, slice] @ weight[:, slice]^T. A CTA is
//    64 experts x one K slice of 224 (DeepSeek-V3: 4 expert tiles x 32 slices = 128 CTAs, each
//    streaming 28 KB of the 3.7 MB weight once). Each warp holds its 16 experts' slice of the weight in
//    registers (16-byte loads straight into mma fragments), the CTA stages 32 tokens of x at a time in
//    shared memory (cp.async, double-buffered), and mma.sync m16n8k16 (bf16 in, fp32 accumulate: exact
//    products) computes the experts x tokens tile. The 16 bytes a lane loads are 8 consecutive k, so
//    a fragment's k order is a permutation of the slice's - the same one for x and the weight.
// 2. gate_reduce_route: one block per token sums its slices in a fixed order (4 interleaved parts of
//    slices in slice order, then the parts in order) and one warp routes it (route_warp.cuh).
//
// The slice count depends on hidden alone and a token's column of an mma depends only on its own row
// of x, so a row's logits - and its route - do not depend on the other rows of the batch.
#include <cuda_bf16.h>

#include <cstdint>

#include "mma_bf16.cuh"
#include "pdl.cuh"
#include "router/generic/route_warp.cuh"
#include "router/params.h"

namespace nmoe::router {
namespace {

constexpr int kGateWarps = 4;
constexpr int kTileExperts = 16 * kGateWarps;
constexpr int kTokenGroup = 32;  // four n8 tiles of tokens per pass over the staged x
constexpr int kGateThreads = kGateWarps * 32;
constexpr int kPieces = kTokenGroup * kGateSliceK / 8;  // 16-byte pieces of a staged token group
static_assert(kPieces % kGateThreads == 0, "a token group stages in whole rounds of the CTA");
constexpr int kReduceParts = 4;
constexpr int kReduceThreads = kReduceParts * kMaxFusedExperts / 4;  // a float4 of experts each

// x rows [group * 32, + 32) of this CTA's slice -> xs (zeros past the last token).
__device__ __forceinline__ void stage_tokens(const MoeGateRouteParams& p, __nv_bfloat16 (*xs)[kGateSliceK], int group,
                                             int k0, int chunks) {
  const auto* x = static_cast<const __nv_bfloat16*>(p.x);
#pragma unroll
  for (int u = 0; u < kPieces / kGateThreads; ++u) {
    const int i = threadIdx.x + u * kGateThreads;
    const int row = i / (kGateSliceK / 8), piece = i % (kGateSliceK / 8);
    if (piece >= chunks * (kGateChunk / 8)) continue;  // past the last slice's end: never read
    const int t = group * kTokenGroup + row;
    const __nv_bfloat16* src = t < p.tokens ? x + t * p.x_stride + k0 + piece * 8 : x;
    cp_async16(&xs[row][piece * 8], src, t < p.tokens ? 16 : 0);
  }
  cp_async_commit();
}

__global__ void __launch_bounds__(kGateThreads) gate_partials_kernel(const MoeGateRouteParams p) {
  __shared__ __align__(16) __nv_bfloat16 xs[2][kTokenGroup][kGateSliceK];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int E = p.rule.experts, slice = blockIdx.y, k0 = slice * kGateSliceK;
  const int chunks = min(kGateSliceChunks, (p.hidden - k0) / kGateChunk);
  const int warp_e = blockIdx.x * kTileExperts + warp * 16;
  const int e_lo = warp_e + g, e_hi = e_lo + 8;  // the fragment's rows g and g + 8

  // The warp's 16 x 224 slice of the weight: wa[c][0] and wa[c][1] hold k [c * 32 + tig * 8, + 8) of
  // rows e_lo and e_hi - the a-fragment registers of two k16 steps (.x/.y the first, .z/.w the second).
  // Fetched before the programmatic dependency wait (csrc/pdl.cuh): no kernel writes the weight, so
  // the fetch overlaps the previous kernel's tail; x and the partials only after the wait.
  const auto* w = static_cast<const __nv_bfloat16*>(p.weight);
  uint4 wa[kGateSliceChunks][2];
#pragma unroll
  for (int c = 0; c < kGateSliceChunks; ++c) {
    const int64_t k = k0 + c * kGateChunk + tig * 8;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    wa[c][0] = c < chunks && e_lo < E ? load_stream(w + e_lo * static_cast<int64_t>(p.hidden) + k) : zero;
    wa[c][1] = c < chunks && e_hi < E ? load_stream(w + e_hi * static_cast<int64_t>(p.hidden) + k) : zero;
  }
  pdl_enter();

  const int groups = (p.tokens + kTokenGroup - 1) / kTokenGroup;
  stage_tokens(p, xs[0], 0, k0, chunks);
  for (int group = 0; group < groups; ++group) {
    if (group + 1 < groups) {
      stage_tokens(p, xs[(group + 1) % 2], group + 1, k0, chunks);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int t0 = group * kTokenGroup;
    if (warp_e < E) {
      const __nv_bfloat16(*x)[kGateSliceK] = xs[group % 2];
      float acc[kTokenGroup / 8][4] = {};
#pragma unroll
      for (int c = 0; c < kGateSliceChunks; ++c) {
        if (c >= chunks) break;
#pragma unroll
        for (int n = 0; n < kTokenGroup / 8; ++n) {
          if (t0 + n * 8 >= p.tokens) break;
          const uint4 xb = *reinterpret_cast<const uint4*>(&x[n * 8 + g][c * kGateChunk + tig * 8]);
          mma_bf16(acc[n], wa[c][0].x, wa[c][1].x, wa[c][0].y, wa[c][1].y, xb.x, xb.y);
          mma_bf16(acc[n], wa[c][0].z, wa[c][1].z, wa[c][0].w, wa[c][1].w, xb.z, xb.w);
        }
      }
      // acc[n]: (expert e_lo, tokens t, t + 1), then (e_hi, t, t + 1), with t = t0 + n * 8 + 2 tig.
#pragma unroll
      for (int n = 0; n < kTokenGroup / 8; ++n) {
        const int t = t0 + n * 8 + 2 * tig;
#pragma unroll
        for (int dt = 0; dt < 2; ++dt) {
          if (t + dt >= p.tokens) continue;
          float* out = p.partials + (static_cast<int64_t>(slice) * p.tokens + t + dt) * p.ldp;
          if (e_lo < E) out[e_lo] = acc[n][dt];
          if (e_hi < E) out[e_hi] = acc[n][2 + dt];
        }
      }
    }
    __syncthreads();  // xs[group % 2] is restaged next
  }
}

__global__ void __launch_bounds__(kReduceThreads) gate_reduce_route_kernel(const MoeGateRouteParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  __shared__ __align__(16) float sums[kReduceParts][kMaxFusedExperts];
  const int t = blockIdx.x, quad = threadIdx.x % (kMaxFusedExperts / 4), part = threadIdx.x / (kMaxFusedExperts / 4);
  const int E = p.rule.experts;
  if (4 * quad < E) {
    const float* col = p.partials + static_cast<int64_t>(t) * p.ldp + 4 * quad;
    const int64_t slice_stride = static_cast<int64_t>(p.tokens) * p.ldp;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = part; s < p.slices; s += kReduceParts) {
      const float4 v = *reinterpret_cast<const float4*>(col + s * slice_stride);
      acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
    }
    *reinterpret_cast<float4*>(&sums[part][4 * quad]) = acc;
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int e0 = kLaneExperts * threadIdx.x;
  float logit[kLaneExperts], bias[kLaneExperts];
#pragma unroll
  for (int j = 0; j < kLaneExperts; ++j) {
    const int e = e0 + j;
    logit[j] = e < E ? ((sums[0][e] + sums[1][e]) + sums[2][e]) + sums[3][e] : 0.f;
    bias[j] = e < E ? p.bias[e] : 0.f;
  }
  __syncwarp();  // route_warp may reuse sums as its scratch
  route_warp(logit, bias, p.rule, &sums[0][0], p.weights + static_cast<int64_t>(t) * p.rule.top_k,
             p.ids + static_cast<int64_t>(t) * p.rule.top_k);
}

}  // namespace

const char* moe_gate_route_launch(const MoeGateRouteParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return nullptr;
  if (p.tokens > kMaxFusedTokens || p.rule.experts > kMaxFusedExperts || p.hidden % kGateChunk != 0 ||
      p.slices != gate_route_slices(p.hidden) || p.ldp != gate_route_ldp(p.rule.experts))
    return "moe_gate_route: parameters outside the kernels' limits";
  const dim3 tiles((p.rule.experts + kTileExperts - 1) / kTileExperts, p.slices);
  cudaError_t launched = launch_pdl(gate_partials_kernel, tiles, kGateThreads, 0, stream, p);
  if (launched != cudaSuccess) return "moe_gate_route: gate_partials launch failed";
  launched = launch_pdl(gate_reduce_route_kernel, static_cast<unsigned>(p.tokens), kReduceThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "moe_gate_route: gate_reduce_route launch failed";
}

}  // namespace nmoe::router
