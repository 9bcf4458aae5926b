// Interface layer of the KV-cache ops: checks every tensor (messages name the op and the tensor),
// fills the params structs, launches on the current stream.
#include "kv/interface.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "kv/params.h"

namespace nmoe::kv {
namespace {

void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& cache) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == cache.device(), op, ": ", name, " is on ", t.device(), ", cache on ", cache.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, op, ": ", name,
              " must have unit stride in its last dim, got strides ", t.strides());
}

Dtype dtype_code(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return Dtype::kBf16;
    case at::kHalf:
      return Dtype::kF16;
    case at::kFloat:
      return Dtype::kF32;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
  }
}

// Numbers through std::to_string, as in fp8/interface.cpp (no iostream number formatting).
std::string fmt(int64_t v) { return std::to_string(v); }
std::string fmt(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_cache(const char* op, const at::Tensor& cache) {
  TORCH_CHECK(cache.is_cuda(), op, ": cache must be a CUDA tensor, got device ", cache.device());
  TORCH_CHECK(cache.dim() == 3, op, ": cache must be [pages, page_size, row], got shape ", cache.sizes());
  TORCH_CHECK(cache.stride(2) == 1, op, ": cache must have unit stride in its last dim, got strides ", cache.strides());
}

// The cache's paging, in the fields every cache-writing params struct shares.
template <class Params>
void set_cache_layout(Params& p, const at::Tensor& cache) {
  p.cache = cache.data_ptr();
  p.page_size = static_cast<int>(cache.size(1));
  p.pages = cache.size(0);
  p.page_stride = cache.stride(0);
  p.token_stride = cache.stride(1);
}

void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& cache) {
  check_tensor(op, name, t, 1, cache);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

}  // namespace

void kv_append_paged(const at::Tensor& cache, const at::Tensor& out_loc, const at::Tensor& c_kv,
                     const at::Tensor& k_pe) {
  constexpr const char* op = "kv_append_paged";
  check_cache(op, cache);
  check_index(op, "out_loc", out_loc, cache);
  check_tensor(op, "c_kv", c_kv, 2, cache);
  check_tensor(op, "k_pe", k_pe, 2, cache);
  const int64_t tokens = out_loc.size(0), rank = c_kv.size(1), rope = k_pe.size(1);
  TORCH_CHECK(c_kv.size(0) == tokens && k_pe.size(0) == tokens, op, ": c_kv ", c_kv.sizes(), " and k_pe ", k_pe.sizes(),
              " must have ", tokens, " rows (out_loc's length)");
  TORCH_CHECK(rank + rope == cache.size(2), op, ": c_kv width ", rank, " + k_pe width ", rope,
              " must equal the cache row ", cache.size(2));
  KvAppendParams p{};
  p.cache_dtype = dtype_code(op, "cache", cache);
  p.c_kv_dtype = dtype_code(op, "c_kv", c_kv);
  p.k_pe_dtype = dtype_code(op, "k_pe", k_pe);
  if (tokens == 0) return;
  c10::cuda::CUDAGuard guard(cache.device());
  p.c_kv = c_kv.data_ptr();
  p.k_pe = k_pe.data_ptr();
  p.out_loc = out_loc.data_ptr<int64_t>();
  p.tokens = tokens;
  p.rank = static_cast<int>(rank);
  p.rope = static_cast<int>(rope);
  set_cache_layout(p, cache);
  p.c_kv_stride = c_kv.stride(0);
  p.k_pe_stride = k_pe.stride(0);
  const bool same16 = p.cache_dtype != Dtype::kF32 && p.c_kv_dtype == p.cache_dtype && p.k_pe_dtype == p.cache_dtype;
  p.vec16 = same16 && rank % 8 == 0 && rope % 8 == 0 && p.page_stride % 8 == 0 && p.token_stride % 8 == 0 &&
            p.c_kv_stride % 8 == 0 && p.k_pe_stride % 8 == 0 && aligned16(cache) && aligned16(c_kv) && aligned16(k_pe);
  const char* err = kv_append_paged_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
}

