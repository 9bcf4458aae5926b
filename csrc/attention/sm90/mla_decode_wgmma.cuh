// Absorbed MLA decode over the paged latent cache with Hopper `wgmma`, for 64 heads per CTA (the
// compute-bound case, H >= 64), with the deferred, eager and fenced schedules; the seesaw schedule
// (mla_decode_seesaw.cuh, the default there) builds on the primitives here. Same split-KV
// partition, same partial outputs and the same combine kernel as the mma.sync path, except that two
// splits of the eager (and seesaw) schedule merge in the kernel, as a 2-CTA cluster (merge_pair). The layouts, descriptors and fragment maps below were
// checked on the host against CuTe (tile_to_shape of GMMA::Layout_{K,MN}_SW128_Atom,
// make_gmma_desc, CLayout_64xN, ALayout_64x16); the barrier protocol against a randomized-interleaving
// model.
//
// CTA = (block of 64 heads, KV split, sequence), 256 threads:
//   WG0 (warps 0-3): S = Q K^T (64 heads x 64 tokens, K = 576, wgmma SS), the online softmax, and
//                    O[:, 0:256] += P V[:, 0:256] with P from registers (wgmma RS).
//   WG1 (warps 4-7): O[:, 256:512] += P V[:, 256:512] with P from shared memory (wgmma SS), and the
//                    cp.async loads of the cache tiles (zero-filled past the end).
// Each consumer warpgroup holds 64 x 256 fp32 accumulators (128 registers a thread); the whole
// 64 x 512 output would not fit in one warpgroup's registers, so the columns are split and only
// WG0 computes S (no exchange of partial scores). WG1 has the idle time to be the producer; a
// separate producer warp would cost a warpgroup's worth of registers (9 warps put 3 on one SM
// sub-partition: 168 registers a thread, and the 128 accumulators spill).
//
// Shared memory (1024-byte aligned, 229,952 bytes used):
//   Q     64 rows x 576 (73,728 B)           loaded once
//   KV    2 stages x 64 tokens x 576 (2 x 73,728 B)
//   P     64 heads x 64 tokens bf16 (8,192 B), written by WG0, read by WG1's wgmma
//   6 mbarriers, alpha[64], 1/l[64]
// Every 64-row matrix is stored as 9 column blocks of 64 columns (128 bytes a row), each block
// 64 rows x 128 B = 8 KB, in the 128-byte-swizzle layout of wgmma: element (row r, col c) of a
// block sits at  r*128 + (((c / 8) ^ (r % 8)) * 16) + (c % 8) * 2.  The XOR is what the hardware
// applies to address bits [4,7) with bits [7,10) (Swizzle<3,4,3>), so block bases must be 1024-byte
// aligned (descriptor base_offset 0).
//
// Two views of one KV tile (rows = tokens, columns = latent dims):
//   * K operand of S = Q K^T (B, "N x K", N = tokens, K = dims): K-major. For the k-step of dims
//     [16 kk', 16 kk' + 16) inside block cb: start = block + 32 * kk (kk = kk' % 4: the hardware adds
//     row*128 and chunk*16 to the start and XORs afterwards, so logical chunk 2kk + c of row r lands
//     on (2kk + c) ^ (r % 8), as stored); SBO = 1024 (next 8 rows), LBO unused (encoded 1).
//   * V operand of O += P V (B, "K x N", K = tokens, N = dims): MN-major (transposed, imm-trans-b
//     = 1). Canonical MN-major SW128 layout in 16-byte units ((8, n), (8, k)) : ((1, LBO), (8, SBO)):
//     64 contiguous dims per 128-byte row, the next 64 dims LBO = 8192 bytes away (next column
//     block), 8 token rows of 128 bytes, the next 8 tokens SBO = 1024 bytes away. For the k-step of
//     tokens [16 kk, 16 kk + 16): start = first block + 2048 * kk.
//   Q (A of S) and P (A of WG1's PV) are K-major like K.
//   Descriptor bits: [0,14) start >> 4, [16,30) LBO >> 4, [32,46) SBO >> 4, [49,52) base offset,
//   [62,64) swizzle (1 = 128 B).
//
// Register fragments (m64nNk16, per warpgroup thread t: warp w = t / 32 % 4, g = lane / 4,
// q = lane % 4):
//   accumulator d[4j + 2h + e] = D(row 16w + g + 8h, col 8j + 2q + e), j < N/8, h, e in {0, 1};
//   A (16-bit, registers) a[2i + h] = A(row 16w + g + 8h, k 8i + 2q .. 8i + 2q + 1), i, h in {0, 1}
//   (the low half holds the lower k). So the S accumulator of tokens [16kk, 16kk + 16) (n8 tiles
//   j = 2kk, 2kk + 1) is exactly the A fragment of k-step kk of P V after packing pairs:
//   a = {pack(d[8kk], d[8kk+1]), pack(d[8kk+2], d[8kk+3]), pack(d[8kk+4], d[8kk+5]), pack(d[8kk+6],
//   d[8kk+7])}. A row of S lives in one quad (4 lanes), so row max and sum need two shuffles.
//
// Pipeline per tile t (stage t % 2). A stage is refilled in two groups:
//   early = column blocks 0-3 and 8 (V[:, 0:256] and the rope dims: read by WG0 only), freed by
//           WG0 once PV_L(t) is done (mbarrier empty_e);
//   late  = column blocks 4-7 (V[:, 256:512]: read by WG0's QK and WG1's PV), freed by WG1 itself.
//   WG0: wait QK(t) (wgmma_wait 0); softmax -> P registers, alpha; O_L *= alpha; issue PV_L(t);
//        wait P_FREE (WG1 done with P(t-1)); store P(t), alpha(t); fence.proxy.async;
//        [eager: arrive P_FULL]; wait full_e/full_l(t+1), issue QK(t+1) (early blocks first);
//        [deferred: arrive P_FULL]; wgmma_wait 1 (PV_L(t) done) -> arrive empty_e(t).
//   WG1: sync P_FULL; wait full_l(t); O_R *= alpha(t); issue PV_R(t); wait empty_e(t) -> cp.async
//        the early group of tile t+2, arrive full_e; wgmma_wait 0 (PV_R(t) done); arrive P_FREE;
//        cp.async the late group of tile t+2, arrive full_l. Tiles 0 and 1 are loaded up front.
//   Each full barrier counts WG1's 128 cp.async.mbarrier.arrive.noinc (one per thread, fired when
//   that thread's copies have landed); a consumer waits on it, then issues wgmma (see consumer_fence).
//   "Deferred" (kDefer) lets WG1's PV_R(t) queue behind QK(t+1), so it runs while WG0 computes the
//   softmax of t+1 (no tensor-core bubble there), at the cost of holding the late blocks of tile t
//   longer (a shorter window to load tile t+2's late blocks). "Eager" arrives P_FULL as soon as
//   P(t) is stored. Both share the barrier protocol; which is faster is for the GPU to say.
//   No cycle: WG1's iteration t needs WG0's iteration t (P_FULL, empty_e); WG0's iteration t needs
//   only WG1's iteration t-1 (P_FREE(t-1), the loads of tile t+1).
//
// Online softmax (base 2): s = S * scale * log2(e), masked to -inf past the end; m' = max(m,
// rowmax s), except that m stays (m' = m) while max(m, rowmax s) - m <= p.rescale_slack (8 by
// default: then p <= 2^8, exact in its exponent for bf16 and nowhere near fp32's range; 0 gives the
// exact online max); alpha = 2^(m - m') (exactly 1 where m stays, 0 on the first tile, m = -inf);
// p = 2^(s - m'); l = alpha l + sum p; O = alpha O + P V with P rounded to bf16. A warp skips the
// 128 multiplies of O's rescale when all its rows kept their max, which after the first tiles is
// nearly always (the lse, m ln 2 + ln l, is the same whichever m the sums were taken against).
// Every tile of a split holds at least one valid token, so m' is finite after the first tile;
// padded heads (>= H) have zero Q rows, S = 0.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "attention/params.h"
#include "attention/sm90/split_merge.cuh"
#include "pdl.cuh"

