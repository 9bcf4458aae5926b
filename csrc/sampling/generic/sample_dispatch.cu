// Which sampler runs a call: NMOE_SAMPLE_KERNEL (read at every call, so benchmarks switch it in one
// process) = "split" (sample_split.cu, its unresolved rows then by the cluster sampler; the default
// from kSplitMinRows rows), "cluster8" (the default below) / "cluster16" (sample_cluster.cuh, 8
// CTAs of 512 threads or 16 of 256 for a DeepSeek-V3 row) or "rowwise" (sample.cu, one CTA per
// row); each falls back to the next where a call's shape does not suit it.
#include <cstdlib>
#include <cstring>

#include "sampling/generic/sample_cluster.cuh"
#include "sampling/params.h"

namespace nmoe::sampling {
namespace {

enum class Mode { kSplit, kCluster8, kCluster16, kRowwise };

// Unset, the split sampler from kSplitMinRows rows up (where it measured faster on greedy, full-
// vocabulary, top-k and combined rows: B = 256 on the H200, docs/kernels.md), else cluster8.
constexpr int64_t kSplitMinRows = 128;

Mode mode_of(const SampleParams& p) {
  const char* s = std::getenv("NMOE_SAMPLE_KERNEL");
  if (s == nullptr || *s == 0) return p.rows >= kSplitMinRows ? Mode::kSplit : Mode::kCluster8;
  if (std::strcmp(s, "split") == 0) return Mode::kSplit;
  if (std::strcmp(s, "rowwise") == 0) return Mode::kRowwise;
  if (std::strcmp(s, "cluster16") == 0) return Mode::kCluster16;
  return Mode::kCluster8;
}

struct ClusterConfig {
  int threads;
  int max_chunk;  // floats per CTA: bounded by two (512 threads) or three (256) CTAs per SM
  int max_ranks;
};
constexpr ClusterConfig kClusterConfigs[2] = {{512, 16384, 8}, {256, 8192, 16}};

// The cluster sampler where its shape fits (the rows of row_list only, when given), else the
// one-CTA-per-row sampler.
const char* cluster_or_rowwise(const SampleParams& p, bool sixteen, cudaStream_t stream) {
  // The cluster path needs 16-byte aligned rows (async 16-byte copies) and a grid of rows * ranks.
  if (p.vec4 && p.rows <= 0x7fffffff / cluster::kMaxRanks) {
    const ClusterConfig& c = kClusterConfigs[sixteen ? 1 : 0];
    const int64_t ranks = (p.vocab + c.max_chunk - 1) / c.max_chunk;
    if (ranks >= 1 && ranks <= c.max_ranks) {
      const int chunk = static_cast<int>(((p.vocab + ranks - 1) / ranks + 3) / 4 * 4);
      bool unavailable = false;
      const char* err = sixteen ? cluster_launch_256(p, static_cast<int>(ranks), chunk, stream, unavailable)
                                : cluster_launch_512(p, static_cast<int>(ranks), chunk, stream, unavailable);
      if (!unavailable) return err;
    }
  }
  return sample_rowwise_launch(p, stream);
}

}  // namespace

int64_t sample_workspace_bytes(const SampleParams& p) {
  if (p.rows == 0 || mode_of(p) != Mode::kSplit || !sample_split_suits(p)) return 0;
  return sample_split_workspace_bytes(p);
}

const char* sample_launch(const SampleParams& p, const SampleWorkspace& ws, cudaStream_t stream) {
  if (p.rows == 0) return nullptr;
  const Mode mode = mode_of(p);
  if (mode == Mode::kRowwise) return sample_rowwise_launch(p, stream);
  if (mode == Mode::kSplit && ws.data != nullptr) {
    if (const char* err = sample_split_launch(p, ws, stream)) return err;
    SampleParams rest = p;  // the rows the split sampler left
    rest.row_list = ws.fallback;
    return cluster_or_rowwise(rest, false, stream);
  }
  return cluster_or_rowwise(p, mode == Mode::kCluster16, stream);
}

}  // namespace nmoe::sampling
