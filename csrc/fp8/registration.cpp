// Registers the FP8 ops under torch.ops.nmoe (schemas here, CUDA kernels from fp8/interface.cpp).
#include <torch/library.h>

#include "fp8/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def("quant_fp8_act(Tensor x, Tensor? rows=None) -> (Tensor, Tensor)");
  m.def("silu_mul_quant_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("fp8_gemm(Tensor xq, Tensor xs, Tensor w, Tensor ws) -> Tensor");
  m.def("grouped_fp8_gemm_contiguous(Tensor xq, Tensor xs, Tensor w, Tensor ws, Tensor offsets) -> Tensor");
  m.def("grouped_fp8_gemm_masked(Tensor xq, Tensor xs, Tensor w, Tensor ws, Tensor counts) -> Tensor");
  // Benchmark/test knobs (no tensors, so one kernel for every backend).
  m.def("_fp8_gemm_override(int config, int raster) -> int", &nmoe::fp8::gemm_override);
  m.def("_fp8_gemm_config(int config) -> str", &nmoe::fp8::gemm_config);
  m.def("_fp8_split_k_override(int n, int k, int splits) -> int", &nmoe::fp8::split_k_override);
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("quant_fp8_act", &nmoe::fp8::quant_fp8_act);
  m.impl("silu_mul_quant_fp8", &nmoe::fp8::silu_mul_quant_fp8);
  m.impl("fp8_gemm", &nmoe::fp8::fp8_gemm);
  m.impl("grouped_fp8_gemm_contiguous", &nmoe::fp8::grouped_fp8_gemm_contiguous);
  m.impl("grouped_fp8_gemm_masked", &nmoe::fp8::grouped_fp8_gemm_masked);
}
