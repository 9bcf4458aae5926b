// Absorbed MLA decode over the paged latent cache, one split of the KV range per CTA.
//
// CTA = (head block of 16 * MT heads, split, sequence); 8 warps. Per tile of 64 cached tokens:
//   S = Q K^T   [HB, 64]   over 576 dims (mma.sync m16n8k16 bf16, fp32 accumulate)
//   online softmax in base 2 (row max across the QK warps through shared memory)
//   O += P V    [HB, 512]  with P rounded to bf16, V = the first 512 cache columns
// The cache tiles stream through two shared-memory stages with cp.async; rows are 1152 bytes
// (72 chunks of 16 bytes) with the chunk index XOR-swizzled by (row & 7) so ldmatrix is
// conflict-free. Tokens past the sequence end are zero-filled, never read, so poisoned slots and
// padded block-table entries cannot leak in.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "attention/params.h"
#include "attention/sm90/split_merge.cuh"
#include "pdl.cuh"

namespace nmoe::attention::sm90 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 64;                      // cached tokens per tile
constexpr int kRowBytes = kHeadDim * 2;         // 1152
constexpr int kRowChunks = kRowBytes / 16;      // 72
constexpr int kTileBytes = kTileN * kRowBytes;  // 73728
constexpr int kKSteps = kHeadDim / 16;          // 36 k-steps of QK
constexpr int kPvCols = kLoraRank / kWarps;     // 64 output columns per warp
constexpr int kPvNTiles = kPvCols / 8;          // 8

// Warp tiling of S = Q K^T for MT m16 tiles of heads and 8 n8 tiles of tokens.
template <int MT>
struct QkTiling {
  static constexpr int kMtPerWarp = MT < 2 ? MT : 2;
  static constexpr int kWarpsM = MT / kMtPerWarp;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kNtPerWarp = (kTileN / 8) / kWarpsN;
  static_assert(kWarpsM * kWarpsN == kWarps && kNtPerWarp * kWarpsN * 8 == kTileN, "QK tiling");
};