namespace nmoe::attention::sm90_wgmma {

constexpr int kHeads = 64;                    // heads per CTA (wgmma M)
constexpr int kTileN = 64;                    // cached tokens per tile
constexpr int kThreads = 256;                 // two warpgroups
constexpr int kBlockBytes = 64 * 128;         // one 64-column block of 64 rows: 8 KB
constexpr int kBlocks = kHeadDim / 64;        // 9 column blocks per row (8 latent + 1 rope)
constexpr int kRopeBlock = kBlocks - 1;
constexpr int kTileBytes = kBlocks * kBlockBytes;  // 73,728
static_assert(kHeadDim % 64 == 0 && kLoraRank == 512, "layout assumes 512 + 64 columns");

constexpr int kSmemQ = 0;
constexpr int kSmemKv = kSmemQ + kTileBytes;
constexpr int kSmemP = kSmemKv + 2 * kTileBytes;
constexpr int kSmemBar = kSmemP + kBlockBytes;  // full_e[2], full_l[2], empty_e[2]
constexpr int kSmemAlpha = kSmemBar + 8 * 8;
constexpr int kSmemInv = kSmemAlpha + kHeads * 4;
constexpr int kSmemLse = kSmemInv + kHeads * 4;  // this CTA's lse per head (paired splits)
constexpr int kSmemUsed = kSmemLse + kHeads * 4;
// Paired splits: split 1's normalized output (64 x 512 fp32) and lse, received by split 0 in its KV
// stages (free once its tile loop is done).
constexpr int kSmemPartnerOut = kSmemKv;
constexpr int kSmemPartnerLse = kSmemPartnerOut + kHeads * kLoraRank * 4;
static_assert(kSmemPartnerLse + kHeads * 4 <= kSmemP, "the partner's output fits in the KV stages");
constexpr int kSmemBytes = kSmemUsed + 1024;  // slack to align the base to 1024 bytes
static_assert(kSmemBytes <= 232448, "over the sm90 opt-in shared-memory limit");

// mbarrier slots (index = kind + stage)
constexpr int kFullEarly = 0, kFullLate = 2, kEmptyEarly = 4;
// named barriers (0 is __syncthreads)
constexpr int kNbPFull = 1, kNbPFree = 2, kNbEpilogue = 3, kNbQ = 4;
constexpr int kConsumers = 256;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- asynchronous copies and barriers -------------------------------------------------------

// 16-byte cp.async; `valid` false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// The mbarrier receives one arrival once all earlier cp.async of this thread have landed.
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier counts its phase of
// parity 1 as completed, which lets the producer pass its first waits on the empty barriers).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Orders this thread's generic-proxy writes to shared memory before later async-proxy (wgmma)
// reads of them (after a barrier, by any thread): used by the writers of P and Q.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// All threads of the cluster: release this thread's earlier (distributed) shared-memory writes,
// acquire the others'.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The address of this CTA's shared-memory location `addr` in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t cluster_peer(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
__device__ __forceinline__ void st_cluster(uint32_t addr, float4 v) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}
__device__ __forceinline__ void st_cluster(uint32_t addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}

