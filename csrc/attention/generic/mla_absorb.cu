// The two absorbed-MLA projections around the decode attention, per head h (DeepSeek-V3: 128 heads,
// nope = v = 128, latent R = 512), in place of two cuBLAS batched GEMMs, the query's assembly and
// the output's quantization:
//
//   mla_absorb_q:   q[b, h, :R] = q_nope[b, h, :] @ W_UK[h]    (W_UK[h]: [nope, R], R contiguous)
//                   q[b, h, R:] = q_pe[b, h, :] rotated        (as mla_decode_q: bit-exact)
//   mla_absorb_out: o[b, h, :]  = o_lat[b, h, :] @ W_UV[h]^T   (W_UV[h]: [v, R], R contiguous)
//                   optionally quantized per (b, h) - one 128-channel group - as quant_fp8_act does
//                   for the o_proj GEMM that reads it.
//
// Both are bf16 mma.sync m16n8k16 with fp32 accumulation, one rounding to bf16. Their weights are
// never written by a kernel, so each CTA starts fetching its weight tile before its programmatic
// dependency wait (csrc/pdl.cuh): the fetch overlaps the previous kernel's tail; nothing that a
// previous kernel writes is read, and nothing is written, before the wait.
//
// mla_absorb_q: CTA = (128 latent columns, head), 4 warps of 32 columns. W_UK's chunk [128, 128] is
// staged in shared memory (rows padded to 272 bytes: conflict-free) and read as the col-major B
// fragments by ldmatrix.trans; 32 query rows at a time are staged and read as A fragments.
// mla_absorb_out: CTA = head, 8 warps of 16 output channels; each warp holds its 16 x 512 slice of
// W_UV in registers (16-byte loads straight into B fragments: a lane's 8 consecutive k are a fixed
// permutation of the fragment's k, the same for A, which is read from shared memory the same way).
#include <cuda_bf16.h>

#include <cstdint>

#include "attention/params.h"
#include "fp8/generic/group_quant.cuh"
#include "mma_bf16.cuh"
#include "pdl.cuh"
#include "rope_pair.cuh"

