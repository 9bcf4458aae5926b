// Chooses the sm90 grouped-GEMM configuration per call and forwards to its translation unit.
//
// The choice uses only what the host knows without a synchronisation: the layout, m, n, k and the
// group count (for the masked layout m is max_m, an upper bound of every group's rows).
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "fp8/params.h"

namespace nmoe::fp8 {
namespace {

struct ConfigEntry {
  const char* name;
  size_t (*workspace)(int num_groups, int sm_count);
  const char* (*run)(const GroupedGemmParams& p, cudaStream_t stream);
};

constexpr ConfigEntry kConfigs[] = {
#define NMOE_FP8_GEMM_ENTRY(name) {#name, &gemm_workspace_##name, &gemm_run_##name},
    NMOE_FP8_GEMM_CONFIGS(NMOE_FP8_GEMM_ENTRY)
#undef NMOE_FP8_GEMM_ENTRY
};
static_assert(sizeof(kConfigs) / sizeof(kConfigs[0]) == kNumGemmConfigs);

std::atomic<int> g_override_config{-1};
std::atomic<int> g_override_raster{-1};

// Forced K-slice counts of dense decode-sized calls, by (n, k): the benchmark's sweep and its
// in-process engine runs. Empty (the usual case) costs one relaxed load per call.
struct SplitOverride {
  int n, k, splits;
};
std::mutex g_split_mutex;
std::vector<SplitOverride> g_split_overrides;
std::atomic<bool> g_split_any{false};

int forced_splits(int n, int k) {
  if (!g_split_any.load(std::memory_order_relaxed)) return 0;
  const std::lock_guard<std::mutex> lock(g_split_mutex);
  for (const SplitOverride& o : g_split_overrides) {
    if (o.n == n && o.k == k) return o.splits;
  }
  return 0;
}

// Rows per group that a call multiplies, as far as the host knows: max_m for the masked layout
// (an upper bound), the mean for the contiguous one.
int rows_per_group(const GroupedGemmParams& p) {
  if (p.layout == GroupLayout::kContiguous) return (p.m + p.num_groups - 1) / p.num_groups;
  return p.m;
}

int auto_config(const GroupedGemmParams& p) {
  const int rows = rows_per_group(p);
  // Few rows per group (decode): the weights are streamed once and the MMA is mostly idle, so the
  // swapped kernels (weight rows on the MMA's M, a token tile of 16..64) lose nothing to row
  // padding and keep a 256-row weight tile in flight per CTA: 84-98% of the copy bandwidth in a
  // CUDA graph on the masked decode shapes, where the 128x128 kernel reached 64-76%.
  if (rows <= 16) return kGemm_s256x16;
  if (rows <= 32) return kGemm_s256x32;
  if (rows <= 64) return kGemm_s256x64;
  // Many rows: 128x128 tiles. For the expert groups the 1x2 cluster (the activation tile
  // multicast to both CTAs, a quarter less L2-to-SM traffic) measured 617 / 361 us on the two
  // prefill shapes against 656 / 364 us without; the dense shapes 1-3% slower with it (H200, the
  // two in separate runs: docs/kernels.md).
  return p.layout == GroupLayout::kDense ? kGemm_n128x128 : kGemm_n128x128c12;
}

struct DenseEntry {
  size_t (*workspace)(const DenseGemmParams& p);
  const char* (*run)(const DenseGemmParams& p, cudaStream_t stream);
};

constexpr DenseEntry kDenseConfigs[] = {
#define NMOE_FP8_DENSE_ENTRY(name) {&dense_workspace_##name, &dense_run_##name},
    NMOE_FP8_DENSE_CONFIGS(NMOE_FP8_DENSE_ENTRY)
#undef NMOE_FP8_DENSE_ENTRY
};
constexpr int kNumDenseConfigs = sizeof(kDenseConfigs) / sizeof(kDenseConfigs[0]);

// The K slices of a dense call: 1 unless its 256-row N tiles fill under half the SMs; then the most
// slices that still fit one wave, each at least 4 scale blocks (512) deep: m=32 o_proj (n 7168,
// k 16384) 28 tiles -> 4 slices; q_a + kv_a (2112, 7168) 9 -> 14.
int dense_splits(const DenseGemmParams& p) {
  if (p.k % kBlock) return 1;
  const int tiles = (p.n + 255) / 256, kb = p.k / kBlock;
  const int forced = forced_splits(p.n, p.k);
  if (forced > 0 && kb % forced == 0) return forced;
  if (2 * tiles > p.sm_count) return 1;
  int best = 1;
  for (int s = 2; s <= kb / 4; ++s) {
    if (kb % s == 0 && tiles * s <= p.sm_count) best = s;
  }
  return best;
}

}  // namespace

void select_dense_config_sm90(DenseGemmParams& p) {
  // The token tile: 32 wide up to 32 rows, else 64 (a tile wider than the rows only costs MMA
  // issue slots, which a call streaming its weights once leaves idle).
  p.config = p.m <= 32 ? 0 : 1;
  p.splits = dense_splits(p);
}

size_t dense_gemm_workspace_bytes_sm90(const DenseGemmParams& p) { return kDenseConfigs[p.config].workspace(p); }

const char* dense_gemm_sm90(const DenseGemmParams& p, cudaStream_t stream) {
  if (p.config < 0 || p.config >= kNumDenseConfigs) return "dense_gemm_sm90: bad configuration index";
  if (p.m < 1 || p.m > kDenseMaxRows) return "dense_gemm_sm90: m must be in 1..64";
  if (p.splits < 1 || (p.splits > 1 && (p.k % kBlock || (p.k / kBlock) % p.splits))) {
    return "dense_gemm_sm90: splits must divide k / 128";
  }
  return kDenseConfigs[p.config].run(p, stream);
}

void select_gemm_config_sm90(GroupedGemmParams& p) {
  const int forced = g_override_config.load(std::memory_order_relaxed);
  p.config = forced >= 0 && forced < kNumGemmConfigs ? forced : auto_config(p);
  const int raster = g_override_raster.load(std::memory_order_relaxed);
  p.raster_along_n = raster == 1;
}

size_t grouped_gemm_workspace_bytes_sm90(const GroupedGemmParams& p) {
  return kConfigs[p.config].workspace(p.num_groups, p.sm_count);
}

const char* grouped_gemm_sm90(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.config < 0 || p.config >= kNumGemmConfigs) return "grouped_gemm_sm90: bad configuration index";
  return kConfigs[p.config].run(p, stream);
}

int set_split_k_override(int n, int k, int splits) {
  const std::lock_guard<std::mutex> lock(g_split_mutex);
  if (n <= 0 && k <= 0) {
    g_split_overrides.clear();
  } else {
    const auto same = [&](const SplitOverride& o) { return o.n == n && o.k == k; };
    g_split_overrides.erase(std::remove_if(g_split_overrides.begin(), g_split_overrides.end(), same),
                            g_split_overrides.end());
    if (splits > 0) g_split_overrides.push_back({n, k, splits});
  }
  g_split_any.store(!g_split_overrides.empty(), std::memory_order_relaxed);
  return static_cast<int>(g_split_overrides.size());
}

int set_gemm_override(int config, int raster) {
  g_override_config.store(config, std::memory_order_relaxed);
  g_override_raster.store(raster, std::memory_order_relaxed);
  return kNumGemmConfigs;
}

bool gemm_config_forced() { return g_override_config.load(std::memory_order_relaxed) >= 0; }

const char* gemm_config_name(int config) {
  return config >= 0 && config < kNumGemmConfigs ? kConfigs[config].name : "";
}

}  // namespace nmoe::fp8