template <int MT>
struct SmemLayout {
  static constexpr int kHeads = 16 * MT;
  static constexpr int kQ = 0;
  static constexpr int kKv = kQ + kHeads * kRowBytes;
  static constexpr int kP = kKv + 2 * kTileBytes;
  static constexpr int kRed = kP + kHeads * kTileN * 2;                     // [warps_n][heads] f32
  static constexpr int kAlpha = kRed + QkTiling<MT>::kWarpsN * kHeads * 4;  // [heads] f32
  static constexpr int kRowMax = kAlpha + kHeads * 4;                       // [heads] f32
  static constexpr int kBytes = kRowMax + kHeads * 4;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `row_bytes` rows.
__device__ __forceinline__ uint32_t swz(int row, int chunk, int row_bytes) {
  return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Streams the 64 cache rows of tile `tile` into a stage: thread t copies rows t/8 and t/8 + 32,
// chunks (t % 8) + 8j, so each row is read as whole 128-byte lines.
__device__ __forceinline__ void load_kv_tile(const MlaDecodeParams& p, const __nv_bfloat16* cache,
                                             const int32_t* bt_row, int len, int tile, uint32_t stage) {
  const int sub = threadIdx.x % 8;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = threadIdx.x / 8 + half * 32;
    const int tok = tile * kTileN + row;
    const bool valid = tok < len;
    const __nv_bfloat16* src = cache;
    if (valid) {
      const int page = __ldg(bt_row + tok / p.page_size);
      src = cache + page * p.page_stride + static_cast<int64_t>(tok % p.page_size) * p.token_stride;
    }
#pragma unroll
    for (int j = 0; j < kRowChunks / 8; ++j) {
      const int chunk = sub + 8 * j;
      cp_async16(stage + swz(row, chunk, kRowBytes), src + chunk * 8, valid);
    }
  }
}

template <int MT>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_split_kernel(const __grid_constant__ MlaDecodeParams p) {
  using L = SmemLayout<MT>;
  using QK = QkTiling<MT>;
  constexpr int HB = L::kHeads;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t s_base = smem_u32(smem);
  float* s_red = reinterpret_cast<float*>(smem + L::kRed);
  float* s_alpha = reinterpret_cast<float*>(smem + L::kAlpha);
  float* s_rowmax = reinterpret_cast<float*>(smem + L::kRowMax);

  const int hblock = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int h0 = hblock * HB;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q4 = lane % 4;

  const int len = min(max(p.seq_lens[b], 0), p.max_pages * p.page_size);
  const int ntiles = (len + kTileN - 1) / kTileN;
  const int per_split = (ntiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * per_split;
  const int t_end = min(ntiles, t_begin + per_split);
  const bool final_out = p.num_splits == 1;

  if (t_begin >= t_end) {  // empty split (or empty sequence): zeros and -inf
    for (int i = tid; i < HB * kLoraRank; i += kThreads) {
      const int r = i / kLoraRank, c = i % kLoraRank, h = h0 + r;
      if (h >= p.heads) continue;
      if (final_out) {
        reinterpret_cast<__nv_bfloat16*>(p.out)[(static_cast<int64_t>(b) * p.heads + h) * kLoraRank + c] =
            __float2bfloat16(0.f);
      } else {
        p.part_out[((static_cast<int64_t>(b) * p.num_splits + split) * p.heads + h) * kLoraRank + c] = 0.f;
      }
    }
    if (tid < HB && h0 + tid < p.heads) {
      const float ninf = -__int_as_float(0x7f800000);
      if (final_out)
        p.lse[static_cast<int64_t>(b) * p.heads + h0 + tid] = ninf;
      else
        p.part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.heads + h0 + tid] = ninf;
    }
    return;
  }

  const auto* q = static_cast<const __nv_bfloat16*>(p.q) + b * p.q_batch_stride;
  const auto* cache = static_cast<const __nv_bfloat16*>(p.cache);
  const int32_t* bt_row = p.block_table + b * p.block_table_stride;

  // Group 0: Q (padded heads zero-filled) and the first tile; group 1: the second tile.
  for (int i = tid; i < HB * kRowChunks; i += kThreads) {
    const int r = i / kRowChunks, c = i % kRowChunks;
    const bool valid = h0 + r < p.heads;
    const __nv_bfloat16* src = valid ? q + (h0 + r) * p.q_head_stride + c * 8 : q;
    cp_async16(s_base + L::kQ + swz(r, c, kRowBytes), src, valid);
  }
  load_kv_tile(p, cache, bt_row, len, t_begin, s_base + L::kKv);
  cp_async_commit();
  if (t_begin + 1 < t_end) load_kv_tile(p, cache, bt_row, len, t_begin + 1, s_base + L::kKv + kTileBytes);
  cp_async_commit();

  const int wm = warp / QK::kWarpsN, wn = warp % QK::kWarpsN;
  float m_run[QK::kMtPerWarp][2], l_run[QK::kMtPerWarp][2];
#pragma unroll
  for (int i = 0; i < QK::kMtPerWarp; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) m_run[i][j] = -__int_as_float(0x7f800000), l_run[i][j] = 0.f;

  float o[MT][kPvNTiles][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < kPvNTiles; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) o[i][j][k] = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const uint32_t s_kv = s_base + L::kKv + ((t - t_begin) & 1) * kTileBytes;
    cp_async_wait_1();
    __syncthreads();

    // S = Q K^T for this warp's (heads, tokens) tile.
    float s[QK::kMtPerWarp][QK::kNtPerWarp][4];
#pragma unroll
    for (int i = 0; i < QK::kMtPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < QK::kNtPerWarp; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) s[i][j][k] = 0.f;
#pragma unroll 4
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[QK::kMtPerWarp][4];
#pragma unroll
      for (int i = 0; i < QK::kMtPerWarp; ++i) {
        const int row = (wm * QK::kMtPerWarp + i) * 16 + lane % 16;
        ldsm_x4(s_base + L::kQ + swz(row, ks * 2 + lane / 16, kRowBytes), a[i][0], a[i][1], a[i][2], a[i][3]);
      }
      uint32_t bf[QK::kNtPerWarp][2];
      if constexpr (QK::kNtPerWarp == 2) {
        const int row = wn * 16 + lane % 8 + (lane / 16) * 8;
        ldsm_x4(s_kv + swz(row, ks * 2 + (lane / 8) % 2, kRowBytes), bf[0][0], bf[0][1], bf[1][0], bf[1][1]);
      } else {
        const int row = wn * 8 + lane % 8;
        ldsm_x2(s_kv + swz(row, ks * 2 + (lane / 8) % 2, kRowBytes), bf[0][0], bf[0][1]);
      }
#pragma unroll
      for (int i = 0; i < QK::kMtPerWarp; ++i)
#pragma unroll
        for (int j = 0; j < QK::kNtPerWarp; ++j) mma_bf16(s[i][j], a[i], bf[j][0], bf[j][1]);
    }

