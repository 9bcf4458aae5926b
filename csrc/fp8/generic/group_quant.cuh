// Per-token-per-128-channel e4m3 quantization of eight values held by one of 16 cooperating lanes,
// and the launch geometry shared by the two memory-bound quant kernels.
//
// Sixteen consecutive lanes of a warp own one 128-channel group of one row, eight channels each
// (one 16-byte bf16 load). Matches quant_fp8_act_ref bit for bit: scale = max(amax, 1e-12) / 448
// (IEEE division, once per group), q = rn_satfinite(x / scale) with x / scale correctly rounded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace nmoe::fp8 {

constexpr float kFp8Max = 448.0f;
constexpr int kLanesPerGroup = 16;
constexpr int kVec = 8;
constexpr int kRowsPerThread = 4;  // rows of one column group per thread: 4 independent loads in flight
constexpr int kMaxQuantWarps = 8;

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// x / s, correctly rounded, from r = RN(1 / s) without a division per element. q = RN(x * r) is
// within one ulp of x / s, the residual e = x - q * s is exact in one FMA, and RN(q + e * r) is the
// correctly rounded quotient (Markstein's theorem: r correctly rounded, q faithful, no underflow).
// Where e underflows (|x| below about 2^-100) the quotient is below 2^-50 and every rounding of it
// gives an e4m3 zero; copysignf restores the sign of a zero quotient (-0 / s = -0, which the FMAs
// would turn into +0). Checked on the H200 against __fdiv_rn for all 1.07e9 (x, amax) pairs of
// bf16 values with |x| <= amax (the whole input domain of quant_fp8_act) and 4.3e9 random fp32
// pairs (silu_mul_quant's domain): the fp32 quotients differ in 0.2% of them, all tiny quotients
// that round to the same e4m3 byte; not one e4m3 byte differs.
__device__ __forceinline__ float div_by_scale(float x, float s, float r) {
  const float q = __fmul_rn(x, r);
  const float e = __fmaf_rn(-q, s, x);
  return copysignf(__fmaf_rn(e, r, q), x);
}

// Reduces amax over the 16 lanes of the group, writes the 8 quantized bytes (if `store`) and
// returns the group's scale (the same in all 16 lanes). One IEEE division per group (the scale),
// none per element: an IEEE division per element made these kernels issue-bound.
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
    const float r = __frcp_rn(scale);
    uint32_t packed[2];
    uint16_t* pairs = reinterpret_cast<uint16_t*>(packed);
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 f = make_float2(div_by_scale(v[2 * i], scale, r), div_by_scale(v[2 * i + 1], scale, r));
      pairs[i] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
    }
    *reinterpret_cast<uint2*>(q) = make_uint2(packed[0], packed[1]);
  }
  return scale;
}

// Launch geometry: x of the grid walks the 128-channel groups of a row (two per warp, up to 16 per
// block), y walks blocks of kRowsPerThread rows (grid-stride beyond 65535). No integer division on
// the device, and the loads of one thread are kRowsPerThread rows of one column: independent.
struct QuantGeometry {
  dim3 grid;
  dim3 block;
};

inline QuantGeometry quant_geometry(int64_t rows, int64_t groups_per_row) {
  int64_t warps = (groups_per_row + 1) / 2;
  if (warps > kMaxQuantWarps) warps = kMaxQuantWarps;
  const int64_t slots = 2 * warps;
  const int64_t gx = (groups_per_row + slots - 1) / slots;
  int64_t gy = (rows + kRowsPerThread - 1) / kRowsPerThread;
  if (gy > 65535) gy = 65535;
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(static_cast<unsigned>(32 * warps))};
}

}  // namespace nmoe::fp8
