// Tensor-level entry points of the attention ops (registered in attention/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nmoe::attention {

// q [B, H, 576] bf16, cache [P, page, 576] bf16, block_table [B, max_pages] int32, seq_lens [B] int32
// -> (out [B, H, 512] bf16, lse [B, H] fp32).
// variant: -1 = automatic (the mma.sync kernel, or the wgmma kernel when NMOE_MLA_WGMMA is "1"
// (deferred schedule), "2" (eager schedule) or "3" (deferred with consumer proxy fences) and
// H >= 64), 0 = mma.sync, 1 / 2 / 3 = that wgmma variant (H >= 64 only).
std::tuple<at::Tensor, at::Tensor> mla_decode_paged(const at::Tensor& q, const at::Tensor& cache,
                                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                    double softmax_scale, int64_t variant);

// q_lat bf16 [H, B, R] (the latent query), q_pe bf16 [B, H, D], cos / sin fp32 [B, D / 2] -> the
// absorbed decode query bf16 [B, H, R + D]: q_lat, then q_pe rotated in interleaved pairs.
at::Tensor mla_decode_q(const at::Tensor& q_lat, const at::Tensor& q_pe, const at::Tensor& cos, const at::Tensor& sin);

// q_nope bf16 [B, H, 128], w_uk bf16 [H, 128, R] (R % 128 == 0), q_pe bf16 [B, H, D], cos / sin fp32
// [B, D / 2] -> the absorbed decode query bf16 [B, H, R + D]: q_nope @ W_UK per head, then q_pe
// rotated (mla_decode_q's output from the latent query it would be given).
at::Tensor mla_absorb_q(const at::Tensor& q_nope, const at::Tensor& w_uk, const at::Tensor& q_pe, const at::Tensor& cos,
                        const at::Tensor& sin);

// o_lat bf16 [B, H, 512], w_uv bf16 [H, 128, 512] -> bf16 [B, H, 128] = o_lat @ W_UV^T per head, or
// with quantize its quant_fp8_act: (e4m3 [B, H * 128], fp32 [B, H]).
std::tuple<at::Tensor, at::Tensor> mla_absorb_out(const at::Tensor& o_lat, const at::Tensor& w_uv, bool quantize);

}  // namespace nmoe::attention
