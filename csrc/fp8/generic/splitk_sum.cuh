// The split-K GEMM's partial products, read as their sum: bf16 slices [splits, m, n] (slice stride
// in elements) -> bf16(sum over the slices in fp32, in slice order, from 0). The same arithmetic as
// splitk_reduce, bit for bit, for the kernels that read a split GEMM's output directly instead of
// its reduction (the norms, kv_norm_rope_append): one launch and one round trip of the output saved.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace nmoe::fp8 {

// Eight consecutive elements at x (16-byte aligned in every slice).
__device__ __forceinline__ uint4 load_splitk8(const __nv_bfloat16* x, int64_t slice_stride, int slices) {
  const uint4 first = *reinterpret_cast<const uint4*>(x);
  if (slices == 1) return first;
  float acc[8] = {};
  for (int s = 0; s < slices; ++s) {
    const uint4 raw = s == 0 ? first : *reinterpret_cast<const uint4*>(x + s * slice_stride);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  uint4 packed;
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return packed;
}

// One element, as a float (the bf16 sum).
__device__ __forceinline__ float load_splitk1(const __nv_bfloat16* x, int64_t slice_stride, int slices) {
  if (slices == 1) return __bfloat162float(*x);
  float acc = 0.0f;
  for (int s = 0; s < slices; ++s) acc += __bfloat162float(x[s * slice_stride]);
  return __bfloat162float(__float2bfloat16(acc));
}

}  // namespace nmoe::fp8
