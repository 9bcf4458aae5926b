// Tensor-level entry points of the MoE row-bookkeeping ops (registered in moe/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace nmoe::moe {

// ids int64 [tokens, k] local experts -> (src_rows [tokens * k], pos [tokens * k], offsets int32 [experts + 1]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& ids, int64_t experts,
                                                          const std::optional<at::Tensor>& expert_map);

// ys bf16 [rows, h], pos int64 [tokens, k], weights fp32 [tokens, k], add bf16 [tokens, h]? -> bf16 [tokens, h].
at::Tensor moe_combine(const at::Tensor& ys, const at::Tensor& pos, const at::Tensor& weights,
                       const std::optional<at::Tensor>& add);

}  // namespace nmoe::moe
