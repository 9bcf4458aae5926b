// Blockwise-scaled FP8 grouped GEMM for sm90a: D[rows of g] = (A * sa)[rows of g] x ((B[g] * sb[g]))^T,
// as a template over the CUTLASS kernel configuration. Each gemm_<config>.cu instantiates one
// configuration (one CUTLASS kernel costs about a minute of nvcc, so they compile in parallel);
// gemm_dispatch.cpp picks one per call from the layout and the row counts the host knows.
//
// One CUTLASS 3.x ptr-array kernel (TMA, warp-specialized, FP8 wgmma with fp32 promotion of every
// 128-deep K block by its A and B scales) serves all three row layouts: dense (one group),
// contiguous (prefill: tokens sorted by expert) and masked (decode: fixed max_m rows per expert).
// A one-block kernel turns offsets / counts into the per-group problem shapes and pointers on the
// device, and the persistent group scheduler reads them there, so the whole op makes no host
// synchronisation and can be captured in a CUDA graph.
//
// kSwapAB computes D^T = B A^T instead: the weight rows become the MMA's M (a 64-row wgmma fed by a
// 128- or 256-row weight tile) and the tokens its N (a wgmma N of 16..64). For the masked decode
// layout and small groups this wastes no MMA rows on padding tokens and streams a long weight
// tile per CTA; D is then written column-major (ld = n), which is the same row-major [rows, n].
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
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler_detail.hpp>

#include "fp8/params.h"
#include "pdl.cuh"

namespace nmoe::fp8::sm90 {

using namespace cute;

template <int TileM, int TileN, bool Pingpong, int ClusterM, int ClusterN, bool SwapAB>
struct GroupedGemm {
  static constexpr bool kPingpong = Pingpong;
  static constexpr bool kSwapAB = SwapAB;
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;     // CUTLASS A [M, k], k contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // CUTLASS B [N, k], k contiguous
  // Not swapped: D [rows, n] row-major. Swapped: D^T [n, rows] column-major with ld = n, the same bytes.
  using LayoutD = cute::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignAB = 16;  // elements per 16-byte TMA access
  static constexpr int kAlignD = 8;

  using TileShape = Shape<Int<TileM>, Int<TileN>, Int<kBlock>>;
  using ClusterShape = Shape<Int<ClusterM>, Int<ClusterN>, _1>;

  // Scales, both K-major: activations per row per 128 K ([rows, kb] row-major), weights per 128x128
  // ([nb, kb] row-major). The kernel derives each group's scale layout from its problem shape, so
  // K-major is what lets a group's activation scales be a plain row slice of the [rows, kb] scales.
  static constexpr int kGranM = kSwapAB ? kBlock : 1;
  static constexpr int kGranN = kSwapAB ? 1 : kBlock;
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<kGranM, kGranN, kBlock, GMMA::Major::K, GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (m, n, k) per group

  using KernelSchedule = cute::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>;
  using EpilogueSchedule = cute::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                               cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD, ElementD, LayoutD*,
      kAlignD, EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // Per-group arrays the kernel reads, carved out of the front of the workspace.
  struct GroupArrays {
    Shape3* shapes;
    const ElementA** a;
    const ElementB** b;
    const float** sa;
    const float** sb;
    ElementD** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    LayoutSFA* layout_sa;
    LayoutSFB* layout_sb;
  };

  static constexpr size_t kAlign = 128;
  static size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  template <class T>
  static T* carve(char*& cursor, int count) {
    T* p = reinterpret_cast<T*>(cursor);
    cursor += align_up(sizeof(T) * static_cast<size_t>(count));
    return p;
  }

