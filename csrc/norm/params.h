// Plain parameters and launcher of the fused RMSNorm (kernels never see at::Tensor).
//   x bf16 [rows, h] (row stride x_stride), residual bf16 [rows, h] (row stride res_stride) or null,
//   weight bf16 [h] -> out bf16 [rows, h] and, with a residual, sum bf16 [rows, h] (both contiguous):
//   sum = bf16(x + residual); out = bf16(sum * rsqrt(mean(sum^2) + eps) * weight), in fp32;
//   with q set also q e4m3 [rows, h] and s fp32 [rows, h / 128] = quant_fp8_act(out) (contiguous).
// Limits (checked by the interface): h % 8 == 0 (h % 128 == 0 with q), h <= kMaxHidden, 16-byte
// aligned rows.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nmoe::norm {

constexpr int kMaxHidden = 16384;

struct RmsNormParams {
  const void* x;
  const void* residual;
  const void* weight;
  void* out;
  void* sum;
  void* q;   // null: no quantized output
  float* s;
  int64_t rows;
  int64_t x_stride;
  int64_t res_stride;
  int h;
  float eps;
};

const char* rms_norm_launch(const RmsNormParams& p, cudaStream_t stream);

}  // namespace nmoe::norm
