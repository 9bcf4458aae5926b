// Absorbed MLA decode with Hopper `wgmma` in the "seesaw" schedule (variant 4, NMOE_MLA_WGMMA=4):
// the two warpgroups take alternate tiles of a pair, so that one's softmax runs while the tensor
// cores do the other's matrix products (the schedule FlashMLA describes in its 2025 deep dive; this
// is our own implementation on the primitives of mla_decode_wgmma.cuh). Same CTA (64 heads, KV split,
// sequence), split partition, partial outputs, combine kernel and paired-split merge as the eager
// wgmma kernel; only the tile loop differs.
//
// Why: in the eager kernel WG0 computes every S = Q K^T and every softmax, and nothing hides the
// softmax's latency (one tile: ~2,170 tensor cycles of work, ~4,200 measured). Here each pair of
// tiles (t0 in stage 0, t1 in stage 1) is split between the warpgroups, both holding one 64 x 256
// half of O (WG0 columns 0-255 = "L", WG1 256-511 = "R"):
//   WG0: S0 = Q K0^T; softmax against the running max m -> m0, scale0 = 2^(m - m0), P0 (-> shared);
//        O_L *= scale0; O_L += P0 V0_L (P0 from registers); once WG1 has published scale1 =
//        2^(m0 - m1) and P1: O_L *= scale1; O_L += P1 V1_L (P1 from shared).
//   WG1: S1 = Q K1^T; once WG0 has published m0, scale0 and P0: O_R *= scale0; O_R += P0 V0_R (P0
//        from shared), and while that runs the softmax against m0 -> m1, scale1, P1 (-> shared);
//        O_R *= scale1 (rare: only when a row's max moved again, after waiting for P0 V0_R);
//        O_R += P1 V1_R (registers).
// So O_L = (O_L scale0 + P0 V0_L) scale1 + P1 V1_L and O_R the same, both relative to m1; l is kept
// per warpgroup (WG0 the sums of P0, WG1 of P1, each scaled like its O) and added at the end. With
// the lazy rescale (rescale_slack, as in the eager kernel) the scales are exactly 1 nearly always,
// and every multiply by them is skipped per warp. Both PVs of t0 are issued as soon as P0 exists, so
// stage 0 is free (and refilled) early, under the PVs of t1.
//
// Tensor work per pair and warpgroup: one QK (36 k-steps of m64n64k16) and two PV halves (8 of
// m64n256k16): balanced, where the eager kernel gave all QKs to WG0.
//
// Shared memory (1024-byte aligned, 224,912 bytes used): Q 64 x 576, two KV stages of 64 tokens, 18
// mbarriers (one per column block and stage), per head m, scale0, scale1, l (WG0's), 1/l, lse, and
// the cache rows of the next pairs (kSsSmemRows). P0 and P1 go into the rope blocks (column block
// 8) of their own tiles' stages: free once that tile's QK is done, and refilled only after the last
// reader of P (see the loads below). (FlashMLA instead keeps Q's rope block in registers and P1 in
// its place; that costs 16 registers a thread, which here spilled.)
//
// Loads: cp.async by the warpgroup that frees the blocks, one mbarrier per (stage, column block)
// counting that warpgroup's 128 arrivals (cp.async.mbarrier.arrive.noinc after each block's copies,
// in order, so a block's barrier fires once its copies - and the earlier ones - have landed):
//   stage 0: WG0 loads blocks 0-3 (V0_L, last read by its PV0_L), WG1 blocks 4-8 (V0_R and P0, last
//            read by its PV0_R);
//   stage 1: WG0 loads blocks 0-3 and 8 (V1_L and P1, last read by its PV1_L), WG1 blocks 4-7 (V1_R,
//            last read by its PV1_R).
//   (A tile's QK, its other reader, is done before the softmax that publishes its P.) So the next
//   pair's blocks are loaded as soon as their last reader is done, by that reader's warpgroup, with
//   no empty barriers; the QKs consume blocks in the order they are freed (WG0: 0-3 then 4-8; WG1:
//   4-7, then 0-3 and 8). The rows come from shared memory (kSsSmemRows): a block-table read at a
//   load point put its latency on the critical path (measured: 58 against 49 us at 32 x 2000).
// A pair past the split's last tile (odd tile counts) gets a phantom second tile: zero-filled (no
// reads) and masked to -inf, so p = 0 and it adds nothing.
//
// Two named barriers between the warpgroups, each with one arrive side and one sync side; every
// arrive of iteration k+1 follows a sync on the other warpgroup's arrive of iteration k, so an
// instance completes before the next starts: SCALE0 (WG0 wrote m0, scale0 and P0, fenced) and
// SCALE1 (WG1 wrote m1, scale1 and P1, fenced, and the rows of the pair after next). The buffers
// they do not order are ordered by the loads: P0's block is refilled by WG1 after its PV0_R, and
// WG0 writes the next P0 only after the QK that waited for that refill (P1 likewise, with WG0's
// PV1_L and WG1's QK).
#pragma once

