// loopback_local_ids: the simulated rank's slot remap (nmoe/serve/ep/loopback.py has the rule and
// the torch reference, which this matches exactly: integer arithmetic only). One block of 1024
// threads: pass 1 counts this rank's own slots per local expert and the remote slots; a block scan
// turns the counts into the quota bounds; pass 2 numbers the remote slots in slot order (a block
// scan per 1024 slots) and gives each to the local expert whose quota holds its number.
#include <cub/block/block_scan.cuh>

#include "moe/params.h"

namespace nmoe::moe {
namespace {

constexpr int kThreads = 1024;

struct Slot {
  bool valid;
  bool mine;
  int own;  // the local index of the slot's expert (on the rank that owns it)
};

__device__ __forceinline__ Slot slot_of(const LoopbackParams& p, int64_t s) {
  Slot out{s < p.slots, false, 0};
  if (!out.valid) return out;
  int64_t g = p.ids[s];
  g = g < 0 ? 0 : (g >= p.n_experts ? p.n_experts - 1 : g);
  const int64_t own = p.local[g];
  out.own = static_cast<int>(own < 0 ? 0 : (own >= p.n_local ? p.n_local - 1 : own));
  out.mine = p.owner[g] == p.rank;
  return out;
}

__global__ void __launch_bounds__(kThreads) loopback_kernel(const LoopbackParams p) {
  using Scan = cub::BlockScan<int, kThreads>;  // counts fit int32 (the interface checks slots)
  __shared__ typename Scan::TempStorage scan;
  __shared__ int counts[kMaxLocalExperts];
  __shared__ int64_t bounds[kMaxLocalExperts];
  __shared__ int remote_total;
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid < p.n_local) counts[tid] = 0;
  if (tid == 0) remote_total = 0;
  __syncthreads();
  for (int64_t base = 0; base < p.slots; base += kThreads) {
    const Slot sl = slot_of(p, base + tid);
    const int key = sl.valid && sl.mine ? sl.own : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    if (key >= 0 && lane == __ffs(peers) - 1) atomicAdd(&counts[key], __popc(peers));
    const unsigned remote = __ballot_sync(0xffffffffu, sl.valid && !sl.mine);
    if (lane == 0 && remote) atomicAdd(&remote_total, __popc(remote));
  }
  __syncthreads();
  int cum, local_total;
  Scan(scan).InclusiveSum(tid < p.n_local ? counts[tid] : 0, cum, local_total);
  // remote slots [bounds[j-1], bounds[j]) go to local expert j: quotas proportional to its own count
  if (tid < p.n_local) bounds[tid] = static_cast<int64_t>(cum) * remote_total / (local_total > 0 ? local_total : 1);
  __syncthreads();
  int64_t seen = 0;  // remote slots before this round's first slot
  for (int64_t base = 0; base < p.slots; base += kThreads) {
    const int64_t s = base + tid;
    const Slot sl = slot_of(p, s);
    int before, round_total;
    Scan(scan).ExclusiveSum(sl.valid && !sl.mine ? 1 : 0, before, round_total);
    if (sl.valid) {
      int64_t out = sl.own;
      if (!sl.mine && local_total > 0) {
        const int64_t number = seen + before;
        int lo = 0, hi = p.n_local;  // the first j with bounds[j] > number (searchsorted right)
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (bounds[mid] > number) hi = mid; else lo = mid + 1;
        }
        out = lo < p.n_local ? lo : p.n_local - 1;
      }
      p.out[s] = out;
    }
    seen += round_total;
    __syncthreads();  // the next round's scan reuses the temp storage
  }
}

}  // namespace

const char* loopback_local_ids_launch(const LoopbackParams& p, cudaStream_t stream) {
  if (p.slots == 0) return nullptr;
  loopback_kernel<<<1, kThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "loopback_local_ids: kernel launch failed";
}

}  // namespace nmoe::moe
