// Per-token-per-128-channel e4m3 quantization of eight values held by one of 16 cooperating lanes.
//
// Sixteen consecutive lanes of a warp own one 128-channel group of one row, eight channels each
// (one 16-byte bf16 load). Matches quant_fp8_act_ref bit for bit: scale = max(amax, 1e-12) / 448,
// q = rn_satfinite(x / scale), both IEEE-rounded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace nmoe::fp8 {

constexpr float kFp8Max = 448.0f;
constexpr int kLanesPerGroup = 16;
constexpr int kVec = 8;

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Reduces amax over the 16 lanes of the group, writes the 8 quantized bytes (if `store`) and
// returns the group's scale (the same in all 16 lanes).
__device__ __forceinline__ float quant_group_store(const float (&v)[kVec], uint8_t* q, bool store) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = kLanesPerGroup / 2; off > 0; off /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  }
  const float scale = __fdiv_rn(fmaxf(amax, 1e-12f), kFp8Max);
  if (store) {
    uint32_t packed[2];
    uint16_t* pairs = reinterpret_cast<uint16_t*>(packed);
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 f = make_float2(__fdiv_rn(v[2 * i], scale), __fdiv_rn(v[2 * i + 1], scale));
      pairs[i] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
    }
    *reinterpret_cast<uint2*>(q) = make_uint2(packed[0], packed[1]);
  }
  return scale;
}

}  // namespace nmoe::fp8