#include "attention/sm90/mla_decode_wgmma.cuh"

namespace nmoe::attention::sm90_seesaw {

using namespace sm90_wgmma;  // the primitives, descriptors, fragment maps and epilogue

constexpr int kSsSmemBar = kSmemKv + 2 * kTileBytes;  // 18 mbarriers: stage * kBlocks + block
constexpr int kSsSmemM = kSsSmemBar + 2 * kBlocks * 8;
constexpr int kSsSmemScale0 = kSsSmemM + kHeads * 4;
constexpr int kSsSmemScale1 = kSsSmemScale0 + kHeads * 4;
constexpr int kSsSmemL = kSsSmemScale1 + kHeads * 4;
constexpr int kSsSmemInv = kSsSmemL + kHeads * 4;
constexpr int kSsSmemLse = kSsSmemInv + kHeads * 4;
// Cache rows of a pair: element offsets of its 2 x 64 tokens (-1: past the end, zero-filled),
// double-buffered by pair parity. Pair j's are written by WG1 (one token a thread) in iteration
// j - 2, its block-table read under the waits of that iteration, and read by the loaders in
// iteration j - 1, so that no loader waits for a block-table read at its load point.
constexpr int kSsSmemRows = kSsSmemLse + kHeads * 4;
constexpr int kSsSmemUsed = kSsSmemRows + 2 * 2 * kTileN * 8;
constexpr int kSsSmemBytes = kSsSmemUsed + 1024;  // slack to align the base to 1024 bytes
static_assert(kSsSmemBytes <= 232448, "over the sm90 opt-in shared-memory limit");
static_assert(kSmemPartnerLse + kHeads * 4 <= kSsSmemBar, "the partner's output fits in the KV stages");

// named barriers (0 is __syncthreads; 3 and 4 as in the eager kernel)
constexpr int kNbScale0 = 5, kNbScale1 = 6, kNbAll = 7;

// The 4 k-steps of column block CB of S = Q K^T, once the block has landed; the first k-step of the
// whole product (kFirst) only writes the accumulators.
template <int CB, bool kFirst>
__device__ __forceinline__ void qk_block(float (&s)[32], uint64_t dq, uint64_t dk, uint32_t bar, uint32_t parity) {
  mbar_wait(bar, parity);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t off = (CB * kBlockBytes + kk * 32) >> 4;
    if (kFirst && kk == 0)
      wgmma_m64n64k16_ss_first(s, dq + off, dk + off);
    else
      wgmma_m64n64k16_ss(s, dq + off, dk + off);
  }
}

// S = Q K^T over the column blocks CBs, in that order (the first one starts the accumulation).
template <int CB0, int... CBs>
__device__ __forceinline__ void qk_blocks(float (&s)[32], uint32_t q_smem, uint32_t stage, uint32_t stage_bars,
                                          uint32_t parity, bool first) {
  const uint64_t dq = opaque(desc_k_sw128(q_smem)), dk = opaque(desc_k_sw128(stage));
  if (first)
    qk_block<CB0, true>(s, dq, dk, stage_bars + CB0 * 8, parity);
  else
    qk_block<CB0, false>(s, dq, dk, stage_bars + CB0 * 8, parity);
  (qk_block<CBs, false>(s, dq, dk, stage_bars + CBs * 8, parity), ...);
}
// WG1's order over its stage: its own blocks 4-7 first, then WG0's 0-3 and 8.
__device__ __forceinline__ void qk_wg1(float (&s)[32], uint32_t q_smem, uint32_t stage, uint32_t stage_bars,
                                       uint32_t parity) {
  wgmma_fence();
  qk_blocks<4, 5, 6, 7, 0, 1, 2, 3, 8>(s, q_smem, stage, stage_bars, parity, true);
  wgmma_commit();
}

