// Launch code of the sm90 seesaw MLA decode split kernel (mla_decode_seesaw.cuh): the same grid,
// cluster pairing, shared-memory opt-in and programmatic launch as the eager wgmma kernel.
#include "attention/params.h"
#include "attention/sm90/mla_decode_seesaw.cuh"

namespace nmoe::attention {

const char* mla_decode_seesaw_launch_split(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.heads < kMlaWgmmaMinHeads) return "mla_decode_paged: the wgmma kernel needs at least 64 heads";
  auto kernel = p.pair_splits ? sm90_seesaw::mla_decode_seesaw_kernel<true> : sm90_seesaw::mla_decode_seesaw_kernel<false>;
  constexpr int smem = sm90_seesaw::kSsSmemBytes;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return "mla_decode_paged: cannot raise the shared-memory limit of the seesaw kernel";
  }
  const dim3 grid((p.heads + sm90_wgmma::kHeads - 1) / sm90_wgmma::kHeads, p.num_splits, p.batch);
  const dim3 cluster(1, p.pair_splits ? 2 : 1, 1);  // paired: the two splits as one cluster (rank = split)
  const cudaError_t launched = launch_pdl_clusters(kernel, grid, cluster, sm90_wgmma::kThreads, smem, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_decode_paged: seesaw kernel launch failed";
}

}  // namespace nmoe::attention
