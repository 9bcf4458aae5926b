// Plain parameter structs and launcher declarations of the MLA decode kernels.
//
// The interface layer (interface.cpp) checks every at::Tensor and fills these; kernels never see
// at::Tensor. Layouts (element strides; the last dim always has unit stride):
//   q           bf16 [batch, heads, 576]      576 = kv_lora_rank 512 + rope 64
//   cache       bf16 [pages, page_size, 576]  values are the first 512 columns
//   block_table int32 [batch, max_pages]      only the first ceil(len / page_size) entries are read
//   seq_lens    int32 [batch]                 clamped to [0, max_pages * page_size]
//   out         bf16 [batch, heads, 512]      contiguous
//   lse         fp32 [batch, heads]           contiguous, natural log; -inf for length 0
//   part_out    fp32 [batch, splits, heads, 512], part_lse fp32 [batch, splits, heads] when splits > 1
//               (and the splits are not paired, see pair_splits)
// Launchers return nullptr on success, else a static message naming what failed.
//
// Two split kernels share the partition, the partial outputs and the combine kernel:
//   kMlaImplMma    mma.sync m16n8k16, any head count (sm90/mla_decode_kernel.cuh), the default below 64 heads;
//   kMlaImplWgmma  wgmma, 64 heads per CTA, heads >= 64 (sm90/mla_decode_wgmma.cuh), PV of the
//                  upper 256 columns deferred behind the next tile's QK; kMlaImplWgmmaEager issues
//                  it as soon as P is stored; kMlaImplWgmmaFenced is the deferred one with a
//                  fence.proxy.async after each wait for cp.async data (a diagnostic);
//                  kMlaImplWgmmaSeesaw alternates the tiles of a pair between the two warpgroups
//                  (sm90/mla_decode_seesaw.cuh). The default for heads >= 64: interface.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::attention {

constexpr int kLoraRank = 512;
constexpr int kRopeDim = 64;
constexpr int kHeadDim = kLoraRank + kRopeDim;

struct MlaDecodeParams {
  const void* q;
  const void* cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  void* out;
  float* lse;
  float* part_out;
  float* part_lse;
  int batch;
  int heads;
  int page_size;
  int max_pages;
  int num_splits;
  int64_t q_batch_stride;
  int64_t q_head_stride;
  int64_t page_stride;
  int64_t token_stride;
  int64_t block_table_stride;
  float scale_log2;  // softmax_scale * log2(e): scores are kept in base 2
  int impl;          // MlaDecodeImpl: which split kernel runs
  // 1: num_splits == 2 and the two splits of a (sequence, head block) run as one 2-CTA cluster;
  // split 1 hands its output to split 0 through distributed shared memory and split 0 writes the
  // combined out and lse (no partial outputs in global memory, no combine kernel). wgmma eager and
  // seesaw only.
  int pair_splits;
  // wgmma kernels: a row's running max stays while a tile's max exceeds it by at most this much
  // (base 2; 0 = the exact online max), and O is rescaled only when some row's max moves (see
  // "Online softmax" in sm90/mla_decode_wgmma.cuh). NMOE_MLA_LAZY: 1 (default) = 8, 0 = 0.
  float rescale_slack;
};

enum MlaDecodeImpl : int {
  kMlaImplMma = 0,
  kMlaImplWgmma = 1,
  kMlaImplWgmmaEager = 2,
  kMlaImplWgmmaFenced = 3,
  kMlaImplWgmmaSeesaw = 4,
};
constexpr int kMlaWgmmaMinHeads = 64;  // the wgmma kernel computes 64 heads per CTA

// How many KV splits per (sequence, head block) fill `sm_count` multiprocessors, given only the
// shapes (no host read of seq_lens, so the choice is CUDA-graph safe).
int mla_decode_num_splits(int batch, int heads, int max_len, int sm_count);

const char* mla_decode_paged_launch(const MlaDecodeParams& p, cudaStream_t stream);

// The wgmma split kernel alone (sm90/mla_decode_wgmma.cu); mla_decode_paged_launch calls it for
// p.impl != kMlaImplMma and runs the combine kernel after it.
const char* mla_decode_wgmma_launch_split(const MlaDecodeParams& p, cudaStream_t stream);
// The seesaw kernel (sm90/mla_decode_seesaw.cu), called by mla_decode_wgmma_launch_split.
const char* mla_decode_seesaw_launch_split(const MlaDecodeParams& p, cudaStream_t stream);

// mla_decode_q: q_lat bf16 [heads, batch, rank] and q_pe bf16 [batch, heads, rope] (element strides
// below, unit last) with cos / sin fp32 [batch, rope / 2] (contiguous) -> out bf16 [batch, heads,
// rank + rope] (contiguous): out[..., :rank] = q_lat, out[..., rank:] = q_pe rotated in pairs.
struct MlaDecodeQParams {
  const void* q_lat;
  const void* q_pe;
  const float* cos;
  const float* sin;
  void* out;
  int64_t batch;
  int64_t heads;
  int64_t lat_head_stride;
  int64_t lat_batch_stride;
  int64_t pe_batch_stride;
  int64_t pe_head_stride;
  int rank;
  int rope;
};

const char* mla_decode_q_launch(const MlaDecodeQParams& p, cudaStream_t stream);

// The absorbed projections around the decode attention (generic/mla_absorb.cu), DeepSeek-V3's
// widths: nope = v = 128 per head, latent R = 512 for the output side (a multiple of 128 for the
// query side). Element strides, unit last; outputs contiguous.
constexpr int kAbsorbNope = 128;
constexpr int kAbsorbV = 128;
constexpr int kAbsorbRank = 512;

// q_nope bf16 [batch, heads, 128], w (W_UK) bf16 [heads, 128, rank], q_pe bf16 [batch, heads, rope],
// cos / sin fp32 [batch, rope / 2] (contiguous) -> out bf16 [batch, heads, rank + rope]:
// out[b, h, :rank] = q_nope[b, h] @ w[h] (fp32 accumulate), out[b, h, rank:] = q_pe[b, h] rotated
// in pairs as mla_decode_q rotates it.
struct MlaAbsorbQParams {
  const void* q_nope;
  const void* w;
  const void* q_pe;
  const float* cos;
  const float* sin;
  void* out;
  int64_t batch;
  int64_t heads;
  int64_t q_batch_stride;
  int64_t q_head_stride;
  int64_t w_head_stride;
  int64_t w_row_stride;
  int64_t pe_batch_stride;
  int64_t pe_head_stride;
  int rank;
  int rope;
};

// o_lat bf16 [batch, heads, 512], w (W_UV) bf16 [heads, 128, 512] -> out bf16 [batch, heads, 128]
// = o_lat[b, h] @ w[h]^T (fp32 accumulate), or with q set q e4m3 [batch, heads * 128] and s fp32
// [batch, heads]: quant_fp8_act of that output (each head's 128 channels one scale group).
struct MlaAbsorbOutParams {
  const void* o_lat;
  const void* w;
  void* out;
  void* q;
  float* s;
  int64_t batch;
  int64_t heads;
  int64_t o_batch_stride;
  int64_t o_head_stride;
  int64_t w_head_stride;
  int64_t w_row_stride;
};

const char* mla_absorb_q_launch(const MlaAbsorbQParams& p, cudaStream_t stream);
const char* mla_absorb_out_launch(const MlaAbsorbOutParams& p, cudaStream_t stream);

}  // namespace nmoe::attention
