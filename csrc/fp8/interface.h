// The torch-facing FP8 ops: check every tensor, allocate outputs, fill params, launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace nmoe::fp8 {

// x bf16 [m, k] (or a [m, heads, head] view: k = heads * head) -> (e4m3 [m, k], fp32 [m, ceil(k/128)]);
// with rows int64 [r], output row i is x[rows[i]] ([r, k] and [r, kb]).
std::tuple<at::Tensor, at::Tensor> quant_fp8_act(const at::Tensor& x, const std::optional<at::Tensor>& rows);

// x bf16 [..., 2i] -> (e4m3 [..., i], fp32 [..., ceil(i/128)]) of silu(x[..., :i]) * x[..., i:].
std::tuple<at::Tensor, at::Tensor> silu_mul_quant_fp8(const at::Tensor& x);

// xq e4m3 [m, k], xs fp32 [m, kb], w e4m3 [n, k], ws fp32 [nb, kb] -> bf16 [m, n].
at::Tensor fp8_gemm(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& ws);

// xq [m, k], xs [m, kb], w [e, n, k], ws [e, nb, kb], offsets int32 [e + 1] -> bf16 [m, n];
// rows offsets[g]:offsets[g+1] use expert g, rows outside offsets[0]:offsets[e] are not written.
at::Tensor grouped_fp8_gemm_contiguous(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                                       const at::Tensor& ws, const at::Tensor& offsets);

// xq [e, max_m, k], xs [e, max_m, kb], w [e, n, k], ws [e, nb, kb], counts int32 [e] -> bf16 [e, max_m, n];
// rows >= counts[g] of group g are not written. No host synchronisation (CUDA-graph capturable).
at::Tensor grouped_fp8_gemm_masked(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                                   const at::Tensor& ws, const at::Tensor& counts);

// Benchmarks and tests: force the GEMM configuration (-1: automatic) and raster order (-1: default,
// 0: along M, 1: along N) of later calls; returns the number of configurations.
int64_t gemm_override(int64_t config, int64_t raster);
// Benchmarks: force the K-slice count of decode-sized dense calls of shape (n, k) (0 clears the
// entry, n = k = 0 all of them); returns the entries in force.
int64_t split_k_override(int64_t n, int64_t k, int64_t splits);
// The name of configuration `config` ("" if out of range).
std::string gemm_config(int64_t config);

}  // namespace nmoe::fp8
