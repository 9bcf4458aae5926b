// The one-CTA-per-row sampler (1024 threads, every pass straight from global memory): the path for
// rows the cluster sampler (sample_cluster.cu) does not take - vocabularies over its shared-memory
// capacity, rows not on 16-byte boundaries - and the reference the cluster path was checked
// against (NMOE_SAMPLE_KERNEL=rowwise selects it for every call).
//
// Thresholds by radix selection over the composite key, 11/11/10 bits per round:
//   top-k : the k-th largest composite (counts)
//   top-p : the composite at which the inclusive mass, in 2^-40 fixed point (order-independent,
//           so the result is deterministic), first reaches p * (mass of the top-k set)
//   top-n logprobs: the n-th largest composite of the logprob values, then a rank sort of n entries
// A round stops early once its bucket is exactly the kept remainder. min-p is a value predicate.
// The token is the Gumbel-max over the kept set with the counter-based noise of ops/sampling.py,
// evaluated exactly (in double, like the reference) only where a float estimate can still win.
#include "sampling/generic/sample_common.cuh"
#include "sampling/params.h"

namespace nmoe::sampling {
namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads, 1) sample_rowwise_kernel(const SampleParams p) {
  __shared__ detail::rowwise::Shared sh;
  int64_t r = blockIdx.x;
  if (p.row_list != nullptr) {
    if (static_cast<int>(blockIdx.x) >= p.row_list[0]) return;
    r = p.row_list[1 + blockIdx.x];
  }
  detail::rowwise::sample_row<kThreads>(p, r, sh);
}

}  // namespace

const char* sample_rowwise_launch(const SampleParams& p, cudaStream_t stream) {
  if (p.rows == 0) return nullptr;
  if (p.rows > 0x7fffffff) return "sample: too many rows for one launch";
  sample_rowwise_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "sample: kernel launch failed";
}

}  // namespace nmoe::sampling
