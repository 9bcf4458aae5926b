// Launch code of the sm90 wgmma MLA decode split kernel (mla_decode_wgmma.cuh). The split count,
// the partial outputs and the combine kernel are those of mla_decode_paged.cu; paired splits
// (p.pair_splits, eager schedule) merge inside the kernel instead.
#include "attention/params.h"
#include "attention/sm90/mla_decode_wgmma.cuh"

namespace nmoe::attention {

const char* mla_decode_wgmma_launch_split(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.impl == kMlaImplWgmmaSeesaw) return mla_decode_seesaw_launch_split(p, stream);
  if (p.heads < kMlaWgmmaMinHeads) return "mla_decode_paged: the wgmma kernel needs at least 64 heads";
  auto kernel = p.pair_splits                     ? sm90_wgmma::mla_decode_wgmma_kernel<false, false, true>
                : p.impl == kMlaImplWgmmaEager    ? sm90_wgmma::mla_decode_wgmma_kernel<false, false, false>
                : p.impl == kMlaImplWgmmaFenced ? sm90_wgmma::mla_decode_wgmma_kernel<true, true, false>
                                                : sm90_wgmma::mla_decode_wgmma_kernel<true, false, false>;
  constexpr int smem = sm90_wgmma::kSmemBytes;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return "mla_decode_paged: cannot raise the shared-memory limit of the wgmma kernel";
  }
  const dim3 grid((p.heads + sm90_wgmma::kHeads - 1) / sm90_wgmma::kHeads, p.num_splits, p.batch);
  // Paired: the two splits of a (sequence, head block) are one cluster (rank = split).
  const dim3 cluster(1, p.pair_splits ? 2 : 1, 1);
  const cudaError_t launched = launch_pdl_clusters(kernel, grid, cluster, sm90_wgmma::kThreads, smem, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_decode_paged: wgmma kernel launch failed";
}

}  // namespace nmoe::attention
