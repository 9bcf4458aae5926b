// Interface layer of the attention ops: checks device, dtype, shape and stride of every tensor with
// a message naming it, fills MlaDecodeParams and launches on the current stream.
#include "attention/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "attention/params.h"

namespace nmoe::attention {
namespace {

constexpr const char* kOp = "mla_decode_paged";

void check_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), ", q on ", ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, kOp, ": ", name,
              " must have unit stride in its last dim, got strides ", t.strides());
}

void check_16b(const char* name, const at::Tensor& t, std::initializer_list<int64_t> strides) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, kOp, ": ", name,
              " must start on a 16-byte boundary (storage offset ", t.storage_offset(), ")");
  for (int64_t s : strides) {
    TORCH_CHECK(s % 8 == 0, kOp, ": ", name, " strides must be multiples of 8 elements (16 bytes), got ", t.strides());
  }
}

int sm_count(int device) {
  static std::array<int, 64> cache{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), kOp, ": device index ", device, " out of range");
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// Which split kernel runs (MlaDecodeImpl). -1 (auto): for H >= 64 the wgmma kernel with the seesaw
// schedule (4-19% faster than the eager one on the H200 at 128 heads, which is 1.8-2.1x mma.sync;
// docs/kernels.md), unless NMOE_MLA_WGMMA picks another (0 mma.sync, 1 deferred, 2 eager, 3 fenced,
// 4 seesaw; read on every call, so a change takes effect at once; a CUDA graph keeps the kernel it
// captured); mma.sync below 64 heads. An explicit wgmma variant with fewer heads is an error rather
// than a silent fallback, so a test of the wgmma path cannot pass on the other kernel.
int resolve_impl(int64_t variant, int64_t heads) {
  TORCH_CHECK(variant >= -1 && variant <= 4, kOp, ": variant must be -1 (auto), 0 (mma.sync), 1 (wgmma), 2 (wgmma,",
              " eager schedule), 3 (wgmma with consumer proxy fences) or 4 (wgmma, seesaw schedule), got ", variant);
  if (variant == -1) {
    const char* env = std::getenv("NMOE_MLA_WGMMA");
    const std::string choice = env == nullptr ? "4" : env;
    TORCH_CHECK(choice.size() == 1 && choice[0] >= '0' && choice[0] <= '4', kOp,
                ": NMOE_MLA_WGMMA must be 0 (mma.sync), 1, 2, 3 or 4 (wgmma variants), got '", choice, "'");
    if (heads < kMlaWgmmaMinHeads) return kMlaImplMma;
    static constexpr int kImpl[] = {kMlaImplMma, kMlaImplWgmma, kMlaImplWgmmaEager, kMlaImplWgmmaFenced,
                                    kMlaImplWgmmaSeesaw};
    return kImpl[choice[0] - '0'];
  }
  TORCH_CHECK(variant == 0 || heads >= kMlaWgmmaMinHeads, kOp, ": the wgmma variant needs at least ",
              kMlaWgmmaMinHeads, " heads, got ", heads);
  return static_cast<int>(variant);
}

// An on/off switch of the environment, on unless set to "0"; anything but "0" or "1" is an error
// naming the variable. Read on every call (a CUDA graph keeps what it captured).
bool switch_on(const char* name) {
  const char* env = std::getenv(name);
  const std::string choice = env == nullptr ? "1" : env;
  TORCH_CHECK(choice == "0" || choice == "1", kOp, ": ", name, " must be 0 or 1, got '", choice, "'");
  return choice == "1";
}

// Whether two splits of the eager wgmma kernel merge inside it, as 2-CTA clusters (pair_splits in
// params.h): the default; NMOE_MLA_PAIR=0 keeps the partial outputs and the combine kernel (for an
// A/B and for the tests, which compare the two; read on every call like NMOE_MLA_WGMMA).
bool pair_splits(int impl, int num_splits) {
  return switch_on("NMOE_MLA_PAIR") && (impl == kMlaImplWgmmaEager || impl == kMlaImplWgmmaSeesaw) &&
         num_splits == 2;  // checked on every call
}

