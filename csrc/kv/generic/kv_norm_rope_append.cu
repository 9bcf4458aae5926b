// kv_norm_rope_append: one warp per new token normalizes its latent, rotates its rope key and
// writes both to the token's cache slot - what kv_a_layernorm, apply_rope and kv_append_paged do in
// about a dozen launches. Arithmetic as the torch reference: the norm in fp32
// (x * rsqrt(mean(x^2) + eps) * w, one rounding to bf16); the rotation (x1 c - x2 s, x2 c + x1 s)
// with every product and sum rounded in fp32 as torch's separate ops round them (no FMA), so the
// rope key is bit-exact and the latent within one bf16 rounding of the reference (the sum of
// squares is ordered differently).
#include <cuda_bf16.h>

#include <cstdint>

#include "kv/params.h"
#include "pdl.cuh"
#include "rope_pair.cuh"

namespace nmoe::kv {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxVecPerLane = kMaxNormRank / 8 / 32;

__global__ void __launch_bounds__(32 * kWarps) kv_norm_rope_kernel(const KvNormRopeParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= p.tokens) return;
  const int64_t slot = p.out_loc[t];
  if (slot < 0 || slot >= p.pages * p.page_size) return;  // a padded row: nothing to write
  auto* dst = static_cast<__nv_bfloat16*>(p.cache) + (slot / p.page_size) * p.page_stride +
              (slot % p.page_size) * p.token_stride;
  const auto* src = static_cast<const __nv_bfloat16*>(p.kv) + t * p.kv_stride;
  const auto* w = static_cast<const __nv_bfloat16*>(p.weight);
  const int vecs = p.rank / 8;
  uint4 raw[kMaxVecPerLane];
  float sumsq = 0.0f;
#pragma unroll
  for (int u = 0; u < kMaxVecPerLane; ++u) {
    const int v = lane + 32 * u;
    raw[u] = v < vecs ? *reinterpret_cast<const uint4*>(src + 8 * v) : make_uint4(0, 0, 0, 0);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      sumsq += f.x * f.x + f.y * f.y;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
  const float r = rsqrtf(sumsq / static_cast<float>(p.rank) + p.eps);
#pragma unroll
  for (int u = 0; u < kMaxVecPerLane; ++u) {
    const int v = lane + 32 * u;
    if (v >= vecs) break;
    const uint4 wraw = *reinterpret_cast<const uint4*>(w + 8 * v);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
    const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wraw);
    uint4 packed;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      const float2 g = __bfloat1622float2(wh[i]);
      o[i] = __floats2bfloat162_rn(f.x * r * g.x, f.y * r * g.y);
    }
    *reinterpret_cast<uint4*>(dst + 8 * v) = packed;
  }
  const float* cos = p.cos + t * (p.rope / 2);
  const float* sin = p.sin + t * (p.rope / 2);
  for (int i = lane; i < p.rope / 2; i += 32) {
    const float x1 = __bfloat162float(src[p.rank + 2 * i]), x2 = __bfloat162float(src[p.rank + 2 * i + 1]);
    rotate_pair(x1, x2, cos[i], sin[i], dst + p.rank + 2 * i);
  }
}

}  // namespace

const char* kv_norm_rope_append_launch(const KvNormRopeParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return nullptr;
  const int64_t blocks = (p.tokens + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return "kv_norm_rope_append: too many tokens for one launch";
  const cudaError_t launched = launch_pdl(kv_norm_rope_kernel, static_cast<unsigned>(blocks), 32 * kWarps, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "kv_norm_rope_append: kernel launch failed";
}

}  // namespace nmoe::kv
