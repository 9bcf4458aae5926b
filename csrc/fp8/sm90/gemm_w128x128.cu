// nmoe's own blockwise-scaled FP8 grouped GEMM for sm90a (configuration w128x128): the same contract
// as the CUTLASS configurations (grouped_gemm.cuh; every GroupLayout, partial 128-blocks in N and K),
// written for the prefill shapes of the MoE, where the CUTLASS kernel reached 828 / 707 TFLOP/s.
//
// A persistent grid; each CTA walks the 128x128 output tiles of all groups (tile t, t + grid, ...;
// inside a group the M tiles of one N tile are consecutive, so CTAs running at once share the
// weight tile in L2). One producer warp streams 128x128 A and B blocks (TMA, 128-byte swizzle) into
// a ring of 5 stages; two consumer warpgroups take 64 rows each and run FP8 wgmma m64n128k32. The
// scales apply per 128-deep K block, so each block's product lands in a temporary accumulator and
// is promoted into the fp32 sum by sa[row] * sb (while one warpgroup promotes, the other's wgmma
// can run). The epilogue stages a warpgroup's
// 64x128 bf16 result in shared memory (XOR-swizzled, conflict-free) and stores whole 16-byte chunks
// of the rows the group owns: rows past a group's end belong to the next group and are never written.
//
// Everything about the groups is read on the device (offsets / counts), the two TMA descriptors
// depend only on pointers and shapes: no host synchronisation, CUDA-graph capturable.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8/group_rows.cuh"
#include "fp8/params.h"
#include "pdl.cuh"
#include "sm90_async.cuh"

