// Registers the paged KV-cache ops as torch.ops.nmoe.* (both mutate `cache` in place).
#include <torch/library.h>

#include "kv/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def("kv_append_paged(Tensor(a!) cache, Tensor out_loc, Tensor c_kv, Tensor k_pe) -> ()");
  m.def(
      "kv_norm_rope_append(Tensor(a!) cache, Tensor out_loc, Tensor kv, Tensor weight, float eps, Tensor cos,"
      " Tensor sin) -> ()");
  m.def("kv_copy_pages(Tensor(a!) cache, Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("kv_append_paged", &nmoe::kv::kv_append_paged);
  m.impl("kv_norm_rope_append", &nmoe::kv::kv_norm_rope_append);
  m.impl("kv_copy_pages", &nmoe::kv::kv_copy_pages);
}
