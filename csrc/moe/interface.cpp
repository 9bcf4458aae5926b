// Interface layer of the MoE row-bookkeeping ops: checks every tensor (messages name the op and the
// tensor), fills the params structs, launches on the current stream.
#include "moe/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "moe/params.h"

namespace nmoe::moe {
namespace {

// Numbers through std::to_string, as in fp8/interface.cpp (no iostream number formatting).
std::string fmt(int64_t v) { return std::to_string(v); }
std::string fmt(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}

void check(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim,
           const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device().str());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device().str(), ", the inputs on ",
              ref.device().str());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", fmt(dim), " dims, got shape ", fmt(t.sizes()));
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", fmt(t.sizes()), " strides ",
              fmt(t.strides()));
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, err); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& ids, int64_t experts,
                                                          const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_align";
  check(op, "ids", ids, at::kLong, 2, ids);
  check_contiguous(op, "ids", ids);
  if (expert_map.has_value()) {
    check(op, "expert_map", *expert_map, at::kLong, 1, ids);
    check_contiguous(op, "expert_map", *expert_map);
    TORCH_CHECK(expert_map->numel() >= 1, op, ": expert_map must not be empty");
  }
  TORCH_CHECK(experts >= 1 && experts <= kMaxLocalExperts, op, ": experts = ", fmt(experts), " must be in [1, ",
              fmt(kMaxLocalExperts), "]");
  TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= 1024, op, ": k = ", fmt(ids.size(1)), " must be in [1, 1024]");
  c10::cuda::CUDAGuard guard(ids.device());
  const int64_t slots = ids.numel();
  auto src_rows = at::empty({slots}, ids.options());
  auto pos = at::empty({slots}, ids.options());
  auto offsets = at::empty({experts + 1}, ids.options().dtype(at::kInt));
  AlignParams p{};
  p.ids = ids.data_ptr<int64_t>();
  if (expert_map.has_value()) {
    p.expert_map = expert_map->data_ptr<int64_t>();
    p.map_len = expert_map->numel();
  }
  p.src_rows = src_rows.data_ptr<int64_t>();
  p.pos = pos.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int32_t>();
  p.slots = slots;
  p.k = static_cast<int>(ids.size(1));
  p.experts = static_cast<int>(experts);
  TORCH_CHECK(slots <= INT32_MAX, op, ": ", fmt(slots), " slots do not fit the int32 offsets");
  check_launch(moe_align_launch(p, c10::cuda::getCurrentCUDAStream()));
  return {src_rows, pos, offsets};
}

at::Tensor moe_combine(const at::Tensor& ys, const at::Tensor& pos, const at::Tensor& weights,
                       const std::optional<at::Tensor>& add) {
  constexpr const char* op = "moe_combine";
  check(op, "ys", ys, at::kBFloat16, 2, ys);
  check(op, "pos", pos, at::kLong, 2, ys);
  check(op, "weights", weights, at::kFloat, 2, ys);
  check_contiguous(op, "pos", pos);
  check_contiguous(op, "weights", weights);
  TORCH_CHECK(weights.sizes() == pos.sizes(), op, ": weights ", fmt(weights.sizes()), " and pos ", fmt(pos.sizes()),
              " must have the same shape [tokens, k]");
  const int64_t tokens = pos.size(0), k = pos.size(1), h = ys.size(1);
  TORCH_CHECK(k >= 1 && k <= 64, op, ": k = ", fmt(k), " must be in [1, 64]");
  TORCH_CHECK(h % 8 == 0, op, ": the hidden size ", fmt(h), " must be a multiple of 8");
  TORCH_CHECK(ys.size(0) <= 1 || ys.stride(1) == 1, op, ": ys must have unit stride in its last dim, got strides ",
              fmt(ys.strides()));
  TORCH_CHECK(ys.stride(0) % 8 == 0 && aligned16(ys), op, ": ys rows must start on 16-byte boundaries (strides ",
              fmt(ys.strides()), ")");
  CombineParams p{};
  if (add.has_value()) {
    const at::Tensor& a = *add;
    check(op, "add", a, at::kBFloat16, 2, ys);
    TORCH_CHECK(a.size(0) == tokens && a.size(1) == h, op, ": add must have shape [", fmt(tokens), ", ", fmt(h),
                "], got ", fmt(a.sizes()));
    TORCH_CHECK((a.stride(1) == 1 || tokens == 0) && a.stride(0) % 8 == 0 && aligned16(a), op,
                ": add rows must be unit-stride and start on 16-byte boundaries (strides ", fmt(a.strides()), ")");
    p.add = a.data_ptr();
    p.add_stride = a.stride(0);
  }
  c10::cuda::CUDAGuard guard(ys.device());
  auto out = at::empty({tokens, h}, ys.options());
  if (tokens == 0 || h == 0) return out;
  p.ys = ys.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.weights = weights.data_ptr<float>();
  p.out = out.data_ptr();
  p.tokens = tokens;
  p.rows = ys.size(0);
  p.ys_stride = ys.stride(0);
  p.h = static_cast<int>(h);
  p.k = static_cast<int>(k);
  check_launch(moe_combine_launch(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace nmoe::moe
