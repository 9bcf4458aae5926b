// Registers the attention ops as torch.ops.nmoe.* (schema here, CUDA implementation in interface.cpp).
#include <torch/library.h>

#include "attention/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def(
      "mla_decode_paged(Tensor q, Tensor cache, Tensor block_table, Tensor seq_lens, float softmax_scale,"
      " int variant=-1) -> (Tensor, Tensor)");
  m.def("mla_decode_q(Tensor q_lat, Tensor q_pe, Tensor cos, Tensor sin) -> Tensor");
  m.def("mla_absorb_q(Tensor q_nope, Tensor w_uk, Tensor q_pe, Tensor cos, Tensor sin) -> Tensor");
  m.def("mla_absorb_out(Tensor o_lat, Tensor w_uv, bool quantize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) {
  m.impl("mla_decode_paged", &nmoe::attention::mla_decode_paged);
  m.impl("mla_decode_q", &nmoe::attention::mla_decode_q);
  m.impl("mla_absorb_q", &nmoe::attention::mla_absorb_q);
  m.impl("mla_absorb_out", &nmoe::attention::mla_absorb_out);
}
