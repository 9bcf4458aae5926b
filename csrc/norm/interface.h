// Tensor-level entry points of the fused RMSNorm (registered in norm/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nmoe::norm {

// x bf16 [rows, h], weight bf16 [h] -> bf16 [rows, h].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// x, residual bf16 [rows, h], weight bf16 [h] -> (rms_norm(x + residual), x + residual).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

// The same, each with the output's FP8 quantization appended: (..., q e4m3 [rows, h], s fp32
// [rows, h / 128]) = quant_fp8_act(out), bit for bit; h % 128 == 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_quant(const at::Tensor& x, const at::Tensor& weight,
                                                              double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rms_norm_quant(const at::Tensor& x,
                                                                              const at::Tensor& residual,
                                                                              const at::Tensor& weight, double eps);

}  // namespace nmoe::norm
