// Plain parameters and launchers of the MoE row-bookkeeping ops (kernels never see at::Tensor):
// the sort of (token, k) slots by expert and the weighted combine back into tokens. Launchers
// return nullptr on success, else a static message.
//   align:    ids int64 [slots] (local expert of slot s = t * k + j, values in [0, experts); others
//             are clamped) -> src_rows int64 [slots] (token of each sorted row), pos int64 [slots]
//             (sorted row of each slot), offsets int32 [experts + 1]. With expert_map int64
//             [map_len] the ids are first mapped: local expert = expert_map[ids[s]] (an id outside
//             [0, map_len) takes entry 0), so a router's global ids need no separate gather.
//   combine:  ys bf16 [rows, h] (row stride ys_stride), pos int64 [tokens * k], weights fp32
//             [tokens, k], add bf16 [tokens, h] or null -> out bf16 [tokens, h]:
//             out[t] = bf16(sum_j weights[t, j] * ys[pos[t, j]] (+ add[t])), fp32, j in order
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::moe {

constexpr int kMaxLocalExperts = 1024;  // one block scan of 1024 threads covers the experts

struct AlignParams {
  const int64_t* ids;
  const int64_t* expert_map;  // null: ids are the local experts
  int64_t map_len;
  int64_t* src_rows;
  int64_t* pos;
  int32_t* offsets;
  int64_t slots;
  int k;
  int experts;
};

struct CombineParams {
  const void* ys;
  const int64_t* pos;
  const float* weights;
  const void* add;
  void* out;
  int64_t tokens;
  int64_t rows;  // rows of ys: a pos outside [0, rows) contributes nothing
  int64_t ys_stride;
  int64_t add_stride;
  int h;
  int k;
};

const char* moe_align_launch(const AlignParams& p, cudaStream_t stream);
const char* moe_combine_launch(const CombineParams& p, cudaStream_t stream);

}  // namespace nmoe::moe
