// Plain parameter structs and launcher declarations of the FP8 kernels.
//
// The interface layer (interface.cpp) checks every at::Tensor and fills these; kernels never see
// at::Tensor. Scale convention everywhere: real = fp8 * scale, scales fp32.
//   activations: e4m3 [rows, k], scales [rows, ceil(k / 128)]   (per token per 128 channels)
//   weights:     e4m3 [groups, n, k], scale_inv [groups, ceil(n / 128), ceil(k / 128)]
// Launchers return nullptr on success, else a static message naming what failed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace nmoe::fp8 {

constexpr int kBlock = 128;

// x bf16 -> q [m, k], s [m, ceil(k/128)]. Row r of the output reads source row rows[r] (rows null:
// row r; a source row outside [0, x_rows) reads as zeros). Channel c of a source row lies at
// (c / head) * x_head_stride + c % head (a [rows, heads, head] view, head % 128 == 0; a plain
// [rows, k] matrix is one head of k), rows x_row_stride elements apart, unit channel stride.
struct ActQuantParams {
  const void* x;
  void* q;
  float* s;
  const int64_t* rows;
  int64_t m;
  int64_t k;
  int64_t x_rows;
  int64_t x_row_stride;
  int64_t x_head_stride;
  int64_t head;
};

// x bf16 [m, 2i]: gate = x[:, :i], up = x[:, i:]; silu(gate) * up -> q [m, i], s [m, ceil(i/128)].
struct SiluMulQuantParams {
  const void* x;
  void* q;
  float* s;
  int64_t m;
  int64_t i;
  int64_t x_row_stride;
};

// How the rows of A (and D) are assigned to the weight groups.
enum class GroupLayout : int {
  kDense = 0,       // one group, rows 0..m
  kContiguous = 1,  // rows offsets[g]..offsets[g+1] (clamped to 0..m) use group g
  kMasked = 2,      // rows g*m .. g*m + min(counts[g], m) use group g; m is max_m
};

struct GroupedGemmParams {
  GroupLayout layout;
  const void* a;           // e4m3, rows of k, row stride k
  const float* sa;         // fp32, rows of ceil(k/128)
  const void* b;           // e4m3 [num_groups, n, k]
  const float* sb;         // fp32 [num_groups, ceil(n/128), ceil(k/128)]
  void* d;                 // bf16, rows of n, row stride n
  const int32_t* offsets;  // kContiguous: [num_groups + 1], device
  const int32_t* counts;   // kMasked: [num_groups], device
  int num_groups;
  int m;  // kDense, kContiguous: rows of A; kMasked: max_m (rows per group)
  int n;
  int k;
  int sm_count;        // CTAs of the persistent grid
  int config;          // GemmConfig, from select_gemm_config_sm90
  bool raster_along_n; // tile order of the persistent scheduler (false: consecutive tiles go along M)
  void* workspace;     // device, grouped_gemm_workspace_bytes_sm90(p) bytes
};

// The split dense GEMM's reduction: out bf16 [m, n] = the sum of the g partials [g, m, n] bf16,
// in fp32, in slice order.
struct SplitKReduceParams {
  const void* partials;
  void* out;
  int64_t elems;  // m * n
  int splits;
};
const char* splitk_reduce(const SplitKReduceParams& p, cudaStream_t stream);

// A dense GEMM of at most 64 rows (decode), the sm90 kernel of dense_gemm.cuh: the partial
// products of `splits` equal K slices, bf16 [splits, m, n] at d, slice l = (x * xs)[:, K_l] x
// ((w * ws)[:, K_l])^T (with splits = 1 the output [m, n] itself).
struct DenseGemmParams {
  const void* x;    // e4m3 [m, k]
  const float* xs;  // fp32 [m, ceil(k/128)]
  const void* w;    // e4m3 [n, k]
  const float* ws;  // fp32 [ceil(n/128), ceil(k/128)]
  void* d;          // bf16 [splits, m, n]
  int m;
  int n;
  int k;
  int splits;       // divides k / 128 (k % 128 == 0 when splits > 1)
  int sm_count;
  int config;       // index into NMOE_FP8_DENSE_CONFIGS, from select_dense_config_sm90
  void* workspace;  // device, dense_gemm_workspace_bytes_sm90(p) bytes
};

