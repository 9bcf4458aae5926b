// Blockwise-scaled FP8 GEMM for decode-sized dense calls (at most 64 rows) on sm90a: one CUTLASS
// kernel, no group arrays; with its K split, a second kernel sums the slices.
//
// Swapped like the grouped kernel's s256xN configurations: D^T = W X^T, the weight rows on the
// MMA's M (256 per tile, 128 per consumer warpgroup) and the tokens on its N (a 32- or 64-wide
// tile), D^T written column-major with ld = n, i.e. the row-major [m, n] output.
//
// A decode call has few output tiles (o_proj at m = 32: 28 tiles of 256 weight rows for 132 SMs),
// so its K loop is cut into `splits` equal slices, which CUTLASS runs as the batch (L) mode of one
// GEMM: slice l reads columns [l k/s, (l+1) k/s) of both operands (the L stride k/s elements, the
// row stride k) and the matching columns of the K-major scales (a hand-made scale layout: CUTLASS's
// own assumes each batch's scales packed apart), and writes its bf16 partial product to
// d + l m n; splitk_reduce sums them in slice order. So the result depends on (n, k) and the
// configuration only, never on the order CTAs finish, and a row's output not on the other rows.
// (CUTLASS's stream-K scheduler reduces inside the kernel, but deterministically only by chaining
// a tile's slices one after another through the workspace: slower at every useful slice count,
// docs/kernels.md.) The problem shape is known on the host, so the TMA descriptors are built there
// and passed as kernel parameters (the ptr-array kernel builds one per group on the device).
#pragma once

#include "fp8/sm90/gemm_launch.cuh"  // first: it enables CUTLASS's griddepcontrol

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "fp8/params.h"

namespace nmoe::fp8::sm90 {

using namespace cute;

template <int TileN>
struct DenseDecodeGemm {
  using ElementA = cutlass::float_e4m3_t;  // the weights [n, k]
  using ElementB = cutlass::float_e4m3_t;  // the activations [m, k]
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;  // D^T [n, m], ld = n
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 8;

  using TileShape = Shape<_256, Int<TileN>, Int<kBlock>>;
  using ClusterShape = Shape<_1, _1, _1>;
  // Weight scales per 128 x 128 block on M, activation scales per token on N, both K-major: the
  // [nb, kb] and [m, kb] row-major tensors as they are.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<kBlock, 1, kBlock, GMMA::Major::K, GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments make_arguments(const DenseGemmParams& p) {
    const int slices = p.splits;
    const int cm = p.n, cn = p.m, ck = p.k / slices;  // CUTLASS's (M, N, K) of one slice: swapped
    const int kb = (p.k + kBlock - 1) / kBlock, kbs = kb / slices;
    typename Kernel::StrideA stride_a{};  // weights: rows of k, slice l at column l * ck
    get<0>(stride_a) = p.k;
    get<2>(stride_a) = ck;
    typename Kernel::StrideB stride_b{};  // tokens: rows of k, likewise
    get<0>(stride_b) = p.k;
    get<2>(stride_b) = ck;
    typename Kernel::StrideD stride_d{};  // D^T column-major: token j at j * n, slice l at l * m * n
    get<1>(stride_d) = cm;
    get<2>(stride_d) = static_cast<int64_t>(cm) * cn;
    // The scales of slice l: the block columns [l kbs, (l+1) kbs) of the [nb, kb] / [m, kb] rows.
    const LayoutSFA sfa = ScaleConfig::tile_atom_to_shape_SFA(make_shape(cm, cn, ck, slices));
    const LayoutSFB sfb = ScaleConfig::tile_atom_to_shape_SFB(make_shape(cm, cn, ck, slices));
    const LayoutSFA layout_sfa = make_layout(
        shape(sfa), make_stride(make_stride(_0{}, kb), make_stride(_0{}, _1{}), kbs));
    const LayoutSFB layout_sfb = make_layout(
        shape(sfb), make_stride(make_stride(_0{}, kb), make_stride(_0{}, _1{}), kbs));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kBatched,
        {cm, cn, ck, slices},
        {static_cast<const ElementA*>(p.w), stride_a, static_cast<const ElementB*>(p.x), stride_b, p.ws, layout_sfa,
         p.xs, layout_sfb},
        {{}, nullptr, stride_d, static_cast<ElementD*>(p.d), stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static size_t workspace_bytes(const DenseGemmParams& p) { return Gemm::get_workspace_size(make_arguments(p)); }

  static const char* run(const DenseGemmParams& p, cudaStream_t stream) {
    const typename Gemm::Arguments args = make_arguments(p);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "dense_gemm_sm90: CUTLASS cannot implement";
    if (gemm.initialize(args, p.workspace, stream) != cutlass::Status::kSuccess) {
      return "dense_gemm_sm90: CUTLASS initialize failed";
    }
    return launch_gemm(gemm, stream);  // with programmatic dependent launch: gemm_launch.cuh
  }
};

}  // namespace nmoe::fp8::sm90

// Defines the two entry points of one dense configuration (declared by NMOE_FP8_DENSE_CONFIGS).
#define NMOE_FP8_DEFINE_DENSE_CONFIG(name, tile_n)                                  \
  namespace nmoe::fp8 {                                                             \
  size_t dense_workspace_##name(const DenseGemmParams& p) {                         \
    return sm90::DenseDecodeGemm<tile_n>::workspace_bytes(p);                       \
  }                                                                                 \
  const char* dense_run_##name(const DenseGemmParams& p, cudaStream_t stream) {     \
    return sm90::DenseDecodeGemm<tile_n>::run(p, stream);                           \
  }                                                                                 \
  }
