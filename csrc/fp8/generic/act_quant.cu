// quant_fp8_act: bf16 [m, k] -> e4m3 [m, k] + fp32 scales [m, ceil(k/128)], per token per 128 channels.
// Optionally gathers its rows (the MoE's tokens in expert order) and reads a [rows, heads, head]
// view with any head stride (attention's per-head outputs), so neither needs a copy first.
//
// Memory-bound: each lane reads 16 bytes and writes 8 per row; 16 lanes own one (row, 128-channel
// group); each thread handles kRowsPerThread rows of its column, all loads issued before the first use.
#include "fp8/generic/group_quant.cuh"
#include "fp8/params.h"
#include "pdl.cuh"

namespace nmoe::fp8 {
namespace {

__global__ void __launch_bounds__(32 * kMaxQuantWarps) act_quant_kernel(ActQuantParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t kb = (p.k + kBlock - 1) / kBlock;
  const int slot = threadIdx.x / kLanesPerGroup;
  const int lane = threadIdx.x % kLanesPerGroup;
  const int64_t gcol = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanesPerGroup) + slot;
  // A warp whose two groups both lie past the row has nothing to do. A warp with one such half
  // keeps it (zeros, no stores) so that the shuffles see all 32 lanes.
  if (gcol - (slot & 1) >= kb) return;
  const int64_t col = gcol * kBlock + lane * kVec;
  const bool col_ok = col < p.k;  // k % 8 == 0, so a lane's 8 channels are all in or all out
  const int64_t head = col / p.head;  // a 128-channel group never straddles two heads
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + head * p.x_head_stride + (col - head * p.head);
  uint8_t* q = static_cast<uint8_t*>(p.q) + col;
  // The row loop's bound depends on blockIdx only, so all lanes of a warp run the same iterations.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerThread; row0 < p.m;
       row0 += static_cast<int64_t>(gridDim.y) * kRowsPerThread) {
    uint4 raw[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t row = row0 + u;
      raw[u] = make_uint4(0, 0, 0, 0);
      if (!col_ok || row >= p.m) continue;
      const int64_t src = p.rows == nullptr ? row : p.rows[row];
      if (src >= 0 && src < p.x_rows) raw[u] = __ldcs(reinterpret_cast<const uint4*>(x + src * p.x_row_stride));
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t row = row0 + u;
      float v[kVec];
      unpack_bf16x8(raw[u], v);
      const float scale = quant_group_store(v, q + row * p.k, col_ok && row < p.m);
      if (lane == 0 && gcol < kb && row < p.m) p.s[row * kb + gcol] = scale;
    }
  }
}

}  // namespace

const char* act_quant(const ActQuantParams& p, cudaStream_t stream) {
  const int64_t kb = (p.k + kBlock - 1) / kBlock;
  if (p.m == 0 || kb == 0) return nullptr;
  const QuantGeometry geo = quant_geometry(p.m, kb);
  const cudaError_t launched = launch_pdl(act_quant_kernel, geo.grid, geo.block, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "act_quant: kernel launch failed";
}

}  // namespace nmoe::fp8
