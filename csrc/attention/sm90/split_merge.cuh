// The merge of split-KV partial results (out normalized per split, lse natural log), one definition
// for the combine kernel (any split count, partials in global memory) and the paired wgmma kernel
// (two splits merged through distributed shared memory): the same arithmetic in both.
#pragma once

namespace nmoe::attention {

// A split's weight exp(lse - mx), mx the row's largest lse (a split of length 0 has lse -inf: 0).
__device__ __forceinline__ float split_weight(float lse, float mx) { return exp2f((lse - mx) * 1.4426950408889634f); }

// The merged row's lse from its max and the sum of the weights (no weight: the max, -inf).
__device__ __forceinline__ float merged_lse(float mx, float total) { return total > 0.f ? mx + logf(total) : mx; }

}  // namespace nmoe::attention
