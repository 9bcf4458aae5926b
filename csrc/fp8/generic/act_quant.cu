// quant_fp8_act: bf16 [m, k] -> e4m3 [m, k] + fp32 scales [m, ceil(k/128)], per token per 128 channels.
//
// Memory-bound: each lane reads 16 bytes and writes 8; 16 lanes own one (row, 128-channel group).
#include "fp8/generic/group_quant.cuh"
#include "fp8/params.h"

namespace nmoe::fp8 {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // loads in flight per lane

__global__ void __launch_bounds__(kThreads) act_quant_kernel(ActQuantParams p) {
  const int64_t kb = (p.k + kBlock - 1) / kBlock;
  const int64_t groups = p.m * kb;
  const int lane = threadIdx.x % kLanesPerGroup;
  const int half = (threadIdx.x % 32) / kLanesPerGroup;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  // A warp owns the 2 * kUnroll consecutive groups from 2 * kUnroll * w: all loads are issued before
  // the first is used, and the loop bound is warp-uniform so the shuffles see every lane.
  for (int64_t w = (blockIdx.x * kThreads + threadIdx.x) / 32; 2 * kUnroll * w < groups; w += warps) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t grp = 2 * (kUnroll * w + u) + half;
      const int64_t row = grp / kb, col = (grp % kb) * kBlock + lane * kVec;
      raw[u] = make_uint4(0, 0, 0, 0);
      // k % 8 == 0, so a lane's 8 channels are all in or all out.
      if (grp < groups && col < p.k) {
        raw[u] =
            __ldcs(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.x) + row * p.x_row_stride + col));
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t grp = 2 * (kUnroll * w + u) + half;
      const int64_t row = grp / kb, col = (grp % kb) * kBlock + lane * kVec;
      const bool valid = grp < groups;
      float v[kVec];
      unpack_bf16x8(raw[u], v);
      const float scale = quant_group_store(v, static_cast<uint8_t*>(p.q) + row * p.k + col, valid && col < p.k);
      if (valid && lane == 0) p.s[grp] = scale;
    }
  }
}

}  // namespace

const char* act_quant(const ActQuantParams& p, cudaStream_t stream) {
  const int64_t groups = p.m * ((p.k + kBlock - 1) / kBlock);
  if (groups == 0) return nullptr;
  const int64_t per_block = 2 * kUnroll * (kThreads / 32);
  const int64_t blocks = (groups + per_block - 1) / per_block;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  act_quant_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "act_quant: kernel launch failed";
}

}  // namespace nmoe::fp8
