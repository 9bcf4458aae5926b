// mla_decode_q: the absorbed decode query [B, H, R + D] from the latent query (q_nope folded through
// W_UK by a batched GEMM, [H, B, R]) and the unrotated rope query q_pe [B, H, D] (a view of q_b_proj's
// output): one warp per (sequence, head) copies the latent part and rotates the rope part, replacing
// apply_rope's chain of elementwise launches and the concatenation. The rotation rounds every
// product and sum in fp32 as torch's separate ops do (no FMA): bit-exact against apply_rope.
#include <cuda_bf16.h>

#include <cstdint>

#include "attention/params.h"
#include "pdl.cuh"
#include "rope_pair.cuh"

namespace nmoe::attention {
namespace {

constexpr int kWarps = 4;

__global__ void __launch_bounds__(32 * kWarps) mla_decode_q_kernel(const MlaDecodeQParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.y, h = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (h >= p.heads) return;
  const int64_t w = b * p.heads + h;
  const auto* lat = static_cast<const __nv_bfloat16*>(p.q_lat) + h * p.lat_head_stride + b * p.lat_batch_stride;
  const auto* pe = static_cast<const __nv_bfloat16*>(p.q_pe) + b * p.pe_batch_stride + h * p.pe_head_stride;
  auto* out = static_cast<__nv_bfloat16*>(p.out) + w * (p.rank + p.rope);
  for (int v = lane; v < p.rank / 8; v += 32) {
    *reinterpret_cast<uint4*>(out + 8 * v) = *reinterpret_cast<const uint4*>(lat + 8 * v);
  }
  const float* cos = p.cos + b * (p.rope / 2);
  const float* sin = p.sin + b * (p.rope / 2);
  for (int i = lane; i < p.rope / 2; i += 32) {
    const float x1 = __bfloat162float(pe[2 * i]), x2 = __bfloat162float(pe[2 * i + 1]);
    rotate_pair(x1, x2, cos[i], sin[i], out + p.rank + 2 * i);
  }
}

}  // namespace

const char* mla_decode_q_launch(const MlaDecodeQParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return nullptr;
  if (p.batch > 65535) return "mla_decode_q: more than 65535 sequences in one launch";
  const dim3 grid(static_cast<unsigned>((p.heads + kWarps - 1) / kWarps), static_cast<unsigned>(p.batch));
  const cudaError_t launched = launch_pdl(mla_decode_q_kernel, grid, 32 * kWarps, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_decode_q: kernel launch failed";
}

}  // namespace nmoe::attention
