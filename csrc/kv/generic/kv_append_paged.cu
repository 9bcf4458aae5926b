// Writes new tokens' latents and rope keys into their cache slots; copies whole pages.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kv/params.h"
#include "pdl.cuh"

namespace nmoe::kv {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, Dtype d) {
  switch (d) {
    case Dtype::kBf16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case Dtype::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v, Dtype d) {
  switch (d) {
    case Dtype::kBf16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
      break;
    case Dtype::kF16:
      static_cast<__half*>(p)[i] = __float2half(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ bool slot_of(const KvAppendParams& p, int64_t t, int64_t& dst_row) {
  const int64_t slot = p.out_loc[t];
  if (slot < 0 || slot >= p.pages * p.page_size) return false;
  dst_row = (slot / p.page_size) * p.page_stride + (slot % p.page_size) * p.token_stride;
  return true;
}

// One thread per 16-byte vector of a row (same 16-bit dtype everywhere: a bitwise copy).
__global__ void kv_append_vec16_kernel(const KvAppendParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int vr = p.rank / 8, vrow = vr + p.rope / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.tokens * vrow) return;
  const int64_t t = i / vrow;
  const int v = static_cast<int>(i % vrow);
  int64_t dst_row;
  if (!slot_of(p, t, dst_row)) return;
  const auto* src = v < vr ? static_cast<const uint16_t*>(p.c_kv) + t * p.c_kv_stride + v * 8
                           : static_cast<const uint16_t*>(p.k_pe) + t * p.k_pe_stride + (v - vr) * 8;
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.cache) + dst_row + v * 8) = *reinterpret_cast<const uint4*>(src);
}

// One thread per element, converting through fp32 (the torch reference's `.to(cache.dtype)`).
__global__ void kv_append_scalar_kernel(const KvAppendParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int row = p.rank + p.rope;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.tokens * row) return;
  const int64_t t = i / row;
  const int c = static_cast<int>(i % row);
  int64_t dst_row;
  if (!slot_of(p, t, dst_row)) return;
  const float v = c < p.rank ? load_as_float(p.c_kv, t * p.c_kv_stride + c, p.c_kv_dtype)
                             : load_as_float(p.k_pe, t * p.k_pe_stride + (c - p.rank), p.k_pe_dtype);
  store_from_float(p.cache, dst_row + c, v, p.cache_dtype);
}

// grid (pages to copy, blocks per page); a grid-stride loop over the page's bytes.
template <typename V>
__global__ void kv_copy_pages_kernel(const KvCopyPagesParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int64_t s = p.src[blockIdx.x], d = p.dst[blockIdx.x];
  if (s < 0 || s >= p.pages || d < 0 || d >= p.pages) return;
  const auto* from = reinterpret_cast<const V*>(static_cast<const uint8_t*>(p.cache) + s * p.page_stride_bytes);
  auto* to = reinterpret_cast<V*>(static_cast<uint8_t*>(p.cache) + d * p.page_stride_bytes);
  const int64_t n = p.page_bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.y) * kThreads) {
    to[i] = from[i];
  }
}

}  // namespace

const char* kv_append_paged_launch(const KvAppendParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return nullptr;
  const int64_t work = p.tokens * (p.vec16 ? (p.rank + p.rope) / 8 : p.rank + p.rope);
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return "kv_append_paged: too many tokens for one launch";
  const cudaError_t launched =
      p.vec16 ? launch_pdl(kv_append_vec16_kernel, static_cast<unsigned>(blocks), kThreads, 0, stream, p)
              : launch_pdl(kv_append_scalar_kernel, static_cast<unsigned>(blocks), kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "kv_append_paged: kernel launch failed";
}

const char* kv_copy_pages_launch(const KvCopyPagesParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.page_bytes == 0) return nullptr;
  if (p.n > 0x7fffffff) return "kv_copy_pages: too many pages for one launch";
  const int64_t elems = p.vec16 ? p.page_bytes / 16 : p.page_bytes;
  const unsigned per_page = static_cast<unsigned>(std::min<int64_t>(16, (elems + kThreads * 4 - 1) / (kThreads * 4)));
  const dim3 grid(static_cast<unsigned>(p.n), std::max(1u, per_page));
  const cudaError_t launched = p.vec16 ? launch_pdl(kv_copy_pages_kernel<uint4>, grid, kThreads, 0, stream, p)
                                       : launch_pdl(kv_copy_pages_kernel<uint8_t>, grid, kThreads, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "kv_copy_pages: kernel launch failed";
}

}  // namespace nmoe::kv