// The sm90 kernel configurations, one CUTLASS instantiation each (csrc/fp8/sm90/gemm_<name>.cu).
// Names: n = CUTLASS's A operand is the activations, s = swapped (A is the weights, the tokens are
// the MMA's N); then tile M x N (K is always 128, the scale block); all cooperative; c12 = a 1x2
// thread-block cluster with TMA multicast. gemm_dispatch.cpp says which serves which call.
#define NMOE_FP8_GEMM_CONFIGS(X) \
  X(n128x128)                    \
  X(n128x128c12)                 \
  X(s256x64)                     \
  X(s256x32)                     \
  X(s256x16)

#define NMOE_FP8_DECLARE_GEMM_CONFIG(name)                          \
  size_t gemm_workspace_##name(int num_groups, int sm_count);      \
  const char* gemm_run_##name(const GroupedGemmParams& p, cudaStream_t stream);
NMOE_FP8_GEMM_CONFIGS(NMOE_FP8_DECLARE_GEMM_CONFIG)
#undef NMOE_FP8_DECLARE_GEMM_CONFIG

enum GemmConfig : int {
#define NMOE_FP8_GEMM_ENUM(name) kGemm_##name,
  NMOE_FP8_GEMM_CONFIGS(NMOE_FP8_GEMM_ENUM)
#undef NMOE_FP8_GEMM_ENUM
      kNumGemmConfigs
};

// Picks the configuration (and raster order) for p's layout and the row counts the host knows
// (m, num_groups, max_m); honours set_gemm_override. Fills p.config and p.raster_along_n.
void select_gemm_config_sm90(GroupedGemmParams& p);
size_t grouped_gemm_workspace_bytes_sm90(const GroupedGemmParams& p);
const char* grouped_gemm_sm90(const GroupedGemmParams& p, cudaStream_t stream);
// Benchmarks and tests: force a configuration (-1: automatic) and raster order (-1: the config's
// own, 0: along M, 1: along N) for every later call in this process. Returns the configuration count.
int set_gemm_override(int config, int raster);
// Whether set_gemm_override forces a configuration now (fp8_gemm then takes the grouped kernel at
// every row count, so that the forced configuration is what runs).
bool gemm_config_forced();
// Benchmarks and tests: force the K slices of dense calls of at most 64 rows with this (n, k) (splits
// must divide k / 128; 0 removes the entry; n = k = 0 removes all). Returns the entries in force.
int set_split_k_override(int n, int k, int splits);
const char* gemm_config_name(int config);

// The dense decode configurations (csrc/fp8/sm90/dense_gemm_<name>.cu): swapped, 256 weight rows x a
// token tile of 32 or 64. Used by fp8_gemm for m <= kDenseMaxRows.
constexpr int kDenseMaxRows = 64;
#define NMOE_FP8_DENSE_CONFIGS(X) \
  X(s256x32)                      \
  X(s256x64)

#define NMOE_FP8_DECLARE_DENSE_CONFIG(name)                  \
  size_t dense_workspace_##name(const DenseGemmParams& p); \
  const char* dense_run_##name(const DenseGemmParams& p, cudaStream_t stream);
NMOE_FP8_DENSE_CONFIGS(NMOE_FP8_DECLARE_DENSE_CONFIG)
#undef NMOE_FP8_DECLARE_DENSE_CONFIG

// Fills p.config and p.splits: the K slices that spread the call's few output tiles over the SMs
// (the rule in gemm_dispatch.cpp, or the entry set_split_k_override forced for this (n, k)).
void select_dense_config_sm90(DenseGemmParams& p);
size_t dense_gemm_workspace_bytes_sm90(const DenseGemmParams& p);
const char* dense_gemm_sm90(const DenseGemmParams& p, cudaStream_t stream);

const char* act_quant(const ActQuantParams& p, cudaStream_t stream);
const char* silu_mul_quant(const SiluMulQuantParams& p, cudaStream_t stream);

}  // namespace nmoe::fp8