// The cache tiles come from cp.async and complete on an mbarrier; like CUTLASS's cp.async + GMMA
// mainloops, the consumers issue wgmma right after the mbarrier wait, without a proxy fence (it
// costs a MEMBAR.ALL.CTA, and WG1 has its own cp.async in flight at that point). kFence (variant
// 3, a diagnostic) adds one after every such wait.
template <bool kFence>
__device__ __forceinline__ void consumer_fence() {
  if constexpr (kFence) fence_proxy_async();
}

// ---- wgmma ----------------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving uses of wgmma operand registers across the fence/wait asm.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <int N>
__device__ __forceinline__ void reg_fence(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(x[i]);
}

// Hides a value's origin from the optimizer: descriptors derived from it are recomputed where they
// are used instead of being hoisted out of the tile loop (36 loop-invariant 64-bit descriptors would
// need 72 registers and spill).
__device__ __forceinline__ uint64_t opaque(uint64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// K-major operand, 128-byte swizzle: LBO unused (1), SBO = 1024 bytes (next 8 rows).
__device__ __forceinline__ uint64_t desc_k_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
// MN-major operand, 128-byte swizzle: LBO = 8192 bytes (next 64 MN elements = next column block),
// SBO = 1024 bytes (next 8 K rows).
__device__ __forceinline__ uint64_t desc_mn_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (512ull << 16) | (64ull << 32) | (1ull << 62);
}

// Accumulator operand lists: "+f" (read and written) or "=f" (written only, for scale-d = 0).
#define NMOE_F4(c, d, i) c(d[(i)]), c(d[(i) + 1]), c(d[(i) + 2]), c(d[(i) + 3])
#define NMOE_F16(c, d, i) NMOE_F4(c, d, i), NMOE_F4(c, d, (i) + 4), NMOE_F4(c, d, (i) + 8), NMOE_F4(c, d, (i) + 12)
#define NMOE_F32(c, d, i) NMOE_F16(c, d, i), NMOE_F16(c, d, (i) + 16)
#define NMOE_F128(c, d) NMOE_F32(c, d, 0), NMOE_F32(c, d, 32), NMOE_F32(c, d, 64), NMOE_F32(c, d, 96)
#define NMOE_R32                                                                  \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NMOE_R128                                                                                          \
  NMOE_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "   \
           "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, " \
           "%69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, " \
           "%88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, " \
           "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, " \
           "%122, %123, %124, %125, %126, %127"