// cp.async of column blocks [CB0, CB0 + NB) of one tile into a stage, each followed by the arrival
// on its block's barrier.
template <int CB0, int NB>
__device__ __forceinline__ void load_blocks(const TileRows& t, uint32_t stage, int wt, uint32_t stage_bars) {
  const int rs = wt / 8, c8 = wt % 8;
#pragma unroll
  for (int cb = CB0; cb < CB0 + NB; ++cb) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = rs + 16 * k;
      cp_async16(stage + cb * kBlockBytes + r * 128 + ((c8 ^ (r & 7)) << 4), t.src[k] + cb * 64, (t.valid >> k) & 1);
    }
    cp_async_arrive_noinc(stage_bars + cb * 8);
  }
}

// This thread's 4 cache rows of one tile from its prefetched element offsets (see kSsSmemRows).
__device__ __forceinline__ TileRows rows_of(const MlaDecodeParams& p, const int64_t* offs, int wt) {
  const auto* cache = static_cast<const __nv_bfloat16*>(p.cache) + (wt % 8) * 8;
  TileRows t;
  t.valid = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t off = offs[wt / 8 + 16 * k];
    t.src[k] = cache + (off >= 0 ? off : 0);
    if (off >= 0) t.valid |= 1u << k;
  }
  return t;
}

// Stores a 64 x 64 bf16 P (this thread's A fragments) K-major into an 8 KB block.
__device__ __forceinline__ void store_p(uint8_t* dst, const uint32_t (&pb)[4][4], int row0, int row1, int g, int q4) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int j = 2 * kk + jj;
      *reinterpret_cast<uint32_t*>(dst + row0 * 128 + ((j ^ g) << 4) + 4 * q4) = pb[kk][2 * jj];
      *reinterpret_cast<uint32_t*>(dst + row1 * 128 + ((j ^ g) << 4) + 4 * q4) = pb[kk][2 * jj + 1];
    }
}

