// The split-K GEMM's reduction: out = bf16(sum of the slices' bf16 partial products), summed in
// fp32 in slice order (deterministic). Memory-bound and tiny at decode sizes (the partials of an
// m=32 o_proj are 4 x 32 x 7168 bf16); 8 outputs per thread, 16-byte loads. Kernels that read a
// split GEMM's output directly sum its slices the same way (splitk_sum.cuh) instead.
#include <cuda_bf16.h>

#include <cstdint>

#include "fp8/generic/splitk_sum.cuh"
#include "fp8/params.h"
#include "pdl.cuh"

namespace nmoe::fp8 {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) splitk_reduce_kernel(const SplitKReduceParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (v * 8 >= p.elems) return;
  const auto* parts = static_cast<const __nv_bfloat16*>(p.partials);
  static_cast<uint4*>(p.out)[v] = load_splitk8(parts + v * 8, p.elems, p.splits);
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