namespace nmoe::fp8 {
namespace {

using namespace nmoe::sm90;

constexpr int kTile = 128;                      // M, N and K of a block
constexpr int kStages = 5;
constexpr int kConsumers = 256;                 // two warpgroups of 64 rows each
constexpr int kThreads = kConsumers + 128;      // + the producer warpgroup (one thread issues the TMA)
constexpr int kMaxGroups = 1024;
constexpr uint32_t kOperandBytes = kTile * kTile;  // one fp8 128x128 block
constexpr uint32_t kStageBytes = 2 * kOperandBytes;
constexpr uint32_t kEpilogueBytes = 64 * kTile * 2;  // a warpgroup's 64x128 bf16 tile

struct Smem {  // after the stages and the epilogue tiles
  uint64_t full[kStages], empty[kStages];
  int tiles_before[kMaxGroups + 1];
  int row0[kMaxGroups], rows[kMaxGroups];
};
constexpr size_t kSmemBytes = 1024 /* alignment slack */ + kStages * kStageBytes + 2 * kEpilogueBytes + sizeof(Smem);

struct Args {
  CUtensorMap a;  // e4m3 [rows_a, k], box 128 x 128, 128-byte swizzle
  CUtensorMap b;  // e4m3 [groups * n, k], same box
  GroupedGemmParams p;
  int rows_a;     // rows of A (and D): m, or groups * max_m for the masked layout
  int n_tiles, kb, nb;
};

#define NMOE_R64                                                                                          \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "   \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "   \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "   \
  "%62, %63"
#define NMOE_A4(c, d, i) c(d[(i)]), c(d[(i) + 1]), c(d[(i) + 2]), c(d[(i) + 3])
#define NMOE_A16(c, d, i) NMOE_A4(c, d, i), NMOE_A4(c, d, (i) + 4), NMOE_A4(c, d, (i) + 8), NMOE_A4(c, d, (i) + 12)
#define NMOE_A64(c, d) NMOE_A16(c, d, 0), NMOE_A16(c, d, 16), NMOE_A16(c, d, 32), NMOE_A16(c, d, 48)

// D[64 x 128] (+)= A[64 x 32] B[128 x 32]^T, both e4m3 K-major in shared memory. kAccumulate false:
// D is only written (the first K step of a block).
template <bool kAccumulate>
__device__ __forceinline__ void wgmma_fp8_m64n128k32(float (&d)[64], uint64_t da, uint64_t db) {
  if constexpr (kAccumulate) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" NMOE_R64 "}, %64, %65, 1, 1, 1;\n"
                 : NMOE_A64("+f", d)
                 : "l"(da), "l"(db));
  } else {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" NMOE_R64 "}, %64, %65, 0, 1, 1;\n"
                 : NMOE_A64("=f", d)
                 : "l"(da), "l"(db));
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void st_shared(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

// Where tile t lies: its group, the group's first row and rows, and the tile's M and N index.
struct Tile {
  int g, row0, rows, mt, nt;
};
__device__ __forceinline__ Tile tile_at(const Smem& sh, int groups, int t) {
  int lo = 0, hi = groups - 1;  // the last group whose tiles start at or before t (it has tiles)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (sh.tiles_before[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  Tile x;
  x.g = lo;
  x.row0 = sh.row0[lo];
  x.rows = sh.rows[lo];
  const int mtiles = (x.rows + kTile - 1) / kTile, local = t - sh.tiles_before[lo];
  x.nt = local / mtiles;
  x.mt = local % mtiles;
  return x;
}

// The consumer side of one ring slot: its position and phase, advanced slot by slot.
struct Ring {
  int s = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void next() {
    if (++s == kStages) s = 0, phase ^= 1;
  }
};

// Waits for the slot's blocks and issues this warpgroup's 4 K steps of it into t.
__device__ __forceinline__ void issue_block(float (&t)[64], uint32_t stages, const Smem& sh, const Ring& r, int wg) {
  mbar_wait(smem_u32(&sh.full[r.s]), r.phase);
  wgmma_fence();  // t was read by the promotion before
  const uint32_t a = stages + r.s * kStageBytes + wg * 64 * kTile, b = stages + r.s * kStageBytes + kOperandBytes;
  wgmma_fp8_m64n128k32<false>(t, desc_k_sw128(a), desc_k_sw128(b));
#pragma unroll
  for (int kk = 1; kk < kTile / 32; ++kk) wgmma_fp8_m64n128k32<true>(t, desc_k_sw128(a + 32 * kk), desc_k_sw128(b + 32 * kk));
  wgmma_commit();
}

struct Scales {
  float a0, a1, w;
};
__device__ __forceinline__ Scales load_scales(const float* sa0, const float* sa1, const float* sb, int kb) {
  return Scales{__ldg(sa0 + kb), __ldg(sa1 + kb), __ldg(sb + kb)};
}
// Waits until at most kPending wgmma groups are in flight - the oldest, the block in t, has then
// completed - frees its ring slot and promotes t into acc by its scales.
template <int kPending>
__device__ __forceinline__ void finish(float (&acc)[64], float (&t)[64], const Scales& sc, const Smem& sh, Ring& done) {
  wgmma_wait<kPending>();
  reg_fence(t);
  if (threadIdx.x % 32 == 0) mbar_arrive(smem_u32(&sh.empty[done.s]));
  done.next();
  const float f0 = sc.a0 * sc.w, f1 = sc.a1 * sc.w;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    acc[4 * j] += t[4 * j] * f0;
    acc[4 * j + 1] += t[4 * j + 1] * f0;
    acc[4 * j + 2] += t[4 * j + 2] * f1;
    acc[4 * j + 3] += t[4 * j + 3] * f1;
  }
}

