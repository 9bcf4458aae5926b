// Plain parameters and launcher of the sampler (kernels never see at::Tensor).
//   logits fp32 [rows, vocab] (row stride in elements, unit last); per-row temperature fp32,
//   top_k int32 (<= 0 or >= vocab: off), top_p fp32 (>= 1: off), min_p fp32 (<= 0: off), seed int64,
//   position int64; outputs tokens int64 [rows], logprobs_raw / logprobs_processed fp32 [rows],
//   top_ids int64 / top_logprobs fp32 [rows, num_top] (contiguous).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::sampling {

constexpr int kMaxTopLogprobs = 1024;

struct SampleParams {
  const float* logits;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seed;
  const int64_t* position;
  int64_t* tokens;
  float* logprobs_raw;
  float* logprobs_processed;
  int64_t* top_ids;
  float* top_logprobs;
  int num_top;
  bool top_from_processed;
  bool vec4;  // rows start on 16-byte boundaries (float4 loads)
  // null: every row; else the rows to sample are row_list[1 .. row_list[0]] (in any order: a row's
  // result does not depend on which block samples it)
  const int* row_list;
};

// Scratch of the split sampler (sample_split.cu), allocated by the caller per call: `data` of
// sample_workspace_bytes(p) bytes (no initial contents needed) and `fallback`, rows + 1 int32 zeros:
// the list (SampleParams::row_list) of the rows handed to the fallback.
struct SampleWorkspace {
  void* data;
  int* fallback;
};

// Bytes of SampleWorkspace::data the call needs; 0: the split sampler is not used for this call
// (NMOE_SAMPLE_KERNEL picks another, or the shape does not suit it) and no workspace is needed.
int64_t sample_workspace_bytes(const SampleParams& p);
// The split sampler (its unresolved rows to the cluster sampler) where it is picked and the shape
// suits it; else the cluster sampler where its shape fits (sample_cluster.cu); else the one-CTA-per-
// row sampler.
const char* sample_launch(const SampleParams& p, const SampleWorkspace& ws, cudaStream_t stream);
// The split sampler (sample_split.cu): rows it does not resolve are listed in ws.fallback.
bool sample_split_suits(const SampleParams& p);  // the shape: 16-byte rows, vocab <= 131072
int64_t sample_split_workspace_bytes(const SampleParams& p);
const char* sample_split_launch(const SampleParams& p, const SampleWorkspace& ws, cudaStream_t stream);
// The one-CTA-per-row sampler for every row (sample.cu).
const char* sample_rowwise_launch(const SampleParams& p, cudaStream_t stream);

}  // namespace nmoe::sampling
