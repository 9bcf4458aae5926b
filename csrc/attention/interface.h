// Tensor-level entry points of the attention ops (registered in attention/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nmoe::attention {

// q [B, H, 576] bf16, cache [P, page, 576] bf16, block_table [B, max_pages] int32, seq_lens [B] int32
// -> (out [B, H, 512] bf16, lse [B, H] fp32).
std::tuple<at::Tensor, at::Tensor> mla_decode_paged(const at::Tensor& q, const at::Tensor& cache,
                                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                    double softmax_scale);

}  // namespace nmoe::attention