void kv_norm_rope_append(const at::Tensor& cache, const at::Tensor& out_loc, const at::Tensor& kv,
                         const at::Tensor& weight, double eps, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "kv_norm_rope_append";
  check_cache(op, cache);
  check_index(op, "out_loc", out_loc, cache);
  check_tensor(op, "kv", kv, 2, cache);
  check_tensor(op, "weight", weight, 1, cache);
  check_tensor(op, "cos", cos, 2, cache);
  check_tensor(op, "sin", sin, 2, cache);
  TORCH_CHECK(cache.scalar_type() == at::kBFloat16 && kv.scalar_type() == at::kBFloat16 &&
                  weight.scalar_type() == at::kBFloat16,
              op, ": cache, kv and weight must be bfloat16, got ", c10::toString(cache.scalar_type()), ", ",
              c10::toString(kv.scalar_type()), ", ", c10::toString(weight.scalar_type()));
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, op,
              ": cos and sin must be float32, got ", c10::toString(cos.scalar_type()), ", ",
              c10::toString(sin.scalar_type()));
  const int64_t tokens = out_loc.size(0), rank = weight.size(0), row = cache.size(2), rope = row - rank;
  TORCH_CHECK(kv.size(0) == tokens && kv.size(1) == row, op, ": kv must be [", fmt(tokens), ", ", fmt(row), "], got ",
              fmt(kv.sizes()));
  TORCH_CHECK(rank % 8 == 0 && rank <= kMaxNormRank, op, ": the latent width ", fmt(rank),
              " must be a multiple of 8 and at most ", fmt(kMaxNormRank));
  TORCH_CHECK(rope > 0 && rope % 2 == 0 && rope <= 128, op, ": the rope width ", fmt(rope),
              " must be even and in [2, 128]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == tokens && cos.size(1) == rope / 2 && cos.is_contiguous() &&
                  sin.is_contiguous(),
              op, ": cos and sin must be contiguous [", fmt(tokens), ", ", fmt(rope / 2), "], got ",
              fmt(cos.sizes()), " and ", fmt(sin.sizes()));
  TORCH_CHECK(weight.is_contiguous() && aligned16(weight), op, ": weight must be contiguous and 16-byte aligned");
  TORCH_CHECK(aligned16(kv) && (tokens <= 1 || kv.stride(0) % 8 == 0) && aligned16(cache) &&
                  cache.stride(0) % 8 == 0 && cache.stride(1) % 8 == 0,
              op, ": kv and cache rows must start on 16-byte boundaries (kv strides ", fmt(kv.strides()),
              ", cache strides ", fmt(cache.strides()), ")");
  if (tokens == 0) return;
  c10::cuda::CUDAGuard guard(cache.device());
  KvNormRopeParams p{};
  p.kv = kv.data_ptr();
  p.weight = weight.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.out_loc = out_loc.data_ptr<int64_t>();
  p.tokens = tokens;
  p.kv_stride = kv.stride(0);
  p.rank = static_cast<int>(rank);
  p.rope = static_cast<int>(rope);
  set_cache_layout(p, cache);
  p.eps = static_cast<float>(eps);
  const char* err = kv_norm_rope_append_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
}

void kv_copy_pages(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst) {
  constexpr const char* op = "kv_copy_pages";
  check_cache(op, cache);
  check_index(op, "src", src, cache);
  check_index(op, "dst", dst, cache);
  TORCH_CHECK(src.size(0) == dst.size(0), op, ": src ", src.sizes(), " and dst ", dst.sizes(),
              " must have the same length");
  TORCH_CHECK(cache.size(2) == 0 || cache.size(1) <= 1 || cache.stride(1) == cache.size(2), op,
              ": each cache page must be contiguous, got shape ", cache.sizes(), " strides ", cache.strides());
  if (src.size(0) == 0) return;
  c10::cuda::CUDAGuard guard(cache.device());
  KvCopyPagesParams p{};
  p.cache = cache.data_ptr();
  p.src = src.data_ptr<int64_t>();
  p.dst = dst.data_ptr<int64_t>();
  p.n = src.size(0);
  p.pages = cache.size(0);
  p.page_bytes = cache.size(1) * cache.size(2) * static_cast<int64_t>(cache.element_size());
  p.page_stride_bytes = cache.stride(0) * static_cast<int64_t>(cache.element_size());
  p.vec16 = p.page_bytes % 16 == 0 && p.page_stride_bytes % 16 == 0 && aligned16(cache);
  const char* err = kv_copy_pages_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
}

}  // namespace nmoe::kv
