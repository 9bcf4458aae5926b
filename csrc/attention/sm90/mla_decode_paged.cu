// Launch code of the sm90 MLA decode: head-block variant choice, split heuristic, combine.
#include <algorithm>

#include "attention/params.h"
#include "attention/sm90/mla_decode_kernel.cuh"
#include "attention/sm90/mla_decode_wgmma.cuh"

namespace nmoe::attention {
namespace {

// The split partition below (tiles of kTileN tokens, head blocks of 64 for heads > 32) is shared by
// the wgmma kernel, and so are the partial outputs and the combine kernel.
static_assert(sm90_wgmma::kTileN == sm90::kTileN && sm90_wgmma::kHeads == 64, "wgmma and mma.sync partitions");

// Heads per CTA: 16, 32 or 64 (mma m-tiles of 16); more heads run as several head blocks.
int m_tiles_for(int heads) { return heads <= 16 ? 1 : heads <= 32 ? 2 : 4; }

template <int MT>
const char* launch_split(const MlaDecodeParams& p, cudaStream_t stream) {
  constexpr int smem = sm90::SmemLayout<MT>::kBytes;
  auto kernel = sm90::mla_decode_split_kernel<MT>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return "mla_decode_paged: cannot raise the shared-memory limit of the split kernel";
  }
  const dim3 grid((p.heads + 16 * MT - 1) / (16 * MT), p.num_splits, p.batch);
  kernel<<<grid, sm90::kThreads, smem, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "mla_decode_paged: split kernel launch failed";
}

}  // namespace

int mla_decode_num_splits(int batch, int heads, int max_len, int sm_count) {
  const int mt = m_tiles_for(heads);
  const int units = batch * ((heads + 16 * mt - 1) / (16 * mt));
  const int tiles = (max_len + sm90::kTileN - 1) / sm90::kTileN;
  // At least two tiles per split; each CTA fills one multiprocessor (the split kernel needs
  // over 160 KB of shared memory), so a wave is sm_count CTAs.
  const int max_splits = std::max(1, std::min({128, tiles / 2, 4 * sm_count / std::max(units, 1)}));
  auto efficiency = [&](int s) {
    const long ctas = static_cast<long>(units) * s;
    const long waves = (ctas + sm_count - 1) / sm_count;
    return static_cast<double>(ctas) / static_cast<double>(waves * sm_count);
  };
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
  for (int s = 1; s <= max_splits; ++s) {
    if (efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

const char* mla_decode_paged_launch(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return nullptr;
  const char* err = nullptr;
  // The wgmma kernel's 64-head blocks and 64-token tiles are those of the 4-m-tile variant here,
  // so both see the same split partition (mla_decode_num_splits) and share the combine kernel.
  if (p.impl != kMlaImplMma) {
    err = mla_decode_wgmma_launch_split(p, stream);
  } else {
    switch (m_tiles_for(p.heads)) {
      case 1:
        err = launch_split<1>(p, stream);
        break;
      case 2:
        err = launch_split<2>(p, stream);
        break;
      default:
        err = launch_split<4>(p, stream);
        break;
    }
  }
  if (err != nullptr || p.num_splits == 1 || p.pair_splits) return err;
  const cudaError_t launched = launch_pdl(sm90::mla_decode_combine_kernel, dim3(p.heads, p.batch), 128, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_decode_paged: combine kernel launch failed";
}

}  // namespace nmoe::attention
