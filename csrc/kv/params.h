// Plain parameter structs and launchers of the paged KV-cache ops (kernels never see at::Tensor).
//   cache   [pages, page_size, row] (row = R + D), element strides page_stride / token_stride, unit last
//   out_loc int64 [tokens]: slot = page * page_size + offset; slots outside [0, pages * page_size) are skipped
//   c_kv    [tokens, R], k_pe [tokens, D] (row strides in elements, unit last)
//   src/dst int64 [n]: whole pages src[i] -> dst[i]; ids outside [0, pages) are skipped
// Dtype codes: 0 = bf16, 1 = fp16, 2 = fp32. Launchers return nullptr on success, else a message.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::kv {

enum class Dtype : int { kBf16 = 0, kF16 = 1, kF32 = 2 };

struct KvAppendParams {
  void* cache;
  const void* c_kv;
  const void* k_pe;
  const int64_t* out_loc;
  Dtype cache_dtype, c_kv_dtype, k_pe_dtype;
  int64_t tokens;
  int rank;  // R
  int rope;  // D
  int page_size;
  int64_t pages;
  int64_t page_stride;
  int64_t token_stride;
  int64_t c_kv_stride;
  int64_t k_pe_stride;
  bool vec16;  // all three bf16/fp16 of one dtype, 16-byte aligned rows, R % 8 == 0 and D % 8 == 0
};

struct KvCopyPagesParams {
  void* cache;
  const int64_t* src;
  const int64_t* dst;
  int64_t n;
  int64_t pages;
  int64_t page_bytes;  // one page's contiguous bytes
  int64_t page_stride_bytes;
  bool vec16;  // page bytes, page stride and base are multiples of 16
};

// kv_norm_rope_append: the decode/prefill latent path of MLA in one pass. kv bf16 [tokens, R + D]
// (row stride kv_stride) is kv_a_proj's output; RMSNorm(kv[:, :R]) * weight and the interleaved-pair
// rotation of kv[:, R:] by cos / sin fp32 [tokens, D / 2] (contiguous) go to the bf16 cache slot.
// Limits (checked by the interface): R % 8 == 0, R <= kMaxNormRank, D even, D <= 128.
constexpr int kMaxNormRank = 1024;

struct KvNormRopeParams {
  void* cache;
  const void* kv;
  const void* weight;  // bf16 [R]
  const float* cos;
  const float* sin;
  const int64_t* out_loc;
  int64_t tokens;
  int64_t kv_stride;
  int rank;
  int rope;
  int page_size;
  int64_t pages;
  int64_t page_stride;
  int64_t token_stride;
  float eps;
};

const char* kv_norm_rope_append_launch(const KvNormRopeParams& p, cudaStream_t stream);
const char* kv_append_paged_launch(const KvAppendParams& p, cudaStream_t stream);
const char* kv_copy_pages_launch(const KvCopyPagesParams& p, cudaStream_t stream);

}  // namespace nmoe::kv