namespace nmoe::attention {
namespace {

constexpr int kQWarps = 4;
constexpr int kChunk = 128;  // latent columns of one mla_absorb_q CTA
constexpr int kRows = 32;    // query / output rows staged per pass
constexpr int kPadQ = 8;     // 272-byte rows: 32-bit fragment loads and ldmatrix rows conflict-free
constexpr int kOutWarps = 8;
constexpr int kPadO = 32;    // 1088-byte rows: 16-byte fragment loads conflict-free per quarter warp

// Rows b0 .. b0 + kRows of a [batch, kCols] operand (row stride `stride`) into dst, zeros past
// `batch`, by the CTA's kThreads threads; then waits for every copy this thread issued (the
// weight tile's too) - the caller's __syncthreads makes them visible to the CTA.
template <int kCols, int kThreads, int kLd>
__device__ __forceinline__ void stage_rows(__nv_bfloat16 (*dst)[kLd], const __nv_bfloat16* src, int64_t stride,
                                           int64_t b0, int64_t batch) {
  for (int i = threadIdx.x; i < kRows * (kCols / 8); i += kThreads) {
    const int row = i / (kCols / 8), piece = i % (kCols / 8);
    const bool inside = b0 + row < batch;
    cp_async16(&dst[row][piece * 8], inside ? src + (b0 + row) * stride + piece * 8 : src, inside ? 16 : 0);
  }
  cp_async_commit();
  cp_async_wait<0>();
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t lds32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// acc[mt][nt], in the m16n8 accumulator layout (rows mt * 16 + g, and + 8 in elements 2 and 3;
// columns nt * 8 + 2 tig, + 1), rounded to bf16 into the tile from column col0 on.
template <int kNt, int kLd>
__device__ __forceinline__ void store_acc_bf16(__nv_bfloat16 (*tile)[kLd], const float (&acc)[2][kNt][4], int col0,
                                               int g, int tig) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      const int col = col0 + nt * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(&tile[mt * 16 + g][col]) = pack2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<uint32_t*>(&tile[mt * 16 + g + 8][col]) = pack2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
}

__global__ void __launch_bounds__(32 * kQWarps) mla_absorb_q_kernel(const MlaAbsorbQParams p) {
  __shared__ __align__(16) __nv_bfloat16 ws[kAbsorbNope][kChunk + kPadQ];
  __shared__ __align__(16) __nv_bfloat16 qs[kRows][kAbsorbNope + kPadQ];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int64_t h = blockIdx.y;
  const int c = blockIdx.x;
  const auto* w = static_cast<const __nv_bfloat16*>(p.w) + h * p.w_head_stride + c * kChunk;
  for (int i = tid; i < kAbsorbNope * (kChunk / 8); i += 32 * kQWarps) {  // the weight: before the wait
    const int row = i / (kChunk / 8), piece = i % (kChunk / 8);
    cp_async16(&ws[row][piece * 8], w + row * p.w_row_stride + piece * 8, 16);
  }
  pdl_enter();
  const auto* q = static_cast<const __nv_bfloat16*>(p.q_nope) + h * p.q_head_stride;
  auto* out = static_cast<__nv_bfloat16*>(p.out);
  const int64_t out_row = p.heads * (p.rank + p.rope);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kRows) {
    stage_rows<kAbsorbNope, 32 * kQWarps>(qs, q, p.q_batch_stride, b0, p.batch);
    __syncthreads();
    float acc[2][4][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kAbsorbNope; k0 += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = mt * 16 + g;
        a[mt][0] = lds32(&qs[r][k0 + 2 * tig]);
        a[mt][1] = lds32(&qs[r + 8][k0 + 2 * tig]);
        a[mt][2] = lds32(&qs[r][k0 + 2 * tig + 8]);
        a[mt][3] = lds32(&qs[r + 8][k0 + 2 * tig + 8]);
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {  // two n8 tiles per ldmatrix: matrices (k lo, n), (k hi, n), (k lo, n + 8), ...
        const int j = lane / 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, &ws[k0 + (j & 1) * 8 + lane % 8][warp * 32 + np * 16 + (j >> 1) * 8]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_bf16(acc[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[0], b[1]);
          mma_bf16(acc[mt][2 * np + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[2], b[3]);
        }
      }
    }
    // acc[mt][nt]: rows mt * 16 + g (0, 1) and + 8 (2, 3), columns nt * 8 + 2 tig (+1) of the warp's
    // 32; staged through qs (free once every warp has read its A fragments) for 16-byte row stores
    __syncthreads();
    store_acc_bf16(qs, acc, warp * 32, g, tig);
    __syncthreads();
    for (int i = tid; i < kRows * (kChunk / 8); i += 32 * kQWarps) {
      const int row = i / (kChunk / 8), piece = i % (kChunk / 8);
      if (b0 + row >= p.batch) continue;
      *reinterpret_cast<uint4*>(out + (b0 + row) * out_row + h * (p.rank + p.rope) + c * kChunk + piece * 8) =
          *reinterpret_cast<const uint4*>(&qs[row][piece * 8]);
    }
    __syncthreads();  // every thread is done with qs before the next rows land
  }
  // the rope part of head h, its rows shared out over the head's CTAs
  const int pairs = p.rope / 2;
  for (int64_t i = tid + static_cast<int64_t>(c) * 32 * kQWarps; i < p.batch * pairs;
       i += static_cast<int64_t>(gridDim.x) * 32 * kQWarps) {
    const int64_t b = i / pairs;
    const int j = static_cast<int>(i % pairs);
    const auto* pe = static_cast<const __nv_bfloat16*>(p.q_pe) + b * p.pe_batch_stride + h * p.pe_head_stride;
    const float x1 = __bfloat162float(pe[2 * j]), x2 = __bfloat162float(pe[2 * j + 1]);
    const float cs = p.cos[b * pairs + j], sn = p.sin[b * pairs + j];
    __nv_bfloat16* dst = out + b * out_row + h * (p.rank + p.rope) + p.rank + 2 * j;
    rotate_pair(x1, x2, cs, sn, dst);
  }
}

__global__ void __launch_bounds__(32 * kOutWarps, 1) mla_absorb_out_kernel(const MlaAbsorbOutParams p) {
  __shared__ __align__(16) __nv_bfloat16 os[kRows][kAbsorbRank + kPadO];
  __shared__ __align__(16) __nv_bfloat16 ot[kRows][kAbsorbV + kPadQ];
  constexpr int kSteps = kAbsorbRank / 32;  // 32 k per 16-byte lane load: two k16 mma steps
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int64_t h = blockIdx.x;
  // the warp's 16 output channels x R of W_UV in registers: wb[nt][s] = row 16 warp + 8 nt + g,
  // k [32 s + 8 tig, + 8) - before the wait (weights only)
  const auto* w = static_cast<const __nv_bfloat16*>(p.w) + h * p.w_head_stride;
  uint4 wb[2][kSteps];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      wb[nt][s] = load_stream(w + (warp * 16 + nt * 8 + g) * p.w_row_stride + s * 32 + tig * 8);
    }
  }
  pdl_enter();
  const auto* o = static_cast<const __nv_bfloat16*>(p.o_lat) + h * p.o_head_stride;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kRows) {
    stage_rows<kAbsorbRank, 32 * kOutWarps>(os, o, p.o_batch_stride, b0, p.batch);
    __syncthreads();
    float acc[2][2][4] = {};
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint4 lo = *reinterpret_cast<const uint4*>(&os[mt * 16 + g][s * 32 + tig * 8]);
        const uint4 hi = *reinterpret_cast<const uint4*>(&os[mt * 16 + g + 8][s * 32 + tig * 8]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_bf16(acc[mt][nt], lo.x, hi.x, lo.y, hi.y, wb[nt][s].x, wb[nt][s].y);
          mma_bf16(acc[mt][nt], lo.z, hi.z, lo.w, hi.w, wb[nt][s].z, wb[nt][s].w);
        }
      }
    }
    store_acc_bf16(ot, acc, warp * 16, g, tig);
    __syncthreads();
    if (p.q == nullptr) {  // bf16 [B, H, 128]
      for (int i = tid; i < kRows * (kAbsorbV / 8); i += 32 * kOutWarps) {
        const int row = i / (kAbsorbV / 8), piece = i % (kAbsorbV / 8);
        if (b0 + row >= p.batch) continue;
        *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + ((b0 + row) * p.heads + h) * kAbsorbV +
                                  piece * 8) = *reinterpret_cast<const uint4*>(&ot[row][piece * 8]);
      }
    } else {  // one 128-channel group per row: half-warps of 16 lanes x 8 channels (group_quant.cuh)
      const int half = tid / fp8::kLanesPerGroup, sub = tid % fp8::kLanesPerGroup;
      for (int row = half; row < kRows; row += 2 * kOutWarps) {  // the same trip count in both halves
        const int64_t b = b0 + row;
        const bool inside = b < p.batch;
        float v[fp8::kVec];
        fp8::unpack_bf16x8(*reinterpret_cast<const uint4*>(&ot[row][sub * 8]), v);
        uint8_t* dst = static_cast<uint8_t*>(p.q) + (b * p.heads + h) * kAbsorbV + sub * 8;
        const float scale = fp8::quant_group_store(v, dst, inside);
        if (inside && sub == 0) p.s[b * p.heads + h] = scale;
      }
    }
    __syncthreads();  // ot and os are rewritten by the next rows
  }
}

}  // namespace

const char* mla_absorb_q_launch(const MlaAbsorbQParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return nullptr;
  if (p.rank % kChunk || p.heads > 65535) return "mla_absorb_q: rank must be a multiple of 128, heads <= 65535";
  const dim3 grid(static_cast<unsigned>(p.rank / kChunk), static_cast<unsigned>(p.heads));
  const cudaError_t launched = launch_pdl(mla_absorb_q_kernel, grid, 32 * kQWarps, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_absorb_q: kernel launch failed";
}

const char* mla_absorb_out_launch(const MlaAbsorbOutParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return nullptr;
  if (p.heads > 0x7fffffff) return "mla_absorb_out: too many heads";
  const cudaError_t launched =
      launch_pdl(mla_absorb_out_kernel, static_cast<unsigned>(p.heads), 32 * kOutWarps, 0, stream, p);
  return launched == cudaSuccess ? nullptr : "mla_absorb_out: kernel launch failed";
}

}  // namespace nmoe::attention