__device__ __forceinline__ void pack_p(uint32_t (&pb)[4][4], const float (&s)[32]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    pb[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
    pb[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    pb[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    pb[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

__device__ __forceinline__ void scale_o(float (&o)[128], float a0, float a1) {
#pragma unroll
  for (int j = 0; j < 32; ++j) o[4 * j] *= a0, o[4 * j + 1] *= a0, o[4 * j + 2] *= a1, o[4 * j + 3] *= a1;
}

// The online softmax of one tile, in place: S (raw scores) -> P = 2^(S scale_log2 - m'), where m' is
// the running max in s_m (read, then written back by lane q4 = 0 of each row's quad), kept while the
// tile's max exceeds it by at most the slack. Tokens >= lim are masked. Returns the scales
// 2^(m - m') of the two rows (exactly 1 where kept, 0 on the first tile) and the rows' partial sums.
__device__ __forceinline__ void softmax_tile(float (&s)[32], float* s_m, int row0, int row1, int tok0, int lim,
                                             bool partial, float scale_log2, float slack, float& a0, float& a1,
                                             float& sum0, float& sum1) {
  const float ninf = -__int_as_float(0x7f800000);
  const float m0 = s_m[row0], m1 = s_m[row1];
  float mx0 = m0, mx1 = m1;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = s[4 * j + e] * scale_log2;
      if (partial && tok0 + 8 * j + (e & 1) >= lim) v = ninf;
      s[4 * j + e] = v;
      if (e < 2)
        mx0 = fmaxf(mx0, v);
      else
        mx1 = fmaxf(mx1, v);
    }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const bool keep0 = mx0 - m0 <= slack, keep1 = mx1 - m1 <= slack;  // m = -inf: never kept
  if (keep0) mx0 = m0;
  if (keep1) mx1 = m1;
  a0 = keep0 ? 1.f : ex2(m0 - mx0);
  a1 = keep1 ? 1.f : ex2(m1 - mx1);
  __syncwarp();  // every lane of the quad has read s_m
  if ((threadIdx.x & 3) == 0) s_m[row0] = mx0, s_m[row1] = mx1;
  sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = ex2(s[4 * j + e] - (e < 2 ? mx0 : mx1));
      s[4 * j + e] = pv;
      if (e < 2)
        sum0 += pv;
      else
        sum1 += pv;
    }
}

template <bool kPair>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_seesaw_kernel(const __grid_constant__ MlaDecodeParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // wgmma needs the sm_90a target
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_u32(smem);
  const uint32_t bars = sbase + kSsSmemBar;
  float* s_m = reinterpret_cast<float*>(smem + kSsSmemM);
  float* s_scale0 = reinterpret_cast<float*>(smem + kSsSmemScale0);
  float* s_scale1 = reinterpret_cast<float*>(smem + kSsSmemScale1);
  int64_t* s_rows = reinterpret_cast<int64_t*>(smem + kSsSmemRows);

  const int split = blockIdx.y, b = blockIdx.z;
  const int h0 = blockIdx.x * kHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SplitTiles sp = split_tiles(p, b, split, kPair);
  const int len = sp.len, t_begin = sp.t_begin, n = sp.n, t_end = t_begin + n;
  const bool exchange = sp.exchange, final_out = sp.final_out;
  const float ninf = -__int_as_float(0x7f800000);
  if (n <= 0) {  // empty split (or empty sequence): zeros and -inf
    if (!(kPair && split == 1)) write_empty_split(p, b, split, h0, final_out);
    return;
  }

  const int wg = warp / 4, wt = tid % 128;
  const int g = lane / 4, q4 = lane % 4;
  const int row0 = 16 * (warp % 4) + g, row1 = row0 + 8;
  const int32_t* bt_row = p.block_table + b * p.block_table_stride;
  // tokens of tile t that count: all of a real tile up to len, none of a phantom one
  auto tile_lim = [&](int t) { return t < t_end ? len : 0; };

  if (tid == 0) {
    for (int i = 0; i < 2 * kBlocks; ++i) mbar_init(bars + i * 8, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (tid < kHeads) s_m[tid] = ninf;
  __syncthreads();

  // Q (padded heads zero-filled): thread copies chunk tid % 8 of rows tid / 8 + 32k.
  {
    const auto* qb = static_cast<const __nv_bfloat16*>(p.q) + b * p.q_batch_stride;
    const int rs = tid / 8, c8 = tid % 8;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int r = rs + 32 * k;
      const bool valid = h0 + r < p.heads;
      const __nv_bfloat16* src = (valid ? qb + (h0 + r) * p.q_head_stride : qb) + c8 * 8;
#pragma unroll
      for (int cb = 0; cb < kBlocks; ++cb)
        cp_async16(sbase + kSmemQ + cb * kBlockBytes + r * 128 + ((c8 ^ (r & 7)) << 4), src + cb * 64, valid);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  // the first pair's tiles, each warpgroup its column blocks (uncommitted: tracked by the mbarriers)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = t_begin + i;
    const TileRows rows = tile_rows(p, bt_row, t, tile_lim(t), wt);
    const uint32_t stage = sbase + kSmemKv + i * kTileBytes, sb = bars + i * kBlocks * 8;
    if (wg == 0)
      load_blocks<0, 4>(rows, stage, wt, sb);
    else
      load_blocks<4, 4>(rows, stage, wt, sb);
    if ((wg == 0) == (i == 1)) load_blocks<8, 1>(rows, stage, wt, sb);  // stage 0's by WG1, stage 1's by WG0
  }
  if (wg == 1 && n > 2) {  // the second pair's rows (the loop stores each later pair's an iteration ahead)
    const int tok = (t_begin + 2) * kTileN + wt, lim = tile_lim(t_begin + 2 + wt / kTileN);
    s_rows[2 * kTileN + wt] = tok < lim ? __ldg(bt_row + tok / p.page_size) * p.page_stride +
                                              static_cast<int64_t>(tok % p.page_size) * p.token_stride
                                        : -1;
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");  // Q (the tiles are not in a group)
  fence_proxy_async();
  named_sync(kNbAll, kThreads);  // all of Q has landed, the second pair's rows are stored

  const uint32_t q_smem = sbase + kSmemQ;
  const int npairs = (n + 1) / 2;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float s[32];
  uint32_t pb[4][4];
  float l0 = 0.f, l1 = 0.f;  // this warpgroup's row sums (per thread; quad-reduced at the end)
  reg_fence(o);

  const uint32_t st0 = sbase + kSmemKv, st1 = st0 + kTileBytes;
  const uint32_t bar0 = bars, bar1 = bars + kBlocks * 8;
  const uint32_t p0_smem = st0 + kRopeBlock * kBlockBytes, p1_smem = st1 + kRopeBlock * kBlockBytes;
  if (wg == 0) {
    // ---------------- WG0: tiles t0 of each pair, O[:, 0:256] ----------------
    wgmma_fence();
    qk_blocks<0, 1, 2, 3, 4, 5, 6, 7, 8>(s, q_smem, st0, bar0, 0, true);
    wgmma_commit();
    for (int k = 0; k < npairs; ++k) {
      const int t0 = t_begin + 2 * k;
      const bool next = k + 1 < npairs;
      const uint32_t par = (k + 1) & 1;  // parity of the next pair's fills
      const int64_t* next_rows = s_rows + par * 2 * kTileN;  // written by WG1 an iteration ago
      wgmma_wait<0>();  // S0 (and everything before) complete
      reg_fence(s);
      reg_fence(o);
      float a0, a1, sum0, sum1;
      softmax_tile(s, s_m, row0, row1, t0 * kTileN + 2 * q4, len, t0 * kTileN + kTileN > len, p.scale_log2,
                   p.rescale_slack, a0, a1, sum0, sum1);
      if (q4 == 0) s_scale0[row0] = a0, s_scale0[row1] = a1;
      l0 = l0 * a0 + sum0, l1 = l1 * a1 + sum1;
      pack_p(pb, s);
      store_p(smem + (p0_smem - sbase), pb, row0, row1, g, q4);
      fence_proxy_async();  // P0 is read by WG1's wgmma
      named_arrive(kNbScale0, kThreads);
      if (k > 0 && __any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) scale_o(o, a0, a1);

      // O_L += P0 V0_L
      wgmma_fence();
      {
        const uint64_t dv = opaque(desc_mn_sw128(st0));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs(o, pb[kk], dv + ((kk * 2048) >> 4));
      }
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(o);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) reg_fence(pb[kk][r]);
      // stage 0's blocks 0-3 for the next pair (their last reader, PV0_L, is done)
      if (next) load_blocks<0, 4>(rows_of(p, next_rows, wt), st0, wt, bar0);

      named_sync(kNbScale1, kThreads);  // m1, scale1 and P1 published
      const float c0 = s_scale1[row0], c1 = s_scale1[row1];
      l0 *= c0, l1 *= c1;
      if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) scale_o(o, c0, c1);
      // O_L += P1 V1_L
      wgmma_fence();
      {
        const uint64_t dp = opaque(desc_k_sw128(p1_smem)), dv = opaque(desc_mn_sw128(st1));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss(o, dp + ((kk * 32) >> 4), dv + ((kk * 2048) >> 4));
      }
      wgmma_commit();
      if (next) {
        // S0 of the next pair: blocks 0-3 (loaded above) while PV1_L runs, then 4-8
        wgmma_fence();
        qk_blocks<0, 1, 2, 3>(s, q_smem, st0, bar0, par, true);
        wgmma_commit();
        wgmma_wait<1>();  // PV1_L complete: stage 1's blocks 0-3 and 8 (P1's) are free
        reg_fence(o);
        {
          const TileRows rows = rows_of(p, next_rows + kTileN, wt);
          load_blocks<0, 4>(rows, st1, wt, bar1);
          load_blocks<8, 1>(rows, st1, wt, bar1);
        }
        qk_blocks<4, 5, 6, 7, 8>(s, q_smem, st0, bar0, par, false);
        wgmma_commit();
      }
    }
    wgmma_wait<0>();
    reg_fence(o);
  } else {
    // ---------------- WG1: tiles t1 of each pair, O[:, 256:512] ----------------
    qk_wg1(s, q_smem, st1, bar1, 0);
    for (int k = 0; k < npairs; ++k) {
      const int t1 = t_begin + 2 * k + 1;
      const bool next = k + 1 < npairs;
      const uint32_t par = (k + 1) & 1;
      const int64_t* next_rows = s_rows + par * 2 * kTileN;
      // the rows of the pair after next (token wt of its two tiles): read from the block table now,
      // stored once the softmax is done, read by the loaders in the next iteration
      const bool ahead = k + 2 < npairs;
      const int tok = (t1 + 3) * kTileN + wt;
      const bool row_valid = ahead && tok < tile_lim(t1 + 3 + wt / kTileN);
      const int page = row_valid ? __ldg(bt_row + tok / p.page_size) : 0;
      wgmma_wait<0>();  // S1 complete
      reg_fence(s);
      reg_fence(o);
      named_sync(kNbScale0, kThreads);  // m0, scale0 and P0 published
      const float a0 = s_scale0[row0], a1 = s_scale0[row1];
      if (k > 0 && __any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) scale_o(o, a0, a1);
      // O_R += P0 V0_R, under this warpgroup's softmax
      wgmma_fence();
      {
        const uint64_t dp = opaque(desc_k_sw128(p0_smem)), dv = opaque(desc_mn_sw128(st0 + 4 * kBlockBytes));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss(o, dp + ((kk * 32) >> 4), dv + ((kk * 2048) >> 4));
      }
      wgmma_commit();
      const int lim = tile_lim(t1);
      float c0, c1, sum0, sum1;
      softmax_tile(s, s_m, row0, row1, t1 * kTileN + 2 * q4, lim, t1 * kTileN + kTileN > lim, p.scale_log2,
                   p.rescale_slack, c0, c1, sum0, sum1);
      if (q4 == 0) s_scale1[row0] = c0, s_scale1[row1] = c1;
      l0 = l0 * (a0 * c0) + sum0, l1 = l1 * (a1 * c1) + sum1;
      pack_p(pb, s);
      store_p(smem + (p1_smem - sbase), pb, row0, row1, g, q4);
      fence_proxy_async();  // P1 is read by WG0's wgmma
      if (ahead)
        s_rows[(k & 1) * 2 * kTileN + wt] =
            row_valid ? page * p.page_stride + static_cast<int64_t>(tok % p.page_size) * p.token_stride : -1;
      named_arrive(kNbScale1, kThreads);
      if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {  // rare: O_R's max moved again
        wgmma_wait<0>();
        reg_fence(o);
        scale_o(o, c0, c1);
      }
      // O_R += P1 V1_R
      wgmma_fence();
      {
        const uint64_t dv = opaque(desc_mn_sw128(st1 + 4 * kBlockBytes));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs(o, pb[kk], dv + ((kk * 2048) >> 4));
      }
      wgmma_commit();
      if (next) {
        wgmma_wait<1>();  // PV0_R complete: stage 0's blocks 4-8 (P0's included) are free
        reg_fence(o);
        load_blocks<4, 5>(rows_of(p, next_rows, wt), st0, wt, bar0);
        wgmma_wait<0>();  // PV1_R complete: stage 1's blocks 4-7 are free
        reg_fence(o);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) reg_fence(pb[kk][r]);
        load_blocks<4, 4>(rows_of(p, next_rows + kTileN, wt), st1, wt, bar1);
        // S1 of the next pair: blocks 4-7 (loaded above), then 0-3 and 8 (loaded by WG0)
        qk_wg1(s, q_smem, st1, bar1, par);
      }
    }
    wgmma_wait<0>();
    reg_fence(o);
  }

  // ---------------- epilogue: l = WG0's + WG1's sums, then out and lse ----------------
  float* s_l = reinterpret_cast<float*>(smem + kSsSmemL);
  float* s_inv = reinterpret_cast<float*>(smem + kSsSmemInv);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (wg == 0 && q4 == 0) s_l[row0] = l0, s_l[row1] = l1;
  named_sync(kNbEpilogue, kThreads);
  if (wg == 1) {
    const float tot0 = l0 + s_l[row0], tot1 = l1 + s_l[row1];  // >= 1: the max element contributes 2^0
    const float inv0 = 1.f / tot0, inv1 = 1.f / tot1;
    if (q4 == 0) {
      s_inv[row0] = inv0, s_inv[row1] = inv1;
      const float lse0 = s_m[row0] * 0.6931471805599453f + logf(tot0);
      const float lse1 = s_m[row1] * 0.6931471805599453f + logf(tot1);
      if (exchange) {
        float* s_lse = reinterpret_cast<float*>(smem + kSsSmemLse);
        s_lse[row0] = lse0, s_lse[row1] = lse1;
      } else {
        float* lse_out = final_out ? p.lse + static_cast<int64_t>(b) * p.heads
                                   : p.part_lse + (static_cast<int64_t>(b) * p.num_splits + split) * p.heads;
        if (h0 + row0 < p.heads) lse_out[h0 + row0] = lse0;
        if (h0 + row1 < p.heads) lse_out[h0 + row1] = lse1;
      }
    }
  }
  named_sync(kNbEpilogue, kThreads);
  const float inv0 = s_inv[row0], inv1 = s_inv[row1];
  const int col0 = wg * 256;
  if (exchange)
    merge_pair(p, o, smem, sbase, b, split, h0, row0, col0, inv0, inv1, wg == 0 && q4 == 0, kSsSmemLse);
  else
    store_out(p, o, b, split, h0, row0, col0, inv0, inv1, final_out);
#endif
}

}  // namespace nmoe::attention::sm90_seesaw