// kAhead: each pair of K blocks' scales is loaded one pair early (else at the top of the pair).
template <bool kAhead>
__global__ void __launch_bounds__(kThreads, 1) w128x128_kernel(const __grid_constant__ Args args) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t stages = smem_u32(base);
  uint8_t* epilogue = base + kStages * kStageBytes;
  Smem& sh = *reinterpret_cast<Smem*>(epilogue + 2 * kEpilogueBytes);
  const GroupedGemmParams& p = args.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, groups = p.num_groups;

  if (tid == kConsumers) {
    for (int s = 0; s < kStages; ++s) mbar_init(smem_u32(&sh.full[s]), 1), mbar_init(smem_u32(&sh.empty[s]), kConsumers / 32);
    fence_barrier_init();
    tma_prefetch_desc(&args.a);
    tma_prefetch_desc(&args.b);
  }
  pdl_enter();  // the offsets, counts, activations and scales come from earlier kernels
  // The groups' rows and tile counts, and the exclusive prefix of the tile counts (warp 0).
  if (warp == 0) {
    const int per = (groups + 31) / 32, g0 = min(groups, lane * per), g1 = min(groups, g0 + per);
    int mine = 0;
    for (int g = g0; g < g1; ++g) {
      int row0, rows;
      group_rows(p, g, row0, rows);
      sh.row0[g] = row0;
      sh.rows[g] = rows;
      mine += (rows + kTile - 1) / kTile * args.n_tiles;
    }
    int incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    int run = incl - mine;
    for (int g = g0; g < g1; ++g) {
      sh.tiles_before[g] = run;
      run += (sh.rows[g] + kTile - 1) / kTile * args.n_tiles;
    }
    if (lane == 31) sh.tiles_before[groups] = incl;
  }
  __syncthreads();
  const int total = sh.tiles_before[groups];

  if (warp >= kConsumers / 32) {  // the producer warpgroup: its registers go to the consumers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (tid == kConsumers) {
      Ring r;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const Tile x = tile_at(sh, groups, t);
        const int arow = x.row0 + x.mt * kTile, brow = x.g * p.n + x.nt * kTile;
        for (int kb = 0; kb < args.kb; ++kb, r.next()) {
          mbar_wait(smem_u32(&sh.empty[r.s]), r.phase ^ 1);
          const uint32_t full = smem_u32(&sh.full[r.s]), slot = stages + r.s * kStageBytes;
          mbar_arrive_expect_tx(full, kStageBytes);  // out-of-bounds parts are zero-filled and counted
          tma_load_2d(slot, &args.a, kb * kTile, arow, full);
          tma_load_2d(slot + kOperandBytes, &args.b, kb * kTile, brow, full);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns rows 64 wg .. 64 wg + 63 of each tile; this thread rows r and r + 8
  // of them (the wgmma accumulator layout), columns 8 j + 2 (lane % 4) + {0, 1} for j < 16.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp / 4, wt = tid % 128, r = (warp % 4) * 16 + lane / 4;
  const uint32_t eb = smem_u32(epilogue) + wg * kEpilogueBytes;
  Ring issue, done;
  float acc[64], t0[64], t1[64];
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const Tile x = tile_at(sh, groups, t);
    const int lr0 = x.mt * kTile + wg * 64;  // this warpgroup's first row inside the group
    // Scale rows past A's end are clamped: those rows are never stored.
    const int ra = min(x.row0 + lr0 + r, args.rows_a - 1), rb = min(x.row0 + lr0 + r + 8, args.rows_a - 1);
    const int ia = ra * args.kb, ib = rb * args.kb, iw = (x.g * args.nb + x.nt) * args.kb;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    const float *sa0 = p.sa + ia, *sa1 = p.sa + ib, *sb = p.sb + iw;
    const int kbs = args.kb;
    // Block kb in t0 while block kb + 1 goes into t1 and the other way round: each promotion runs
    // under the next block's wgmma. Steady state in pairs, the last one or two blocks peeled, so
    // every wait sees the same groups in flight on every path.
    const auto scales = [&](int kb) { return load_scales(sa0, sa1, sb, min(kb, kbs - 1)); };
    const auto issue_into = [&](float (&t)[64]) {
      issue_block(t, stages, sh, issue, wg);
      issue.next();
    };
    Scales c0 = scales(0), c1 = scales(1);
    issue_into(t0);
    int kb = 0;
    for (; kb + 2 < kbs; kb += 2) {
      Scales n0, n1;
      if constexpr (kAhead) n0 = scales(kb + 2), n1 = scales(kb + 3);
      else c0 = scales(kb), c1 = scales(kb + 1);
      issue_into(t1);
      finish<1>(acc, t0, c0, sh, done);
      issue_into(t0);
      finish<1>(acc, t1, c1, sh, done);
      if constexpr (kAhead) c0 = n0, c1 = n1;
    }
    if constexpr (!kAhead) c0 = scales(kb), c1 = scales(kb + 1);
    if (kb + 1 < kbs) {
      issue_into(t1);
      finish<1>(acc, t0, c0, sh, done);
      finish<0>(acc, t1, c1, sh, done);
    } else {
      finish<0>(acc, t0, c0, sh, done);
    }

    // Epilogue: bf16 into the swizzled staging tile (16-byte chunk c of row q at chunk c ^ (q % 8)),
    // then whole chunks of the group's rows to D. Shared addresses are 32-bit and formed at each
    // access (hoisted out of the tile loop, 24 of them spilled).
    named_sync(1 + wg, 128);  // the previous tile's chunks have been read
    // Bits 4-7 of the row's address are zero, so chunk j's address is one XOR with 16 j; the base is
    // formed opaquely in each tile (hoisted, the 32 addresses spilled).
    uint32_t frag = eb + r * 256 + (lane % 4) * 4 + (r & 7) * 16;
    asm volatile("" : "+r"(frag));
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      st_shared(frag ^ (j * 16), pack_bf16(acc[4 * j], acc[4 * j + 1]));
      st_shared((frag + 8 * 256) ^ (j * 16), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]));
    }
    named_sync(1 + wg, 128);
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p.d);
#pragma unroll 1
    for (int i = 0; i < 64 * 16 / 128; ++i) {
      const int idx = i * 128 + wt, q = idx / 16, c = idx % 16;
      const int lrow = lr0 + q, col = x.nt * kTile + c * 8;
      if (lrow < x.rows && col < p.n) {
        const uint4 v = ld_shared_v4(eb + q * 256 + ((c ^ (q & 7)) * 16));
        *reinterpret_cast<uint4*>(d + static_cast<int64_t>(x.row0 + lrow) * p.n + col) = v;
      }
    }
  }
}

