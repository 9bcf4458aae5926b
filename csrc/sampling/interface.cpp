// Interface layer of the sampler: checks every tensor (messages name it), fills SampleParams,
// launches on the current stream.
#include "sampling/interface.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "sampling/params.h"

namespace nmoe::sampling {
namespace {

constexpr const char* kOp = "sample";

void check_row_param(const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), kOp, ": ", name, " is on ", t.device(), ", logits on ", logits.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), kOp, ": ", name, " must be [", logits.size(0),
              "] (one per logits row), got ", t.sizes());
  TORCH_CHECK(t.numel() <= 1 || t.stride(0) == 1, kOp, ": ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& position, int64_t num_top_logprobs,
    bool top_from_processed) {
  TORCH_CHECK(logits.is_cuda(), kOp, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, kOp, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, kOp, ": logits must be [B, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.numel() == 0 || logits.stride(1) == 1, kOp,
              ": logits must have unit stride in its last dim, got strides ", logits.strides());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab < std::numeric_limits<int32_t>::max(), kOp, ": vocab size ", vocab,
              " must be in [1, 2^31 - 1)");
  TORCH_CHECK(num_top_logprobs >= 0 && num_top_logprobs <= kMaxTopLogprobs, kOp,
              ": num_top_logprobs = ", num_top_logprobs, " must be in [0, ", kMaxTopLogprobs, "]");
  check_row_param("temperature", temperature, at::kFloat, logits);
  check_row_param("top_k", top_k, at::kInt, logits);
  check_row_param("top_p", top_p, at::kFloat, logits);
  check_row_param("min_p", min_p, at::kFloat, logits);
  check_row_param("seed", seed, at::kLong, logits);
  check_row_param("position", position, at::kLong, logits);

  c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options();
  auto tokens = at::empty({rows}, f32.dtype(at::kLong));
  auto lp_raw = at::empty({rows}, f32);
  auto lp_proc = at::empty({rows}, f32);
  auto top_ids = at::empty({rows, num_top_logprobs}, f32.dtype(at::kLong));
  auto top_lp = at::empty({rows, num_top_logprobs}, f32);
  if (rows == 0) return {tokens, lp_raw, lp_proc, top_ids, top_lp};

  SampleParams p{};
  p.logits = logits.data_ptr<float>();
  p.rows = rows;
  p.vocab = vocab;
  p.row_stride = logits.stride(0);
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.min_p = min_p.data_ptr<float>();
  p.seed = seed.data_ptr<int64_t>();
  p.position = position.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.logprobs_raw = lp_raw.data_ptr<float>();
  p.logprobs_processed = lp_proc.data_ptr<float>();
  p.top_ids = num_top_logprobs > 0 ? top_ids.data_ptr<int64_t>() : nullptr;
  p.top_logprobs = num_top_logprobs > 0 ? top_lp.data_ptr<float>() : nullptr;
  p.num_top = static_cast<int>(num_top_logprobs);
  p.top_from_processed = top_from_processed;
  p.vec4 = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (rows == 1 || p.row_stride % 4 == 0);
  // The split sampler's scratch (its allocations are stream-ordered: reused only after the kernels).
  SampleWorkspace ws{nullptr, nullptr};
  at::Tensor ws_data, ws_flags;
  if (const int64_t bytes = sample_workspace_bytes(p); bytes > 0) {
    ws_data = at::empty({bytes}, f32.dtype(at::kByte));
    ws_flags = at::zeros({rows + 1}, f32.dtype(at::kInt));
    ws = {ws_data.data_ptr(), ws_flags.data_ptr<int>()};
  }
  const char* err = sample_launch(p, ws, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {tokens, lp_raw, lp_proc, top_ids, top_lp};
}

}  // namespace nmoe::sampling