// Operands after the accumulators: A (descriptor or 4 registers), B descriptor, scale-d (0: D = A B,
// 1: D += A B; an immediate, so ptxas sees where an accumulator chain starts), imm-scale-a/b (1: no
// negation), imm-trans-a (SS only) and imm-trans-b (0: K-major, 1: MN-major).
//
// S[64 x 64] = Q[64 x 16] K[64 x 16]^T (first k-step: the accumulators are only written), and
// S += ... for the others; Q and K K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64k16_ss_first(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" NMOE_R32 "}, %32, %33, 0, 1, 1, 0, 0;\n"
               : NMOE_F32("=f", d, 0)
               : "l"(desc_a), "l"(desc_b));
}
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" NMOE_R32 "}, %32, %33, 1, 1, 1, 0, 0;\n"
               : NMOE_F32("+f", d, 0)
               : "l"(desc_a), "l"(desc_b));
}
// O[64 x 256] += P[64 x 16] V[16 x 256]: P in registers, V MN-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" NMOE_R128
               "}, {%128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
               : NMOE_F128("+f", d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
// O[64 x 256] += P[64 x 16] V[16 x 256]: P K-major and V MN-major, both in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" NMOE_R128 "}, %128, %129, 1, 1, 1, 0, 1;\n"
               : NMOE_F128("+f", d)
               : "l"(desc_a), "l"(desc_b));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- roles ----------------------------------------------------------------------------------

// Cache rows of one tile for WG1 thread wt (0..127): rows rs + 16k (k < 4, rs = wt / 8), 16-byte
// chunk c8 = wt % 8 of every 128-byte column-block row; one warp instruction covers 4 rows x 128
// bytes (whole lines of the cache, all 32 banks of each destination row). Only block-table entries
// of tokens < len are read; rows past the end are zero-filled, so nothing from a poisoned slot or a
// padded block-table entry reaches shared memory.
struct TileRows {
  const __nv_bfloat16* src[4];
  uint32_t valid;
};

__device__ __forceinline__ TileRows tile_rows(const MlaDecodeParams& p, const int32_t* bt_row, int tile, int len,
                                              int wt) {
  const auto* cache = static_cast<const __nv_bfloat16*>(p.cache);
  TileRows t;
  t.valid = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int tok = tile * kTileN + wt / 8 + 16 * k;
    t.src[k] = cache + (wt % 8) * 8;
    if (tok < len) {
      const int page = __ldg(bt_row + tok / p.page_size);
      t.src[k] += page * p.page_stride + static_cast<int64_t>(tok % p.page_size) * p.token_stride;
      t.valid |= 1u << k;
    }
  }
  return t;
}

// cp.async of column blocks [cb0, cb0 + nb) (and the rope block if `rope`) of a tile into a stage,
// then the arrival on `full` that fires when this thread's copies have landed.
__device__ __forceinline__ void load_group(const TileRows& t, uint32_t stage, int wt, int cb0, int nb, bool rope,
                                           uint32_t full) {
  const int rs = wt / 8, c8 = wt % 8;
#pragma unroll
  for (int e = 0; e < 5; ++e) {
    if (e >= nb && !(e == 4 && rope)) continue;
    const int cb = e < nb ? cb0 + e : kRopeBlock;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = rs + 16 * k;
      cp_async16(stage + cb * kBlockBytes + r * 128 + ((c8 ^ (r & 7)) << 4), t.src[k] + cb * 64, (t.valid >> k) & 1);
    }
  }
  cp_async_arrive_noinc(full);
}
__device__ __forceinline__ void load_early(const TileRows& t, uint32_t stage, int wt, uint32_t bars, int st) {
  load_group(t, stage, wt, 0, 4, true, bars + (kFullEarly + st) * 8);
}
__device__ __forceinline__ void load_late(const TileRows& t, uint32_t stage, int wt, uint32_t bars, int st) {
  load_group(t, stage, wt, 4, 4, false, bars + (kFullLate + st) * 8);
}

// S = Q K^T over the 576 dims of one tile: 36 k-steps of m64n64k16, the early column blocks (0-3,
// rope) first so that they can start before the late blocks (4-7) have landed.
template <bool kFence>
__device__ __forceinline__ void issue_qk(float (&s)[32], uint32_t q_smem, uint32_t stage, uint32_t bars, int st,
                                         uint32_t parity) {
  const uint64_t dq = opaque(desc_k_sw128(q_smem)), dk = opaque(desc_k_sw128(stage));
  mbar_wait(bars + (kFullEarly + st) * 8, parity);
  consumer_fence<kFence>();
  wgmma_fence();
#pragma unroll
  for (int e = 0; e < 5; ++e) {
    const int cb = e < 4 ? e : kRopeBlock;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = (cb * kBlockBytes + kk * 32) >> 4;
      if (e == 0 && kk == 0)
        wgmma_m64n64k16_ss_first(s, dq + off, dk + off);
      else
        wgmma_m64n64k16_ss(s, dq + off, dk + off);
    }
  }
  mbar_wait(bars + (kFullLate + st) * 8, parity);
  consumer_fence<kFence>();