// The wgmma kernels' rescale slack (rescale_slack in params.h): NMOE_MLA_LAZY=1 (default) keeps a row's
// running max while a tile's max exceeds it by at most 8 (p <= 2^8 = 256, far inside bf16 and fp32
// range), so O is rescaled only on the rare larger jumps; 0 is the exact online max (read per call).
float rescale_slack() { return switch_on("NMOE_MLA_LAZY") ? 8.f : 0.f; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> mla_decode_paged(const at::Tensor& q, const at::Tensor& cache,
                                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                    double softmax_scale, int64_t variant) {
  check_tensor("q", q, at::kBFloat16, 3, q);
  check_tensor("cache", cache, at::kBFloat16, 3, q);
  check_tensor("block_table", block_table, at::kInt, 2, q);
  check_tensor("seq_lens", seq_lens, at::kInt, 1, q);
  const int64_t batch = q.size(0), heads = q.size(1);
  TORCH_CHECK(q.size(2) == kHeadDim, kOp, ": q must be [B, H, ", kHeadDim, "] (", kLoraRank, " latent + ", kRopeDim,
              " rope), got ", q.sizes());
  TORCH_CHECK(cache.size(2) == kHeadDim, kOp, ": cache must be [pages, page_size, ", kHeadDim, "], got ",
              cache.sizes());
  const int64_t page_size = cache.size(1);
  TORCH_CHECK(page_size >= 1, kOp, ": cache page_size must be positive, got ", cache.sizes());
  TORCH_CHECK(block_table.size(0) == batch, kOp, ": block_table must have ", batch, " rows (q's batch), got ",
              block_table.sizes());
  TORCH_CHECK(seq_lens.size(0) == batch, kOp, ": seq_lens must be [", batch, "], got ", seq_lens.sizes());
  TORCH_CHECK(std::isfinite(softmax_scale), kOp, ": softmax_scale must be finite, got ", softmax_scale);
  const int64_t max_pages = block_table.size(1);
  TORCH_CHECK(max_pages * page_size <= std::numeric_limits<int32_t>::max() && batch <= 65535 && heads <= 65535, kOp,
              ": sizes out of range: q ", q.sizes(), ", block_table ", block_table.sizes());

  const int impl = resolve_impl(variant, heads);

  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({batch, heads, kLoraRank}, q.options());
  auto lse = at::empty({batch, heads}, q.options().dtype(at::kFloat));
  if (batch == 0 || heads == 0) return {out, lse};
  check_16b("q", q, {q.stride(0), q.stride(1)});
  check_16b("cache", cache, {cache.stride(0), cache.stride(1)});

  MlaDecodeParams p{};
  p.q = q.data_ptr();
  p.cache = cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.page_size = static_cast<int>(page_size);
  p.max_pages = static_cast<int>(max_pages);
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.page_stride = cache.stride(0);
  p.token_stride = cache.stride(1);
  p.block_table_stride = block_table.stride(0);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.impl = impl;
  p.num_splits = mla_decode_num_splits(p.batch, p.heads, p.max_pages * p.page_size, sm_count(q.get_device()));

  p.pair_splits = pair_splits(impl, p.num_splits) ? 1 : 0;
  p.rescale_slack = rescale_slack();

  at::Tensor part_out, part_lse;
  if (p.num_splits > 1 && !p.pair_splits) {
    part_out = at::empty({batch, p.num_splits, heads, kLoraRank}, lse.options());
    part_lse = at::empty({batch, p.num_splits, heads}, lse.options());
    p.part_out = part_out.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  const char* err = mla_decode_paged_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {out, lse};
}

namespace {

std::string dims(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}

// A bf16 [., ., .] operand of the absorbed projections on `ref`'s device: unit last stride, the
// other strides whole 16-byte vectors, a 16-byte aligned start.
void check_absorb_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " must be on ", ref.device().str(),
              ", got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 3, op, ": ", name,
              " must be a bfloat16 tensor of 3 dims, got ", c10::toString(t.scalar_type()), " ", dims(t.sizes()));
  TORCH_CHECK(t.numel() == 0 || (t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                                 reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0),
              op, ": ", name, " needs unit last stride and 16-byte rows, got strides ", dims(t.strides()));
}

// cos / sin of the rope: contiguous float32 [batch, rope / 2] on ref's device.
void check_rope_tables(const char* op, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ref,
                       int64_t batch, int64_t rope) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(t.is_cuda() && t.device() == ref.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.dim() == 2 && t.size(0) == batch && t.size(1) == rope / 2,
                op, ": ", name, " must be a contiguous float32 [", batch, ", ", rope / 2, "] tensor on ",
                ref.device().str(), ", got shape ", dims(t.sizes()));
  }
}

}  // namespace

