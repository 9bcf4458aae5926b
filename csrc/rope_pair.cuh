// One interleaved rope pair rotated as torch's apply_rope computes it: every product and sum
// rounded in fp32 as the separate ops round them (no FMA), so the bf16 results are bit-exact.
#pragma once

#include <cuda_bf16.h>

namespace nmoe {

__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, __nv_bfloat16* out) {
  out[0] = __float2bfloat16(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
  out[1] = __float2bfloat16(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}

}  // namespace nmoe