  // Byte size of GroupArrays for num_groups groups; also fills `g` when base is non-null.
  static size_t group_arrays_bytes(int num_groups, char* base, GroupArrays* g) {
    char* c = base;
    GroupArrays t;
    t.shapes = carve<Shape3>(c, num_groups);
    t.a = carve<const ElementA*>(c, num_groups);
    t.b = carve<const ElementB*>(c, num_groups);
    t.sa = carve<const float*>(c, num_groups);
    t.sb = carve<const float*>(c, num_groups);
    t.d = carve<ElementD*>(c, num_groups);
    t.stride_a = carve<StrideA>(c, num_groups);
    t.stride_b = carve<StrideB>(c, num_groups);
    t.stride_d = carve<StrideD>(c, num_groups);
    t.layout_sa = carve<LayoutSFA>(c, num_groups);
    t.layout_sb = carve<LayoutSFB>(c, num_groups);
    if (g != nullptr) *g = t;
    return static_cast<size_t>(c - base);
  }

  static typename Gemm::Arguments make_arguments(const GroupedGemmParams& p, const GroupArrays& g) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {p.num_groups, g.shapes, nullptr},  // no host shapes: the group sizes stay on the device
        {g.a, g.stride_a, g.b, g.stride_b, g.sa, g.layout_sa, g.sb, g.layout_sb},
        {{}, nullptr, nullptr, g.d, g.stride_d},
        hw};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.beta_ptr_array = nullptr;
    fusion.dAlpha = {_0{}, _0{}, 0};
    fusion.dBeta = {_0{}, _0{}, 0};
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order = p.raster_along_n ? Raster::AlongN : Raster::AlongM;
    return args;
  }

  static size_t cutlass_workspace_bytes(int num_groups, int sm_count) {
    GroupedGemmParams p{};
    p.num_groups = num_groups;
    p.sm_count = sm_count;
    return Gemm::get_workspace_size(make_arguments(p, GroupArrays{}));
  }

  static size_t workspace_bytes(int num_groups, int sm_count) {
    return group_arrays_bytes(num_groups, nullptr, nullptr) + align_up(cutlass_workspace_bytes(num_groups, sm_count));
  }

  static const char* run(const GroupedGemmParams& p, cudaStream_t stream);
};

// The rows [row0, row0 + rows) that group g multiplies, from the layout of p.
__device__ __forceinline__ void group_rows(const GroupedGemmParams& p, int g, int& row0, int& rows) {
  if (p.layout == GroupLayout::kDense) {
    row0 = 0;
    rows = p.m;
  } else if (p.layout == GroupLayout::kContiguous) {
    // Clamped so that bad offsets can never address outside A or D.
    row0 = min(max(p.offsets[g], 0), p.m);
    rows = min(max(p.offsets[g + 1], row0), p.m) - row0;
  } else {
    row0 = g * p.m;
    rows = min(max(p.counts[g], 0), p.m);
  }
}