at::Tensor mla_decode_q(const at::Tensor& q_lat, const at::Tensor& q_pe, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "mla_decode_q";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q_lat", q_lat}, {"q_pe", q_pe}}) {
    TORCH_CHECK(t.is_cuda() && t.device() == q_lat.device(), op, ": ", name, " must be on q_lat's CUDA device");
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 3 && t.stride(2) == 1, op, ": ", name,
                " must be a bfloat16 [., ., .] tensor with unit last stride, got shape ", dims(t.sizes()), " strides ",
                dims(t.strides()));
  }
  const int64_t heads = q_lat.size(0), batch = q_lat.size(1), rank = q_lat.size(2), rope = q_pe.size(2);
  TORCH_CHECK(q_pe.size(0) == batch && q_pe.size(1) == heads, op, ": q_pe must be [", std::to_string(batch), ", ",
              std::to_string(heads), ", rope] for q_lat ", dims(q_lat.sizes()), ", got ", dims(q_pe.sizes()));
  TORCH_CHECK(rank % 8 == 0 && reinterpret_cast<uintptr_t>(q_lat.data_ptr()) % 16 == 0 && q_lat.stride(0) % 8 == 0 &&
                  q_lat.stride(1) % 8 == 0,
              op, ": q_lat rows must start on 16-byte boundaries, got strides ", dims(q_lat.strides()));
  TORCH_CHECK(rope % 2 == 0, op, ": the rope width ", std::to_string(rope), " must be even");
  check_rope_tables(op, cos, sin, q_lat, batch, rope);
  c10::cuda::CUDAGuard guard(q_lat.device());
  auto out = at::empty({batch, heads, rank + rope}, q_lat.options());
  MlaDecodeQParams p{};
  p.q_lat = q_lat.data_ptr();
  p.q_pe = q_pe.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.out = out.data_ptr();
  p.batch = batch;
  p.heads = heads;
  p.lat_head_stride = q_lat.stride(0);
  p.lat_batch_stride = q_lat.stride(1);
  p.pe_batch_stride = q_pe.stride(0);
  p.pe_head_stride = q_pe.stride(1);
  p.rank = static_cast<int>(rank);
  p.rope = static_cast<int>(rope);
  const char* err = mla_decode_q_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return out;
}


