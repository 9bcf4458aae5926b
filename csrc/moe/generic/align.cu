// moe_align: (token, k) slots sorted by local expert, for the contiguous grouped GEMM.
//
// One block of 1024 threads (a decode step has a few hundred slots, a 16k-token prefill 131k; both
// are microseconds next to the GEMMs they feed). Pass 1 counts slots per expert in shared memory,
// a block scan turns the counts into offsets, pass 2 hands out rows. Lanes of a warp with the same
// expert are aggregated (__match_any_sync) into one shared atomic, so a hot expert does not
// serialize the block. Within an expert the row order follows the atomics (not the slot order):
// a GEMM row's result does not depend on where its row sits, so values stay deterministic.
#include <cub/block/block_scan.cuh>

#include "moe/params.h"
#include "pdl.cuh"

namespace nmoe::moe {
namespace {

constexpr int kThreads = 1024;
static_assert(kMaxLocalExperts <= kThreads, "one expert per thread in the scan");

__device__ __forceinline__ int expert_of(const AlignParams& p, int64_t s) {
  int64_t e = p.ids[s];
  if (p.expert_map != nullptr) {
    e = __ldg(p.expert_map + (static_cast<uint64_t>(e) < static_cast<uint64_t>(p.map_len) ? e : 0));
  }
  return static_cast<int>(e < 0 ? 0 : (e >= p.experts ? p.experts - 1 : e));
}

__global__ void __launch_bounds__(kThreads) moe_align_kernel(const AlignParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int cursor[kMaxLocalExperts];
  const int tid = threadIdx.x, lane = tid & 31;
  const unsigned lower = (1u << lane) - 1u;
  if (tid < p.experts) cursor[tid] = 0;
  __syncthreads();
  for (int64_t base = 0; base < p.slots; base += kThreads) {  // bound uniform over the block
    const int64_t s = base + tid;
    const int e = s < p.slots ? expert_of(p, s) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && lane == __ffs(peers) - 1) atomicAdd(&cursor[e], __popc(peers));
  }
  __syncthreads();
  const int count = tid < p.experts ? cursor[tid] : 0;
  int start;
  Scan(scan).ExclusiveSum(count, start);  // its barriers order every read of cursor before the writes
  if (tid < p.experts) {
    cursor[tid] = start;
    p.offsets[tid] = start;
    if (tid == p.experts - 1) p.offsets[p.experts] = start + count;
  }
  __syncthreads();
  for (int64_t base = 0; base < p.slots; base += kThreads) {
    const int64_t s = base + tid;
    const int e = s < p.slots ? expert_of(p, s) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int leader = __ffs(peers) - 1;
    int first = 0;
    if (e >= 0 && lane == leader) first = atomicAdd(&cursor[e], __popc(peers));
    first = __shfl_sync(0xffffffffu, first, leader);
    if (e >= 0) {
      const int64_t row = first + __popc(peers & lower);
      p.pos[s] = row;
      p.src_rows[row] = s / p.k;
    }
  }
}

}  // namespace

const char* moe_align_launch(const AlignParams& p, cudaStream_t stream) {
  const cudaError_t launched = launch_pdl(moe_align_kernel, 1, kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "moe_align: kernel launch failed";
}

}  // namespace nmoe::moe