#pragma unroll
  for (int cb = 4; cb < 8; ++cb) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = (cb * kBlockBytes + kk * 32) >> 4;
      wgmma_m64n64k16_ss(s, dq + off, dk + off);
    }
  }
  wgmma_commit();
}

// Writes this thread's part of a 64 x 256 output half: rows 16w + g (+8), columns col0 + 8j + 2q.
// final_out: the bf16 out, else this split's fp32 partial.
__device__ __forceinline__ void store_out(const MlaDecodeParams& p, const float (&o)[128], int b, int split,
                                          int h0, int row0, int col0, float inv0, float inv1, bool final_out) {
  const int q4 = threadIdx.x % 4;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int h = h0 + row0 + 8 * hh;
    if (h >= p.heads) continue;
    const float inv = hh ? inv1 : inv0;
    if (final_out) {
      auto* out = static_cast<__nv_bfloat16*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * kLoraRank + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<uint32_t*>(out + 8 * j + 2 * q4) = pack_bf16(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    } else {
      float* out = p.part_out + ((static_cast<int64_t>(b) * p.num_splits + split) * p.heads + h) * kLoraRank + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(out + 8 * j + 2 * q4) = make_float2(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    }
  }
}

// The tiles of KV split `split` of sequence b: [t_begin, t_begin + n) of its ntiles tiles (n <= 0:
// none). Paired splits exchange only when split 1 holds tiles; otherwise split 0 has the whole
// sequence and writes the final out and lse itself, and split 1 (empty) writes nothing.
struct SplitTiles {
  int len, t_begin, n;
  bool exchange;   // paired, and both splits hold tiles: merge_pair
  bool final_out;  // this CTA writes the bf16 out and the lse (else its split's partials)
};
__device__ __forceinline__ SplitTiles split_tiles(const MlaDecodeParams& p, int b, int split, bool pair) {
  SplitTiles t;
  t.len = min(max(p.seq_lens[b], 0), p.max_pages * p.page_size);
  const int ntiles = (t.len + kTileN - 1) / kTileN;
  const int per_split = (ntiles + p.num_splits - 1) / p.num_splits;
  t.t_begin = split * per_split;
  t.n = min(ntiles, t.t_begin + per_split) - t.t_begin;
  t.exchange = pair && ntiles > per_split;
  t.final_out = p.num_splits == 1 || (pair && !t.exchange);
  return t;
}

// An empty split (or an empty sequence): zeros and -inf, into the final out and lse or into this
// split's partials. Every thread of the CTA calls it.
__device__ __forceinline__ void write_empty_split(const MlaDecodeParams& p, int b, int split, int h0, bool final_out) {
  const int tid = threadIdx.x;
  const float ninf = -__int_as_float(0x7f800000);
  for (int i = tid; i < kHeads * kLoraRank; i += kThreads) {
    const int h = h0 + i / kLoraRank, c = i % kLoraRank;
    if (h >= p.heads) continue;
    if (final_out)
      static_cast<__nv_bfloat16*>(p.out)[(static_cast<int64_t>(b) * p.heads + h) * kLoraRank + c] = __float2bfloat16(0.f);
    else
      p.part_out[((static_cast<int64_t>(b) * p.num_splits + split) * p.heads + h) * kLoraRank + c] = 0.f;
  }
  if (tid < kHeads && h0 + tid < p.heads) {
    if (final_out)
      p.lse[static_cast<int64_t>(b) * p.heads + h0 + tid] = ninf;
    else
      p.part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.heads + h0 + tid] = ninf;
  }
}