    // Scale to base 2, mask tokens past the end, and publish this warp's row maxima.
    const int tok0 = t * kTileN + wn * QK::kNtPerWarp * 8 + 2 * q4;
    float tmax[QK::kMtPerWarp][2];
#pragma unroll
    for (int i = 0; i < QK::kMtPerWarp; ++i) {
      tmax[i][0] = tmax[i][1] = -__int_as_float(0x7f800000);
#pragma unroll
      for (int j = 0; j < QK::kNtPerWarp; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const bool valid = tok0 + j * 8 + (k & 1) < len;
          s[i][j][k] = valid ? s[i][j][k] * p.scale_log2 : -__int_as_float(0x7f800000);
          tmax[i][k / 2] = fmaxf(tmax[i][k / 2], s[i][j][k]);
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tmax[i][r] = fmaxf(tmax[i][r], __shfl_xor_sync(0xffffffffu, tmax[i][r], 1));
        tmax[i][r] = fmaxf(tmax[i][r], __shfl_xor_sync(0xffffffffu, tmax[i][r], 2));
        if (q4 == 0) s_red[wn * HB + (wm * QK::kMtPerWarp + i) * 16 + g + 8 * r] = tmax[i][r];
      }
    }
    __syncthreads();

    // New running max, P = exp2(S - max) to shared memory as bf16, and the rescale factor.
#pragma unroll
    for (int i = 0; i < QK::kMtPerWarp; ++i) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = (wm * QK::kMtPerWarp + i) * 16 + g + 8 * r;
        float mx = m_run[i][r];
#pragma unroll
        for (int w = 0; w < QK::kWarpsN; ++w) mx = fmaxf(mx, s_red[w * HB + row]);
        const float alpha = exp2f(m_run[i][r] - mx);
        m_run[i][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < QK::kNtPerWarp; ++j) {
          const float p0 = exp2f(s[i][j][2 * r] - mx), p1 = exp2f(s[i][j][2 * r + 1] - mx);
          sum += p0 + p1;
          const int col = (wn * QK::kNtPerWarp + j) * 8 + 2 * q4;
          *reinterpret_cast<uint32_t*>(smem + L::kP + swz(row, col / 8, kTileN * 2) + (col % 8) * 2) =
              pack_bf16(p0, p1);
        }
        l_run[i][r] = l_run[i][r] * alpha + sum;
        if (wn == 0 && q4 == 0) s_alpha[row] = alpha;
      }
    }
    __syncthreads();

    // O = O * alpha + P V over this warp's 64 output columns.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float a0 = s_alpha[i * 16 + g], a1 = s_alpha[i * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < kPvNTiles; ++j) o[i][j][0] *= a0, o[i][j][1] *= a0, o[i][j][2] *= a1, o[i][j][3] *= a1;
    }