// The per-group problem shapes, pointers, strides and scale layouts the ptr-array kernel reads,
// written by threads tid, tid + nthreads, ... (one group each).
template <class G>
__device__ __forceinline__ void write_group_arrays(const GroupedGemmParams& p, const typename G::GroupArrays& g,
                                                   int tid, int nthreads) {
  using ElementA = typename G::ElementA;
  using ElementB = typename G::ElementB;
  using ElementD = typename G::ElementD;
  const int kb = (p.k + kBlock - 1) / kBlock;
  const int nb = (p.n + kBlock - 1) / kBlock;
  for (int e = tid; e < p.num_groups; e += nthreads) {
    int row0, rows;
    group_rows(p, e, row0, rows);
    const ElementA* act = static_cast<const ElementA*>(p.a) + static_cast<int64_t>(row0) * p.k;
    const ElementB* wgt = static_cast<const ElementB*>(p.b) + static_cast<int64_t>(e) * p.n * p.k;
    const float* act_s = p.sa + static_cast<int64_t>(row0) * kb;
    const float* wgt_s = p.sb + static_cast<int64_t>(e) * nb * kb;
    ElementD* out = static_cast<ElementD*>(p.d) + static_cast<int64_t>(row0) * p.n;
    // CUTLASS's (M, N) is (rows, n), or (n, rows) swapped; its A and B are the K-contiguous operands of M and N.
    const int cm = G::kSwapAB ? p.n : rows;
    const int cn = G::kSwapAB ? rows : p.n;
    const int ck = p.k;
    g.shapes[e] = typename G::Shape3{cm, cn, ck};
    g.a[e] = G::kSwapAB ? wgt : act;  // both e4m3
    g.b[e] = G::kSwapAB ? act : wgt;
    g.sa[e] = G::kSwapAB ? wgt_s : act_s;
    g.sb[e] = G::kSwapAB ? act_s : wgt_s;
    g.d[e] = out;
    typename G::StrideA sa{};
    get<0>(sa) = p.k;
    g.stride_a[e] = sa;
    typename G::StrideB sb{};
    get<0>(sb) = p.k;
    g.stride_b[e] = sb;
    typename G::StrideD sd{};
    if constexpr (G::kSwapAB) {
      get<1>(sd) = p.n;  // column-major D^T [n, rows]: column j (token j) starts at j * n
    } else {
      get<0>(sd) = p.n;
    }
    g.stride_d[e] = sd;
    g.layout_sa[e] = G::ScaleConfig::tile_atom_to_shape_SFA(make_shape(cm, cn, ck, 1));
    g.layout_sb[e] = G::ScaleConfig::tile_atom_to_shape_SFB(make_shape(cm, cn, ck, 1));
  }
}

// The arrays by a one-block kernel of their own before the GEMM. (Writing them in every CTA of the
// GEMM after its dependency wait instead, which saves the launch, measured 0.2 ms slower per decode
// step on the H200, 2026-12-02: docs/kernels.md.)
template <class G>
__global__ void build_group_arrays(GroupedGemmParams p, typename G::GroupArrays g) {
  pdl_enter();  // first: see csrc/pdl.cuh
  write_group_arrays<G>(p, g, threadIdx.x, blockDim.x);
}

template <int TileM, int TileN, bool Pingpong, int ClusterM, int ClusterN, bool SwapAB>
const char* GroupedGemm<TileM, TileN, Pingpong, ClusterM, ClusterN, SwapAB>::run(const GroupedGemmParams& p,
                                                                                  cudaStream_t stream) {
  char* base = static_cast<char*>(p.workspace);
  GroupArrays g;
  const size_t arrays_bytes = group_arrays_bytes(p.num_groups, base, &g);
  const cudaError_t launched = launch_pdl(build_group_arrays<GroupedGemm>, 1, 256, 0, stream, p, g);
  if (launched != cudaSuccess) return "grouped_gemm_sm90: launching build_group_arrays failed";

  typename Gemm::Arguments args = make_arguments(p, g);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "grouped_gemm_sm90: CUTLASS cannot implement";
  if (gemm.initialize(args, base + arrays_bytes, stream) != cutlass::Status::kSuccess) {
    return "grouped_gemm_sm90: CUTLASS initialize failed";
  }
  return launch_gemm(gemm, stream);  // with programmatic dependent launch: gemm_launch.cuh
}

}  // namespace nmoe::fp8::sm90

// Defines the two entry points of one configuration (declared by NMOE_FP8_GEMM_CONFIGS in params.h).
#define NMOE_FP8_DEFINE_GEMM_CONFIG(name, ...)                                                   \
  namespace nmoe::fp8 {                                                                          \
  size_t gemm_workspace_##name(int num_groups, int sm_count) {                                   \
    return sm90::GroupedGemm<__VA_ARGS__>::workspace_bytes(num_groups, sm_count);                \
  }                                                                                              \
  const char* gemm_run_##name(const GroupedGemmParams& p, cudaStream_t stream) {                 \
    return sm90::GroupedGemm<__VA_ARGS__>::run(p, stream);                                       \
  }                                                                                              \
  }
