// silu_mul_quant_fp8: bf16 [m, 2i] -> e4m3 [m, i] + fp32 scales [m, ceil(i/128)] of silu(gate) * up,
// gate = x[:, :i], up = x[:, i:]: the SwiGLU between the two expert GEMMs, in fp32, quantized for
// the second GEMM without a round trip through memory.
//
// silu uses the hardware exp2 and reciprocal (__expf, __fdividef, a few ulp) where the CPU reference
// has its own exp: the two never agreed to the bit, and the test compares them with a tolerance.
// The quantization itself is the exact one of quant_fp8_act.
#include "fp8/generic/group_quant.cuh"
#include "fp8/params.h"
#include "pdl.cuh"

namespace nmoe::fp8 {
namespace {

__device__ __forceinline__ float silu_mul(float gate, float up) {
  return __fdividef(gate, 1.0f + __expf(-gate)) * up;
}

__global__ void __launch_bounds__(32 * kMaxQuantWarps) silu_mul_quant_kernel(SiluMulQuantParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t ib = (p.i + kBlock - 1) / kBlock;
  const int slot = threadIdx.x / kLanesPerGroup;
  const int lane = threadIdx.x % kLanesPerGroup;
  const int64_t gcol = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanesPerGroup) + slot;
  // As in act_quant: warps past the row leave, half-warps past it stay for the shuffles.
  if (gcol - (slot & 1) >= ib) return;
  const int64_t col = gcol * kBlock + lane * kVec;
  const bool col_ok = col < p.i;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + col;
  uint8_t* q = static_cast<uint8_t*>(p.q) + col;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerThread; row0 < p.m;
       row0 += static_cast<int64_t>(gridDim.y) * kRowsPerThread) {
    uint4 raw_gate[kRowsPerThread], raw_up[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t row = row0 + u;
      raw_gate[u] = raw_up[u] = make_uint4(0, 0, 0, 0);
      if (col_ok && row < p.m) {
        const __nv_bfloat16* xr = x + row * p.x_row_stride;
        raw_gate[u] = __ldcs(reinterpret_cast<const uint4*>(xr));
        raw_up[u] = __ldcs(reinterpret_cast<const uint4*>(xr + p.i));
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t row = row0 + u;
      float gate[kVec], up[kVec], v[kVec];
      unpack_bf16x8(raw_gate[u], gate);
      unpack_bf16x8(raw_up[u], up);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = silu_mul(gate[j], up[j]);
      const float scale = quant_group_store(v, q + row * p.i, col_ok && row < p.m);
      if (lane == 0 && gcol < ib && row < p.m) p.s[row * ib + gcol] = scale;
    }
  }
}

}  // namespace

const char* silu_mul_quant(const SiluMulQuantParams& p, cudaStream_t stream) {
  const int64_t ib = (p.i + kBlock - 1) / kBlock;
  if (p.m == 0 || ib == 0) return nullptr;
  const QuantGeometry geo = quant_geometry(p.m, ib);
  const cudaError_t launched = launch_pdl(silu_mul_quant_kernel, geo.grid, geo.block, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "silu_mul_quant: kernel launch failed";
}

}  // namespace nmoe::fp8