#pragma unroll
    for (int ks = 0; ks < kTileN / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        ldsm_x4(s_base + L::kP + swz(i * 16 + lane % 16, ks * 2 + lane / 16, kTileN * 2), a[i][0], a[i][1], a[i][2],
                a[i][3]);
#pragma unroll
      for (int jj = 0; jj < kPvNTiles / 2; ++jj) {
        uint32_t b00, b01, b10, b11;
        const int row = ks * 16 + lane % 8 + ((lane / 8) % 2) * 8;
        const int chunk = (warp * kPvCols) / 8 + jj * 2 + lane / 16;
        ldsm_x4_t(s_kv + swz(row, chunk, kRowBytes), b00, b01, b10, b11);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_bf16(o[i][2 * jj], a[i], b00, b01);
          mma_bf16(o[i][2 * jj + 1], a[i], b10, b11);
        }
      }
    }
    __syncthreads();
    if (t + 2 < t_end) load_kv_tile(p, cache, bt_row, len, t + 2, s_kv);
    cp_async_commit();
  }

  // Row sums: quad lanes, then the QK warps along the tokens.
#pragma unroll
  for (int i = 0; i < QK::kMtPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[i][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = (wm * QK::kMtPerWarp + i) * 16 + g + 8 * r;
      if (q4 == 0) s_red[wn * HB + row] = l;
      if (q4 == 0 && wn == 0) s_rowmax[row] = m_run[i][r];
    }
  __syncthreads();

  const int64_t part_row = (static_cast<int64_t>(b) * p.num_splits + split) * p.heads;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = i * 16 + g + 8 * r, h = h0 + row;
      if (h >= p.heads) continue;
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < QK::kWarpsN; ++w) l += s_red[w * HB + row];
      const float inv = 1.f / l;
#pragma unroll
      for (int j = 0; j < kPvNTiles; ++j) {
        const int col = warp * kPvCols + j * 8 + 2 * q4;
        const float v0 = o[i][j][2 * r] * inv, v1 = o[i][j][2 * r + 1] * inv;
        if (final_out) {
          auto* out = static_cast<__nv_bfloat16*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * kLoraRank;
          *reinterpret_cast<uint32_t*>(out + col) = pack_bf16(v0, v1);
        } else {
          *reinterpret_cast<float2*>(p.part_out + (part_row + h) * kLoraRank + col) = make_float2(v0, v1);
        }
      }
    }
  if (tid < HB && h0 + tid < p.heads) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < QK::kWarpsN; ++w) l += s_red[w * HB + tid];
    const float lse = s_rowmax[tid] * 0.6931471805599453f + logf(l);
    if (final_out)
      p.lse[static_cast<int64_t>(b) * p.heads + h0 + tid] = lse;
    else
      p.part_lse[part_row + h0 + tid] = lse;
  }
}

// Merges the splits of one (sequence, head): out = sum_s exp(lse_s - lse) o_s, lse = logsumexp lse_s.
// 128 threads, 4 columns each.
__global__ void __launch_bounds__(128) mla_decode_combine_kernel(const __grid_constant__ MlaDecodeParams p) {
  pdl_enter();  // first: see csrc/pdl.cuh
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t base = static_cast<int64_t>(b) * p.num_splits * p.heads + h;  // (b, split 0, h)
  float mx = -__int_as_float(0x7f800000);
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.part_lse[base + s * p.heads]);
  const int col = threadIdx.x * 4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
  if (mx != -__int_as_float(0x7f800000)) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = split_weight(p.part_lse[base + s * p.heads], mx);
      if (w == 0.f) continue;
      total += w;
      const float4 v = *reinterpret_cast<const float4*>(p.part_out + (base + s * p.heads) * kLoraRank + col);
      acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  auto* out = static_cast<__nv_bfloat16*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * kLoraRank + col;
  *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16(acc.x * inv, acc.y * inv), pack_bf16(acc.z * inv, acc.w * inv));
  if (threadIdx.x == 0) p.lse[static_cast<int64_t>(b) * p.heads + h] = merged_lse(mx, total);
}

}  // namespace nmoe::attention::sm90