// Paired splits (both splits of this sequence hold tiles): split 1 sends its normalized output and
// lse into split 0's free KV stages; split 0 merges them with its own as the combine kernel merges
// two partials (split_weight, merged_lse, the same operations in the same order) and writes out and
// lse. (The results still differ from the combine path's in the last bits: ptxas contracts a few
// multiply-adds of the tile loop differently in this instantiation.) Every thread of both CTAs calls it (two cluster barriers). The cluster
// is (1, 2, 1) over the grid's split dimension, so the cluster rank is the split.
__device__ __forceinline__ void merge_pair(const MlaDecodeParams& p, float (&o)[128], const uint8_t* smem,
                                           uint32_t sbase, int b, int split, int h0, int row0, int col0,
                                           float inv0, float inv1, bool lse_writer, int lse_off = kSmemLse) {
  const int tid = threadIdx.x;
  const float* s_lse = reinterpret_cast<const float*>(smem + lse_off);  // this CTA's lse per head
  cluster_sync();  // split 0 is done with its stages; both CTAs' s_lse are written
  if (split == 1) {
    const uint32_t dst = cluster_peer(sbase + kSmemPartnerOut, 0);
#pragma unroll
    for (int j = 0; j < 32; ++j)  // thread-interleaved 16-byte slots: a warp's stores are contiguous
      st_cluster(dst + (j * kThreads + tid) * 16,
                 make_float4(o[4 * j] * inv0, o[4 * j + 1] * inv0, o[4 * j + 2] * inv1, o[4 * j + 3] * inv1));
    if (tid < kHeads) st_cluster(cluster_peer(sbase + kSmemPartnerLse, 0) + tid * 4, s_lse[tid]);
  }
  cluster_sync();  // split 1's output has landed in split 0
  if (split == 1) return;
  const auto* part = reinterpret_cast<const float4*>(smem + kSmemPartnerOut);
  const auto* part_lse = reinterpret_cast<const float*>(smem + kSmemPartnerLse);
  float w_own[2], w_part[2], inv_total[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + 8 * hh;
    const float mx = fmaxf(fmaxf(-__int_as_float(0x7f800000), s_lse[row]), part_lse[row]);
    w_own[hh] = split_weight(s_lse[row], mx), w_part[hh] = split_weight(part_lse[row], mx);
    float total = 0.f;
    if (w_own[hh] != 0.f) total += w_own[hh];
    if (w_part[hh] != 0.f) total += w_part[hh];
    inv_total[hh] = total > 0.f ? 1.f / total : 0.f;
    if (lse_writer && h0 + row < p.heads) p.lse[static_cast<int64_t>(b) * p.heads + h0 + row] = merged_lse(mx, total);
  }
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const float4 v = part[j * kThreads + tid];
    const float pv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e >> 1;
      const float own = o[4 * j + e] * (hh ? inv1 : inv0);
      float acc = 0.f;
      if (w_own[hh] != 0.f) acc += w_own[hh] * own;
      if (w_part[hh] != 0.f) acc += w_part[hh] * pv[e];
      o[4 * j + e] = acc;
    }
  }
  store_out(p, o, b, 0, h0, row0, col0, inv_total[0], inv_total[1], true);
}

