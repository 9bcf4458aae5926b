// Tensor-level entry point of the sampler (registered in sampling/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nmoe::sampling {

// logits fp32 [B, V]; temperature fp32, top_k int32, top_p fp32, min_p fp32, seed int64, position int64,
// all [B] -> (tokens int64 [B], logprobs_raw fp32 [B], logprobs_processed fp32 [B],
//             top_ids int64 [B, k], top_logprobs fp32 [B, k]) with k = num_top_logprobs (0: [B, 0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& position, int64_t num_top_logprobs,
    bool top_from_processed);

}  // namespace nmoe::sampling
