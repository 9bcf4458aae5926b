// moe_combine: each token's k expert rows, weighted and summed in fp32 (j in order), plus an
// optional addend (the shared expert's output), rounded to bf16 once. One thread owns 8 channels
// (16-byte loads); the k rows of a group of 8 are all loaded before the first is used.
#include <cuda_bf16.h>

#include <cstdint>

#include "moe/params.h"
#include "pdl.cuh"

namespace nmoe::moe {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;
constexpr int kRowsInFlight = 8;

__device__ __forceinline__ void add_scaled(float (&acc)[kVec], const uint4& raw, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += w * f.x;
    acc[2 * i + 1] += w * f.y;
  }
}

__global__ void __launch_bounds__(kThreads) moe_combine_kernel(const CombineParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t t = blockIdx.x;
  const int c = (blockIdx.y * kThreads + threadIdx.x) * kVec;
  if (c >= p.h) return;
  const auto* ys = static_cast<const __nv_bfloat16*>(p.ys);
  const int64_t* pos = p.pos + t * p.k;
  const float* weights = p.weights + t * p.k;
  float acc[kVec] = {};
  for (int j0 = 0; j0 < p.k; j0 += kRowsInFlight) {
    uint4 raw[kRowsInFlight];
    float w[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = j0 + u;
      const int64_t r = j < p.k ? pos[j] : -1;
      const bool ok = r >= 0 && r < p.rows;
      w[u] = ok ? weights[j] : 0.0f;
      raw[u] = ok ? *reinterpret_cast<const uint4*>(ys + r * p.ys_stride + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (j0 + u < p.k) add_scaled(acc, raw[u], w[u]);
    }
  }
  if (p.add != nullptr) {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.add) + t * p.add_stride + c);
    add_scaled(acc, raw, 1.0f);
  }
  uint4 packed;
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) o[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + t * p.h + c) = packed;
}

}  // namespace

const char* moe_combine_launch(const CombineParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.h == 0) return nullptr;
  if (p.tokens > 0x7fffffff) return "moe_combine: too many tokens for one launch";
  const int col_blocks = (p.h / kVec + kThreads - 1) / kThreads;
  const cudaError_t launched = launch_pdl(moe_combine_kernel, dim3(static_cast<unsigned>(p.tokens), col_blocks), kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "moe_combine: kernel launch failed";
}

}  // namespace nmoe::moe
