// Interface layer of the FP8 ops: every tensor's device, dtype, shape, stride and alignment is
// checked here, with a message naming the op and the tensor; then a plain params struct is filled
// and the launcher in fp8/generic or fp8/sm90 is called on the current stream.
#include "fp8/interface.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <string>

#include "fp8/params.h"

namespace nmoe::fp8 {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Error messages are built from strings only (numbers via std::to_string): on the GPU machine's build,
// streaming an integer into an ostream from inside this extension crashed in the locale's number
// formatting, so no message here relies on the iostream code compiled into the extension.
std::string fmt(int64_t v) { return std::to_string(v); }
std::string fmt(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
const char* fmt(at::ScalarType t) { return c10::toString(t); }
std::string fmt(const c10::Device& d) { return d.str(); }

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", fmt(t.device()));
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", fmt(dtype), ", got ", fmt(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", fmt(dim), " dims, got shape ", fmt(t.sizes()));
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", fmt(t.device()), ", the inputs on ",
              fmt(ref.device()));
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", fmt(want), ", got ", fmt(t.sizes()));
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", fmt(t.sizes()), " strides ",
              fmt(t.strides()), " (call .contiguous())");
}

void check_aligned16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start on a 16-byte boundary (storage offset ", fmt(t.storage_offset()), ")");
}

void check_int32(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ", fmt(v), " does not fit in int32");
}

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, err); }

