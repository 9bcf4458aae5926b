// Interface layer of the fused RMSNorm: checks every tensor (messages name the op and the tensor),
// fills RmsNormParams, launches on the current stream.
#include "norm/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "norm/params.h"

namespace nmoe::norm {
namespace {

std::string fmt(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " must be on x's CUDA device");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16, got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [rows, h], got shape ", fmt(t.sizes()));
  TORCH_CHECK((t.size(0) <= 1 || t.stride(0) % 8 == 0) && t.stride(1) == 1 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              op, ": ", name, " rows must be unit-stride and start on 16-byte boundaries, got strides ",
              fmt(t.strides()));
}

RmsNormParams fill(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(op, "x", x, x);
  const int64_t h = x.size(1);
  TORCH_CHECK(h % 8 == 0 && h <= kMaxHidden, op, ": the hidden size ", std::to_string(h),
              " must be a multiple of 8 and at most ", std::to_string(kMaxHidden));
  TORCH_CHECK(weight.is_cuda() && weight.device() == x.device() && weight.scalar_type() == at::kBFloat16 &&
                  weight.dim() == 1 && weight.size(0) == h && weight.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              op, ": weight must be a contiguous bfloat16 [", std::to_string(h), "] tensor on x's device, got shape ",
              fmt(weight.sizes()));
  RmsNormParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.rows = x.size(0);
  p.x_stride = x.stride(0);
  p.h = static_cast<int>(h);
  p.eps = static_cast<float>(eps);
  return p;
}

// The _quant ops' e4m3 output and its scales (quant_fp8_act's layout), pointed to by p.
std::tuple<at::Tensor, at::Tensor> quantized_outputs(const char* op, const at::Tensor& x, RmsNormParams& p) {
  TORCH_CHECK(p.h % 128 == 0, op, ": the hidden size ", std::to_string(p.h),
              " must be a multiple of 128 (the quantization's channel groups)");
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto s = at::empty({x.size(0), p.h / 128}, x.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.s = s.data_ptr<float>();
  return {q, s};
}

// add_rms_norm's checks and outputs (out, sum), pointed to by p.
std::tuple<at::Tensor, at::Tensor> add_outputs(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                               RmsNormParams& p) {
  check_rows(op, "residual", residual, x);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual ", fmt(residual.sizes()), " and x ", fmt(x.sizes()),
              " must have the same shape");
  auto out = at::empty(x.sizes(), x.options());
  auto sum = at::empty(x.sizes(), x.options());
  p.residual = residual.data_ptr();
  p.res_stride = residual.stride(0);
  p.out = out.data_ptr();
  p.sum = sum.data_ptr();
  return {out, sum};
}

void launch(const RmsNormParams& p) {
  const char* err = rms_norm_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RmsNormParams p = fill("rms_norm", x, weight, eps);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  p.out = out.data_ptr();
  launch(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_quant(const at::Tensor& x, const at::Tensor& weight,
                                                              double eps) {
  constexpr const char* op = "rms_norm_quant";
  RmsNormParams p = fill(op, x, weight, eps);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  p.out = out.data_ptr();
  auto [q, s] = quantized_outputs(op, x, p);
  launch(p);
  return {out, q, s};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  RmsNormParams p = fill("add_rms_norm", x, weight, eps);
  c10::cuda::CUDAGuard guard(x.device());
  auto outputs = add_outputs("add_rms_norm", x, residual, p);
  launch(p);
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rms_norm_quant(const at::Tensor& x,
                                                                              const at::Tensor& residual,
                                                                              const at::Tensor& weight, double eps) {
  constexpr const char* op = "add_rms_norm_quant";
  RmsNormParams p = fill(op, x, weight, eps);
  c10::cuda::CUDAGuard guard(x.device());
  auto [out, sum] = add_outputs(op, x, residual, p);
  auto [q, s] = quantized_outputs(op, x, p);
  launch(p);
  return {out, sum, q, s};
}

}  // namespace nmoe::norm