// A 2-D e4m3 tensor [rows, k] (row stride k bytes) with 128 x 128 boxes and the 128-byte swizzle.
const char* make_tmap(CUtensorMap* map, const void* ptr, int rows, int k) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return "w128x128: cuTensorMapEncodeTiled not found in the driver";
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};
  const cuuint32_t box[2] = {kTile, kTile}, elem[2] = {1, 1};
  const CUresult res = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims, strides, box,
                              elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? nullptr : "w128x128: cuTensorMapEncodeTiled failed";
}

}  // namespace

namespace {
template <bool kAhead>
const char* run_w(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.num_groups < 1 || p.num_groups > kMaxGroups) return "w128x128: 1..1024 groups";
  Args args;
  args.p = p;
  args.rows_a = p.layout == GroupLayout::kMasked ? p.num_groups * p.m : p.m;
  args.kb = (p.k + kTile - 1) / kTile;
  args.nb = (p.n + kTile - 1) / kTile;
  args.n_tiles = args.nb;
  if (args.rows_a == 0 || p.n == 0) return nullptr;
  if (const char* e = make_tmap(&args.a, p.a, args.rows_a, p.k)) return e;
  if (const char* e = make_tmap(&args.b, p.b, p.num_groups * p.n, p.k)) return e;
  static const cudaError_t configured =
      cudaFuncSetAttribute(w128x128_kernel<kAhead>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (configured != cudaSuccess) return "w128x128: setting the kernel's shared memory size failed";
  // Enough CTAs for every tile the rows could make (each group's last tile may be partial), at most
  // one per SM.
  const int64_t m_tiles = p.layout == GroupLayout::kMasked
                              ? static_cast<int64_t>(p.num_groups) * ((p.m + kTile - 1) / kTile)
                              : (p.m + kTile - 1) / kTile + (p.layout == GroupLayout::kContiguous ? p.num_groups : 0);
  const int64_t bound = m_tiles * args.n_tiles;
  const int grid = static_cast<int>(bound < p.sm_count ? bound : p.sm_count);
  const cudaError_t launched = launch_pdl(w128x128_kernel<kAhead>, grid, kThreads, kSmemBytes, stream, args);
  return launched == cudaSuccess ? nullptr : "w128x128: kernel launch failed";
}

}  // namespace

size_t gemm_workspace_w128x128(int, int) { return 0; }
size_t gemm_workspace_w128x128a(int, int) { return 0; }
const char* gemm_run_w128x128(const GroupedGemmParams& p, cudaStream_t stream) { return run_w<false>(p, stream); }
const char* gemm_run_w128x128a(const GroupedGemmParams& p, cudaStream_t stream) { return run_w<true>(p, stream); }

}  // namespace nmoe::fp8
