// The cluster sampler with CTAs of 512 threads (sample_cluster.cuh), and the dispatch of `sample`
// between the cluster sampler and the one-CTA-per-row sampler (sample.cu).
#include <cstdlib>
#include <cstring>

#include "sampling/generic/sample_cluster.cuh"
#include "sampling/params.h"

namespace nmoe::sampling {
namespace {

struct Config {
  int threads;
  int max_chunk;  // floats per CTA: bounded by two (512 threads) or three (256) CTAs per SM
  int max_ranks;
};
// For a DeepSeek-V3 row (129280 logits): 8 CTAs of 512 threads, or 16 of 256.
constexpr Config kConfigs[2] = {{512, 16384, 8}, {256, 8192, 16}};

int mode_from_env() {
  // NMOE_SAMPLE_KERNEL: "rowwise" (the one-CTA-per-row sampler for every call), "cluster8"
  // (the default) or "cluster16". For comparisons, and as an escape hatch.
  const char* s = std::getenv("NMOE_SAMPLE_KERNEL");
  if (s == nullptr || *s == 0) return 0;
  if (std::strcmp(s, "rowwise") == 0) return -1;
  if (std::strcmp(s, "cluster16") == 0) return 1;
  return 0;
}

}  // namespace

const char* sample_launch(const SampleParams& p, cudaStream_t stream) {
  if (p.rows == 0) return nullptr;
  const int mode = mode_from_env();  // per call (a getenv): benchmarks switch it in one process
  // The cluster path needs 16-byte aligned rows (async 16-byte copies) and a grid of rows * ranks.
  if (mode >= 0 && p.vec4 && p.rows <= 0x7fffffff / cluster::kMaxRanks) {
    const Config& c = kConfigs[mode];
    const int64_t ranks = (p.vocab + c.max_chunk - 1) / c.max_chunk;
    if (ranks >= 1 && ranks <= c.max_ranks) {
      const int chunk = static_cast<int>(((p.vocab + ranks - 1) / ranks + 3) / 4 * 4);
      bool unavailable = false;
      const char* err = c.threads == 512
                            ? cluster::launch<512>(p, static_cast<int>(ranks), chunk, stream, unavailable)
                            : cluster_launch_256(p, static_cast<int>(ranks), chunk, stream, unavailable);
      if (!unavailable) return err;
    }
  }
  return sample_rowwise_launch(p, stream);
}

}  // namespace nmoe::sampling