at::Tensor mla_absorb_q(const at::Tensor& q_nope, const at::Tensor& w_uk, const at::Tensor& q_pe, const at::Tensor& cos,
                        const at::Tensor& sin) {
  constexpr const char* op = "mla_absorb_q";
  check_absorb_operand(op, "q_nope", q_nope, q_nope);
  check_absorb_operand(op, "w_uk", w_uk, q_nope);
  TORCH_CHECK(q_pe.is_cuda() && q_pe.device() == q_nope.device() && q_pe.scalar_type() == at::kBFloat16 &&
                  q_pe.dim() == 3 && (q_pe.numel() == 0 || q_pe.stride(2) == 1),
              op, ": q_pe must be a bfloat16 [B, H, D] tensor on q_nope's device with unit last stride, got ",
              dims(q_pe.sizes()), " strides ", dims(q_pe.strides()));
  const int64_t batch = q_nope.size(0), heads = q_nope.size(1), rank = w_uk.size(2), rope = q_pe.size(2);
  TORCH_CHECK(q_nope.size(2) == kAbsorbNope, op, ": q_nope must be [B, H, ", kAbsorbNope, "], got ",
              dims(q_nope.sizes()));
  TORCH_CHECK(w_uk.size(0) == heads && w_uk.size(1) == kAbsorbNope && rank % 128 == 0 && rank > 0, op,
              ": w_uk must be [", heads, ", ", kAbsorbNope, ", R] with R a multiple of 128, got ", dims(w_uk.sizes()));
  TORCH_CHECK(q_pe.size(0) == batch && q_pe.size(1) == heads && rope % 2 == 0, op, ": q_pe must be [", batch, ", ",
              heads, ", D] with D even, got ", dims(q_pe.sizes()));
  check_rope_tables(op, cos, sin, q_nope, batch, rope);
  c10::cuda::CUDAGuard guard(q_nope.device());
  auto out = at::empty({batch, heads, rank + rope}, q_nope.options());
  MlaAbsorbQParams p{};
  p.q_nope = q_nope.data_ptr();
  p.w = w_uk.data_ptr();
  p.q_pe = q_pe.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.out = out.data_ptr();
  p.batch = batch;
  p.heads = heads;
  p.q_batch_stride = q_nope.stride(0);
  p.q_head_stride = q_nope.stride(1);
  p.w_head_stride = w_uk.stride(0);
  p.w_row_stride = w_uk.stride(1);
  p.pe_batch_stride = q_pe.stride(0);
  p.pe_head_stride = q_pe.stride(1);
  p.rank = static_cast<int>(rank);
  p.rope = static_cast<int>(rope);
  const char* err = mla_absorb_q_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> mla_absorb_out(const at::Tensor& o_lat, const at::Tensor& w_uv, bool quantize) {
  constexpr const char* op = "mla_absorb_out";
  check_absorb_operand(op, "o_lat", o_lat, o_lat);
  check_absorb_operand(op, "w_uv", w_uv, o_lat);
  const int64_t batch = o_lat.size(0), heads = o_lat.size(1);
  TORCH_CHECK(o_lat.size(2) == kAbsorbRank, op, ": o_lat must be [B, H, ", kAbsorbRank, "], got ", dims(o_lat.sizes()));
  TORCH_CHECK(w_uv.size(0) == heads && w_uv.size(1) == kAbsorbV && w_uv.size(2) == kAbsorbRank, op, ": w_uv must be [",
              heads, ", ", kAbsorbV, ", ", kAbsorbRank, "], got ", dims(w_uv.sizes()));
  c10::cuda::CUDAGuard guard(o_lat.device());
  MlaAbsorbOutParams p{};
  at::Tensor first, second;
  if (quantize) {
    first = at::empty({batch, heads * kAbsorbV}, o_lat.options().dtype(at::kFloat8_e4m3fn));
    second = at::empty({batch, heads}, o_lat.options().dtype(at::kFloat));
    p.q = first.data_ptr();
    p.s = second.data_ptr<float>();
  } else {
    first = at::empty({batch, heads, kAbsorbV}, o_lat.options());
    second = at::empty({0}, o_lat.options().dtype(at::kFloat));
    p.out = first.data_ptr();
  }
  p.o_lat = o_lat.data_ptr();
  p.w = w_uv.data_ptr();
  p.batch = batch;
  p.heads = heads;
  p.o_batch_stride = o_lat.stride(0);
  p.o_head_stride = o_lat.stride(1);
  p.w_head_stride = w_uv.stride(0);
  p.w_row_stride = w_uv.stride(1);
  const char* err = mla_absorb_out_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {first, second};
}

}  // namespace nmoe::attention