int sm_count(int device) {
  static std::array<int, 64> cache{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "nmoe: device index ", fmt(device),
              " out of range");
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// Checks the bf16 activation rows [m, cols] that the quant kernels read 16 bytes at a time.
void check_bf16_rows(const char* op, const at::Tensor& x2d, int64_t cols) {
  TORCH_CHECK(x2d.stride(1) == 1, op, ": x must have unit stride in its last dim, got strides ", fmt(x2d.strides()));
  TORCH_CHECK(x2d.size(0) <= 1 || x2d.stride(0) % 8 == 0, op, ": x row stride ", fmt(x2d.stride(0)),
              " must be a multiple of 8 elements");
  TORCH_CHECK(cols % 8 == 0, op, ": the channel count ", fmt(cols), " must be a multiple of 8");
  check_aligned16(op, "x", x2d);
}

// Checks (xq, xs) of `rows` rows and (w, ws) of `groups` experts, then returns (n, k).
std::pair<int64_t, int64_t> check_gemm_operands(const char* op, const at::Tensor& xq, const at::Tensor& xs,
                                                const at::Tensor& w, const at::Tensor& ws, bool grouped) {
  const int64_t wdim = grouped ? 3 : 2;
  check_tensor(op, "w", w, at::kFloat8_e4m3fn, wdim);
  check_tensor(op, "ws", ws, at::kFloat, wdim);
  check_same_device(op, "xs", xs, xq);
  check_same_device(op, "w", w, xq);
  check_same_device(op, "ws", ws, xq);
  const int64_t n = w.size(-2), k = w.size(-1);
  TORCH_CHECK(xq.size(-1) == k, op, ": xq has ", fmt(xq.size(-1)), " channels but w has k = ", fmt(k), " (w shape ",
              fmt(w.sizes()), ")");
  TORCH_CHECK(k > 0 && k % 16 == 0, op, ": k = ", fmt(k), " must be a positive multiple of 16 (TMA rows of 16 bytes)");
  TORCH_CHECK(n > 0 && n % 8 == 0, op, ": n = ", fmt(n), " must be a positive multiple of 8 (16-byte output rows)");
  check_int32(op, "n", n);
  check_int32(op, "k", k);
  std::vector<int64_t> want_ws(w.sizes().begin(), w.sizes().end());
  want_ws[wdim - 2] = cdiv(n, kBlock);
  want_ws[wdim - 1] = cdiv(k, kBlock);
  check_shape(op, "ws", ws, want_ws);
  std::vector<int64_t> want_xs(xq.sizes().begin(), xq.sizes().end());
  want_xs.back() = cdiv(k, kBlock);
  check_shape(op, "xs", xs, want_xs);
  check_contiguous(op, "xq", xq);
  check_contiguous(op, "xs", xs);
  check_contiguous(op, "w", w);
  check_contiguous(op, "ws", ws);
  check_aligned16(op, "xq", xq);
  check_aligned16(op, "w", w);
  return {n, k};
}

// Runs the sm90 grouped kernel; `out` is bf16 rows of n, already allocated.
void launch_grouped(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& ws,
                    const at::Tensor& out, GroupLayout layout, int groups, int64_t m, int64_t n, int64_t k,
                    const int32_t* offsets, const int32_t* counts) {
  const c10::cuda::CUDAGuard guard(xq.device());
  GroupedGemmParams p{};
  p.layout = layout;
  p.a = xq.data_ptr();
  p.sa = xs.data_ptr<float>();
  p.b = w.data_ptr();
  p.sb = ws.data_ptr<float>();
  p.d = out.data_ptr();
  p.offsets = offsets;
  p.counts = counts;
  p.num_groups = groups;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.sm_count = sm_count(xq.get_device());
  select_gemm_config_sm90(p);
  const size_t bytes = grouped_gemm_workspace_bytes_sm90(p);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, xq.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  check_launch(grouped_gemm_sm90(p, c10::cuda::getCurrentCUDAStream(xq.get_device()).stream()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quant_fp8_act(const at::Tensor& x, const std::optional<at::Tensor>& rows) {
  constexpr const char* op = "quant_fp8_act";
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [rows, k] or [rows, heads, head], got shape ",
              fmt(x.sizes()));
  check_tensor(op, "x", x, at::kBFloat16, x.dim());
  const int64_t heads = x.dim() == 3 ? x.size(1) : 1, head = x.size(-1);
  const int64_t k = heads * head;
  // a [rows, heads, head] view: each 128-channel group must lie inside one head
  TORCH_CHECK(heads == 1 || head % kBlock == 0, op, ": x of shape ", fmt(x.sizes()), " needs head = ", fmt(head),
              " to be a multiple of 128");
  TORCH_CHECK(heads == 1 || x.stride(1) % 8 == 0, op, ": x head stride ", fmt(x.stride(1)),
              " must be a multiple of 8 elements");
  check_bf16_rows(op, x.dim() == 3 ? x.select(1, 0) : x, head);
  int64_t m = x.size(0);
  const int64_t* row_ptr = nullptr;
  if (rows.has_value()) {
    check_tensor(op, "rows", *rows, at::kLong, 1);
    check_same_device(op, "rows", *rows, x);
    check_contiguous(op, "rows", *rows);
    m = rows->size(0);
    row_ptr = rows->data_ptr<int64_t>();
  }
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = at::empty({m, cdiv(k, kBlock)}, x.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(x.device());
  const ActQuantParams p{x.data_ptr(), q.data_ptr(), s.data_ptr<float>(), row_ptr, m, k, x.size(0), x.stride(0),
                         heads == 1 ? 0 : x.stride(1), head};
  check_launch(act_quant(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_fp8(const at::Tensor& x) {
  constexpr const char* op = "silu_mul_quant_fp8";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", fmt(x.device()));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, ": x must be BFloat16, got ", fmt(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [..., 2 * i], got shape ", fmt(x.sizes()));
  TORCH_CHECK(x.dim() == 2 || x.is_contiguous(), op, ": x with more than 2 dims must be contiguous, got strides ",
              fmt(x.strides()));
  const int64_t two_i = x.size(-1);
  TORCH_CHECK(two_i % 2 == 0, op, ": the last dim of x (", fmt(two_i), ") must be even: [gate | up]");
  const int64_t i = two_i / 2;
  const at::Tensor x2d = x.dim() == 2 ? x : x.view({-1, two_i});
  check_bf16_rows(op, x2d, i);
  std::vector<int64_t> qshape(x.sizes().begin(), x.sizes().end());
  qshape.back() = i;
  std::vector<int64_t> sshape = qshape;
  sshape.back() = cdiv(i, kBlock);
  at::Tensor q = at::empty(qshape, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = at::empty(sshape, x.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(x.device());
  const SiluMulQuantParams p{x2d.data_ptr(), q.data_ptr(), s.data_ptr<float>(), x2d.size(0), i, x2d.stride(0)};
  check_launch(silu_mul_quant(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
  return {q, s};
}

at::Tensor fp8_gemm(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& ws) {
  constexpr const char* op = "fp8_gemm";
  check_tensor(op, "xq", xq, at::kFloat8_e4m3fn, 2);
  check_tensor(op, "xs", xs, at::kFloat, 2);
  const auto [n, k] = check_gemm_operands(op, xq, xs, w, ws, /*grouped=*/false);
  const int64_t m = xq.size(0);
  check_int32(op, "m", m);
  at::Tensor out = at::empty({m, n}, xq.options().dtype(at::kBFloat16));
  if (m == 0) return out;
  if (m > kDenseMaxRows || gemm_config_forced()) {
    launch_grouped(xq, xs, w, ws, out, GroupLayout::kDense, 1, m, n, k, nullptr, nullptr);
    return out;
  }
  // decode-sized: the dense kernel, its K cut into slices (bf16 partial products, then their fp32 sum)
  const c10::cuda::CUDAGuard guard(xq.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(xq.get_device()).stream();
  DenseGemmParams p{};
  p.x = xq.data_ptr();
  p.xs = xs.data_ptr<float>();
  p.w = w.data_ptr();
  p.ws = ws.data_ptr<float>();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.sm_count = sm_count(xq.get_device());
  select_dense_config_sm90(p);
  const at::Tensor partials = p.splits == 1 ? out : at::empty({p.splits, m, n}, out.options());
  p.d = partials.data_ptr();
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(dense_gemm_workspace_bytes_sm90(p))}, xq.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  check_launch(dense_gemm_sm90(p, stream));
  if (p.splits > 1) {
    const SplitKReduceParams r{partials.data_ptr(), out.data_ptr(), m * n, p.splits};
    check_launch(splitk_reduce(r, stream));
  }
  return out;
}

at::Tensor grouped_fp8_gemm_contiguous(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                                       const at::Tensor& ws, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_fp8_gemm_contiguous";
  check_tensor(op, "xq", xq, at::kFloat8_e4m3fn, 2);
  check_tensor(op, "xs", xs, at::kFloat, 2);
  const auto [n, k] = check_gemm_operands(op, xq, xs, w, ws, /*grouped=*/true);
  const int64_t groups = w.size(0), m = xq.size(0);
  check_tensor(op, "offsets", offsets, at::kInt, 1);
  check_same_device(op, "offsets", offsets, xq);
  check_shape(op, "offsets", offsets, {groups + 1});
  check_contiguous(op, "offsets", offsets);
  TORCH_CHECK(groups > 0, op, ": w must hold at least one expert, got shape ", fmt(w.sizes()));
  check_int32(op, "m", m);
  at::Tensor out = at::empty({m, n}, xq.options().dtype(at::kBFloat16));
  if (m == 0) return out;
  launch_grouped(xq, xs, w, ws, out, GroupLayout::kContiguous, static_cast<int>(groups), m, n, k,
                 offsets.data_ptr<int32_t>(), nullptr);
  return out;
}

at::Tensor grouped_fp8_gemm_masked(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                                   const at::Tensor& ws, const at::Tensor& counts) {
  constexpr const char* op = "grouped_fp8_gemm_masked";
  check_tensor(op, "xq", xq, at::kFloat8_e4m3fn, 3);
  check_tensor(op, "xs", xs, at::kFloat, 3);
  const auto [n, k] = check_gemm_operands(op, xq, xs, w, ws, /*grouped=*/true);
  const int64_t groups = w.size(0), max_m = xq.size(1);
  TORCH_CHECK(xq.size(0) == groups, op, ": xq holds ", fmt(xq.size(0)), " experts but w holds ", fmt(groups));
  check_tensor(op, "counts", counts, at::kInt, 1);
  check_same_device(op, "counts", counts, xq);
  check_shape(op, "counts", counts, {groups});
  check_contiguous(op, "counts", counts);
  TORCH_CHECK(groups > 0, op, ": w must hold at least one expert, got shape ", fmt(w.sizes()));
  check_int32(op, "experts * max_m", groups * max_m);
  at::Tensor out = at::empty({groups, max_m, n}, xq.options().dtype(at::kBFloat16));
  if (max_m == 0) return out;
  launch_grouped(xq, xs, w, ws, out, GroupLayout::kMasked, static_cast<int>(groups), max_m, n, k, nullptr,
                 counts.data_ptr<int32_t>());
  return out;
}

int64_t gemm_override(int64_t config, int64_t raster) {
  return set_gemm_override(static_cast<int>(config), static_cast<int>(raster));
}

int64_t split_k_override(int64_t n, int64_t k, int64_t splits) {
  return set_split_k_override(static_cast<int>(n), static_cast<int>(k), static_cast<int>(splits));
}

std::string gemm_config(int64_t config) { return gemm_config_name(static_cast<int>(config)); }

}  // namespace nmoe::fp8
