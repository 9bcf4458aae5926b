// Fused RMSNorm, optionally after the residual add: one 256-thread block per row holds the row in
// registers (16-byte loads, at most 8 per thread), so the row is read once and written once (twice
// with the sum). Replaces the residual add and torch's norm kernel (about 7 us for a 32 x 7168
// decode batch: latency, not bandwidth) with one launch. The sum is rounded to bf16 before the norm
// reads it, as the unfused `x = x + r; rms_norm(x)` does.
//
// With `q` set the kernel also quantizes its bf16 output for the FP8 projection that reads it
// (quant_fp8_act's format and bits: the 16 threads holding a 128-channel group are 16 consecutive
// lanes of one warp, the layout of fp8/generic/group_quant.cuh), saving that projection's
// quantization kernel: a launch and a read of the row.
#include <cuda_bf16.h>

#include <cstdint>

#include "fp8/generic/group_quant.cuh"
#include "fp8/params.h"
#include "norm/params.h"
#include "pdl.cuh"

namespace nmoe::norm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxVec = kMaxHidden / 8 / kThreads;

__device__ __forceinline__ void unpack(const uint4& raw, float (&v)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 pack(const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return raw;
}

__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  __shared__ float warp_sums[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, vecs = p.h / 8;
  const auto* x = static_cast<const __nv_bfloat16*>(p.x) + row * p.x_stride;
  const auto* r = static_cast<const __nv_bfloat16*>(p.residual) + row * p.res_stride;
  uint4 raw[kMaxVec];
#pragma unroll
  for (int u = 0; u < kMaxVec; ++u) {
    const int v = tid + u * kThreads;
    raw[u] = v < vecs ? *reinterpret_cast<const uint4*>(x + 8 * v) : make_uint4(0, 0, 0, 0);
  }
  float sumsq = 0.0f;
#pragma unroll
  for (int u = 0; u < kMaxVec; ++u) {
    const int v = tid + u * kThreads;
    if (v >= vecs) break;
    float a[8];
    unpack(raw[u], a);
    if (p.residual != nullptr) {
      float b[8];
      unpack(*reinterpret_cast<const uint4*>(r + 8 * v), b);
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = a[i] + b[i];
      raw[u] = pack(a);  // the sum, rounded to bf16: what the norm reads
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.sum) + row * p.h + 8 * v) = raw[u];
      unpack(raw[u], a);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sumsq += a[i] * a[i];
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
  if (tid % 32 == 0) warp_sums[tid / 32] = sumsq;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];  // the same order in every thread
  const float scale = rsqrtf(total / static_cast<float>(p.h) + p.eps);
  const auto* w = static_cast<const __nv_bfloat16*>(p.weight);
  const int warp_first = tid & ~31;
#pragma unroll
  for (int u = 0; u < kMaxVec; ++u) {
    const int v = tid + u * kThreads;
    // Whole warps leave (the quantization's shuffles need all 32 lanes); h % 128 == 0 under
    // quantization, so each half-warp's group is wholly inside the row or wholly past it.
    if (warp_first + u * kThreads >= vecs) break;
    const bool inside = v < vecs;
    float a[8], g[8];
    unpack(raw[u], a);
    unpack(inside ? *reinterpret_cast<const uint4*>(w + 8 * v) : make_uint4(0, 0, 0, 0), g);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = a[i] * scale * g[i];
    const uint4 out = pack(a);
    if (inside) *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + row * p.h + 8 * v) = out;
    if (p.q != nullptr) {
      unpack(out, a);  // the bf16 output is what the unfused quantization would read
      const float s = fp8::quant_group_store(a, static_cast<uint8_t*>(p.q) + row * p.h + 8 * v, inside);
      if (inside && v % fp8::kLanesPerGroup == 0) p.s[row * (p.h / fp8::kBlock) + v / fp8::kLanesPerGroup] = s;
    }
  }
}

}  // namespace

const char* rms_norm_launch(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return nullptr;
  if (p.rows > 0x7fffffff) return "rms_norm: too many rows for one launch";
  const cudaError_t launched = launch_pdl(rms_norm_kernel, static_cast<unsigned>(p.rows), kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "rms_norm: kernel launch failed";
}

}  // namespace nmoe::norm
