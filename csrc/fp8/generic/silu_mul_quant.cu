// silu_mul_quant_fp8: bf16 [m, 2i] -> e4m3 [m, i] + fp32 scales [m, ceil(i/128)] of silu(gate) * up,
// gate = x[:, :i], up = x[:, i:]: the SwiGLU between the two expert GEMMs, in fp32, quantized for
// the second GEMM without a round trip through memory.
#include "fp8/generic/group_quant.cuh"
#include "fp8/params.h"

namespace nmoe::fp8 {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // groups in flight per lane

__global__ void __launch_bounds__(kThreads) silu_mul_quant_kernel(SiluMulQuantParams p) {
  const int64_t ib = (p.i + kBlock - 1) / kBlock;
  const int64_t groups = p.m * ib;
  const int lane = threadIdx.x % kLanesPerGroup;
  const int half = (threadIdx.x % 32) / kLanesPerGroup;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  // As in act_quant: a warp owns 2 * kUnroll consecutive groups, loads issued before use.
  for (int64_t w = (blockIdx.x * kThreads + threadIdx.x) / 32; 2 * kUnroll * w < groups; w += warps) {
    uint4 raw_gate[kUnroll], raw_up[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t grp = 2 * (kUnroll * w + u) + half;
      const int64_t row = grp / ib, col = (grp % ib) * kBlock + lane * kVec;
      raw_gate[u] = raw_up[u] = make_uint4(0, 0, 0, 0);
      if (grp < groups && col < p.i) {
        const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + row * p.x_row_stride + col;
        raw_gate[u] = __ldcs(reinterpret_cast<const uint4*>(x));
        raw_up[u] = __ldcs(reinterpret_cast<const uint4*>(x + p.i));
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t grp = 2 * (kUnroll * w + u) + half;
      const int64_t row = grp / ib, col = (grp % ib) * kBlock + lane * kVec;
      const bool valid = grp < groups;
      float gate[kVec], up[kVec], v[kVec];
      unpack_bf16x8(raw_gate[u], gate);
      unpack_bf16x8(raw_up[u], up);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
      const float scale = quant_group_store(v, static_cast<uint8_t*>(p.q) + row * p.i + col, valid && col < p.i);
      if (valid && lane == 0) p.s[grp] = scale;
    }
  }
}

}  // namespace

const char* silu_mul_quant(const SiluMulQuantParams& p, cudaStream_t stream) {
  const int64_t groups = p.m * ((p.i + kBlock - 1) / kBlock);
  if (groups == 0) return nullptr;
  const int64_t per_block = 2 * kUnroll * (kThreads / 32);
  const int64_t blocks = (groups + per_block - 1) / per_block;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  silu_mul_quant_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "silu_mul_quant: kernel launch failed";
}

}  // namespace nmoe::fp8
