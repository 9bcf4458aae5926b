// The rows of A (and D) that group g of a grouped GEMM multiplies, from the layout of its params:
// shared by the CUTLASS kernels' group-array setup (sm90/grouped_gemm.cuh) and nmoe's own wgmma
// kernel (sm90/gemm_w128x128.cu).
#pragma once

#include "fp8/params.h"

namespace nmoe::fp8 {

// The rows [row0, row0 + rows) that group g multiplies, from the layout of p.
__device__ __forceinline__ void group_rows(const GroupedGemmParams& p, int g, int& row0, int& rows) {
  if (p.layout == GroupLayout::kDense) {
    row0 = 0;
    rows = p.m;
  } else if (p.layout == GroupLayout::kContiguous) {
    // Clamped so that bad offsets can never address outside A or D.
    row0 = min(max(p.offsets[g], 0), p.m);
    rows = min(max(p.offsets[g + 1], row0), p.m) - row0;
  } else {
    row0 = g * p.m;
    rows = min(max(p.counts[g], 0), p.m);
  }
}

}  // namespace nmoe::fp8