template <bool kDefer, bool kFence, bool kPair>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_wgmma_kernel(const __grid_constant__ MlaDecodeParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // wgmma needs the sm_90a target
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_u32(smem);
  const uint32_t bars = sbase + kSmemBar;
  float* s_alpha = reinterpret_cast<float*>(smem + kSmemAlpha);
  float* s_inv = reinterpret_cast<float*>(smem + kSmemInv);

  const int split = blockIdx.y, b = blockIdx.z;
  const int h0 = blockIdx.x * kHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SplitTiles sp = split_tiles(p, b, split, kPair);
  const int len = sp.len, t_begin = sp.t_begin, n = sp.n;
  const bool exchange = sp.exchange, final_out = sp.final_out;
  const float ninf = -__int_as_float(0x7f800000);
  if (n <= 0) {  // empty split (or empty sequence): zeros and -inf
    if (!(kPair && split == 1)) write_empty_split(p, b, split, h0, final_out);
    return;
  }

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      mbar_init(bars + (kFullEarly + s) * 8, 128);  // one cp.async arrival per WG1 thread
      mbar_init(bars + (kFullLate + s) * 8, 128);
      mbar_init(bars + (kEmptyEarly + s) * 8, 4);   // lane 0 of each WG0 warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int g = lane / 4, q4 = lane % 4;
  const int row0 = 16 * (warp % 4) + g, row1 = row0 + 8;  // this thread's two accumulator rows
  const uint32_t p_smem = sbase + kSmemP;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;

  if (warp < 4) {
    // ---------------- WG0: Q K^T, softmax, O[:, 0:256] ----------------
    {  // Q rows (padded heads zero-filled): thread copies chunk tid % 8 of rows tid / 8 + 16k.
      const auto* qb = static_cast<const __nv_bfloat16*>(p.q) + b * p.q_batch_stride;
      const int rs = tid / 8, c8 = tid % 8;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int r = rs + 16 * k;
        const bool valid = h0 + r < p.heads;
        const __nv_bfloat16* src = (valid ? qb + (h0 + r) * p.q_head_stride : qb) + c8 * 8;
#pragma unroll
        for (int cb = 0; cb < kBlocks; ++cb)
          cp_async16(sbase + kSmemQ + cb * kBlockBytes + r * 128 + ((c8 ^ (r & 7)) << 4), src + cb * 64, valid);
      }
      asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
      fence_proxy_async();
      named_sync(kNbQ, 128);
    }
    const uint32_t q_smem = sbase + kSmemQ;
    uint8_t* p_gen = smem + kSmemP;
    float s[32];  // S of the current tile, written by wgmma only
    uint32_t pa[4][4];
    float m0 = ninf, m1 = ninf, l0 = 0.f, l1 = 0.f;
    reg_fence(o);  // the zero-fill of the accumulators stays ahead of the first wgmma

    issue_qk<kFence>(s, q_smem, sbase + kSmemKv, bars, 0, 0);
    for (int i = 0; i < n; ++i) {
      const int tile = t_begin + i, st = i & 1;
      const uint32_t stage = sbase + kSmemKv + st * kTileBytes;
      wgmma_wait<0>();  // S(t) (and PV_L(t-1)) complete
      reg_fence(s);
      reg_fence(o);

      // scale to base 2, mask the tail, row max over the quad
      const int tok0 = tile * kTileN + 2 * q4;
      const bool partial = tile * kTileN + kTileN > len;
      // (the softmax works on copies: S itself is only ever written by wgmma, which keeps ptxas
      // from serializing the wgmma pipeline)
      float x[32];
      float mx0 = m0, mx1 = m1;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[4 * j + e] * p.scale_log2;
          if (partial && tok0 + 8 * j + (e & 1) >= len) v = ninf;
          x[4 * j + e] = v;
          if (e < 2)
            mx0 = fmaxf(mx0, v);
          else
            mx1 = fmaxf(mx1, v);
        }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      // lazy rescale: the running max stays while the tile's exceeds it by at most the slack
      // (m = -inf on the first tile: inf > slack, so the first max is always taken)
      const bool keep0 = mx0 - m0 <= p.rescale_slack, keep1 = mx1 - m1 <= p.rescale_slack;
      if (keep0) mx0 = m0;
      if (keep1) mx1 = m1;
      const float a0 = keep0 ? 1.f : ex2(m0 - mx0), a1 = keep1 ? 1.f : ex2(m1 - mx1);  // 0 on the first tile
      m0 = mx0, m1 = mx1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pv = ex2(x[4 * j + e] - (e < 2 ? mx0 : mx1));
          x[4 * j + e] = pv;
          if (e < 2)
            sum0 += pv;
          else
            sum1 += pv;
        }
      l0 = l0 * a0 + sum0, l1 = l1 * a1 + sum1;  // per-thread partial sums, quad-reduced at the end
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = pack_bf16(x[8 * kk + 0], x[8 * kk + 1]);
        pa[kk][1] = pack_bf16(x[8 * kk + 2], x[8 * kk + 3]);
        pa[kk][2] = pack_bf16(x[8 * kk + 4], x[8 * kk + 5]);
        pa[kk][3] = pack_bf16(x[8 * kk + 6], x[8 * kk + 7]);
      }
      // O is rescaled only where a row of the warp moved its max (O is still zero on the first tile)
      if (i > 0 && __any_sync(0xffffffffu, !(keep0 && keep1))) {
#pragma unroll
        for (int j = 0; j < 32; ++j) o[4 * j] *= a0, o[4 * j + 1] *= a0, o[4 * j + 2] *= a1, o[4 * j + 3] *= a1;
      }

      // O[:, 0:256] += P V[:, 0:256] (column blocks 0-3 of this stage)
      wgmma_fence();
      const uint64_t dv = opaque(desc_mn_sw128(stage));
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs(o, pa[kk], dv + ((kk * 2048) >> 4));
      wgmma_commit();

      // P(t) and alpha(t) for WG1, once it is done with P(t-1)
      if (i > 0) named_sync(kNbPFree, kConsumers);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * kk + jj;
          *reinterpret_cast<uint32_t*>(p_gen + row0 * 128 + ((j ^ g) << 4) + 4 * q4) = pa[kk][2 * jj];
          *reinterpret_cast<uint32_t*>(p_gen + row1 * 128 + ((j ^ g) << 4) + 4 * q4) = pa[kk][2 * jj + 1];
        }
      }
      if (q4 == 0) s_alpha[row0] = a0, s_alpha[row1] = a1;
      fence_proxy_async();  // P is read next by WG1's wgmma (async proxy)
      if (!kDefer || i + 1 == n) named_arrive(kNbPFull, kConsumers);

      if (i + 1 < n) {
        issue_qk<kFence>(s, q_smem, sbase + kSmemKv + (st ^ 1) * kTileBytes, bars, st ^ 1, ((i + 1) >> 1) & 1);
        if (kDefer) named_arrive(kNbPFull, kConsumers);
        wgmma_wait<1>();  // PV_L(t) complete; QK(t+1) may still run
      } else {
        wgmma_wait<0>();
      }
      reg_fence(o);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) reg_fence(pa[kk][r]);
      if (lane == 0) mbar_arrive(bars + (kEmptyEarly + st) * 8);  // early blocks of this stage are free
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;  // l >= 1: the max element contributes 2^0
    if (q4 == 0) {
      s_inv[row0] = inv0, s_inv[row1] = inv1;
      const float lse0 = m0 * 0.6931471805599453f + logf(l0), lse1 = m1 * 0.6931471805599453f + logf(l1);
      if (exchange) {
        float* s_lse = reinterpret_cast<float*>(smem + kSmemLse);
        s_lse[row0] = lse0, s_lse[row1] = lse1;
      } else {
        float* lse_out = final_out ? p.lse + static_cast<int64_t>(b) * p.heads
                                   : p.part_lse + (static_cast<int64_t>(b) * p.num_splits + split) * p.heads;
        if (h0 + row0 < p.heads) lse_out[h0 + row0] = lse0;
        if (h0 + row1 < p.heads) lse_out[h0 + row1] = lse1;
      }
    }
    named_arrive(kNbEpilogue, kConsumers);
    if (exchange)
      merge_pair(p, o, smem, sbase, b, split, h0, row0, 0, inv0, inv1, q4 == 0);
    else
      store_out(p, o, b, split, h0, row0, 0, inv0, inv1, final_out);
  } else {
    // ---------------- WG1: O[:, 256:512] and the cache loads ----------------
    const int wt = tid - 128;
    const int32_t* bt_row = p.block_table + b * p.block_table_stride;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // tiles 0 and 1 into empty stages
      if (i < n) {
        const TileRows rows = tile_rows(p, bt_row, t_begin + i, len, wt);
        load_early(rows, sbase + kSmemKv + i * kTileBytes, wt, bars, i);
        load_late(rows, sbase + kSmemKv + i * kTileBytes, wt, bars, i);
      }
    }
    reg_fence(o);
    for (int i = 0; i < n; ++i) {
      const int st = i & 1;
      const uint32_t stage = sbase + kSmemKv + st * kTileBytes;
      const uint32_t parity = (i >> 1) & 1;
      named_sync(kNbPFull, kConsumers);                 // P(t), alpha(t) stored (so S(t) is done)
      mbar_wait(bars + (kFullLate + st) * 8, parity);   // V[:, 256:512] of tile t landed
      consumer_fence<kFence>();
      const float a0 = s_alpha[row0], a1 = s_alpha[row1];  // exactly 1 where WG0 kept the max
      if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
        for (int j = 0; j < 32; ++j) o[4 * j] *= a0, o[4 * j + 1] *= a0, o[4 * j + 2] *= a1, o[4 * j + 3] *= a1;
      }
      wgmma_fence();
      const uint64_t dv = opaque(desc_mn_sw128(stage + 4 * kBlockBytes));
      const uint64_t dp = opaque(desc_k_sw128(p_smem));
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss(o, dp + ((kk * 32) >> 4), dv + ((kk * 2048) >> 4));
      wgmma_commit();
      const bool refill = i + 2 < n;
      TileRows rows{};
      if (refill) {  // tile t+2 into this stage: the early blocks as soon as WG0 is done with them
        rows = tile_rows(p, bt_row, t_begin + i + 2, len, wt);
        mbar_wait(bars + (kEmptyEarly + st) * 8, parity);
        load_early(rows, stage, wt, bars, st);
      }
      wgmma_wait<0>();  // PV_R(t) complete: P, alpha and the late blocks of this stage are free
      reg_fence(o);
      if (i + 1 < n) named_arrive(kNbPFree, kConsumers);
      if (refill) load_late(rows, stage, wt, bars, st);
    }
    named_sync(kNbEpilogue, kConsumers);
    if (exchange)
      merge_pair(p, o, smem, sbase, b, split, h0, row0, 256, s_inv[row0], s_inv[row1], false);
    else
      store_out(p, o, b, split, h0, row0, 256, s_inv[row0], s_inv[row1], final_out);
  }
#endif
}

#undef NMOE_F4
#undef NMOE_F16
#undef NMOE_F32
#undef NMOE_F128
#undef NMOE_R32
#undef NMOE_R128

}  // namespace nmoe::attention::sm90_wgmma
