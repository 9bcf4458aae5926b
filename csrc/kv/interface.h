// Tensor-level entry points of the paged KV-cache ops (registered in kv/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace nmoe::kv {

// cache [P, page, R + D] (in place), out_loc int64 [T], c_kv [T, R], k_pe [T, D].
void kv_append_paged(const at::Tensor& cache, const at::Tensor& out_loc, const at::Tensor& c_kv,
                     const at::Tensor& k_pe);

// cache [P, page, R + D] bf16 (in place), out_loc int64 [T], kv bf16 [T, R + D] (kv_a_proj's output),
// weight bf16 [R], cos / sin fp32 [T, D / 2]: RMSNorm of the latent and rotation of the rope key, written.
void kv_norm_rope_append(const at::Tensor& cache, const at::Tensor& out_loc, const at::Tensor& kv,
                         const at::Tensor& weight, double eps, const at::Tensor& cos, const at::Tensor& sin);

// cache [P, page, R + D] (in place); whole pages src[i] -> dst[i] (int64 [n]); dst must not hold any src page.
void kv_copy_pages(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst);

}  // namespace nmoe::kv
