// Registers the sampler as torch.ops.nmoe.sample.
#include <torch/library.h>

#include "sampling/interface.h"

TORCH_LIBRARY_FRAGMENT(nmoe, m) {
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed,"
      " Tensor position, int num_top_logprobs, bool top_from_processed)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nmoe, CUDA, m) { m.impl("sample", &nmoe::sampling::sample); }
