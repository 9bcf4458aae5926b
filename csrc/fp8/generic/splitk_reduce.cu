// The split-K GEMM's reduction: out = bf16(sum of the slices' bf16 partial products), summed in
// fp32 in slice order (deterministic). Memory-bound and tiny at decode sizes (the partials of an
// m=32 o_proj are 4 x 32 x 7168 bf16); 8 outputs per thread, 16-byte loads.
#include <cuda_bf16.h>

#include <cstdint>

#include "fp8/params.h"
#include "pdl.cuh"

namespace nmoe::fp8 {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) splitk_reduce_kernel(const SplitKReduceParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (v * 8 >= p.elems) return;
  const auto* parts = static_cast<const uint4*>(p.partials);
  const int64_t stride = p.elems / 8;
  float acc[8] = {};
  for (int s = 0; s < p.splits; ++s) {
    const uint4 raw = parts[s * stride + v];
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
  static_cast<uint4*>(p.out)[v] = packed;
}

}  // namespace

const char* splitk_reduce(const SplitKReduceParams& p, cudaStream_t stream) {
  if (p.elems == 0) return nullptr;
  if (p.elems % 8) return "splitk_reduce: m * n must be a multiple of 8";
  const int64_t blocks = (p.elems / 8 + kThreads - 1) / kThreads;
  const cudaError_t launched = launch_pdl(splitk_reduce_kernel, static_cast<unsigned>(blocks), kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "splitk_reduce: kernel launch failed";
}

}  // namespace nmoe::fp8
