// The cluster sampler: one thread-block cluster per row, the row split over its C CTAs and held in
// shared memory, so the logits are read from HBM once and every later pass runs at shared-memory
// speed. Same contract as the one-CTA-per-row sampler (sample.cu, sample_common.cuh); docs/kernels.md
// (`sample`) holds the semantics. Instantiated for 512-thread CTAs (8 a cluster for a DeepSeek-V3
// row, two per SM) in sample_cluster.cu and for 256-thread CTAs (16 a cluster, three per SM) in
// sample_cluster16.cu: separate translation units compile in parallel.
//
// Per row (each CTA holds a contiguous chunk of ids; cluster-wide values are merged in rank order,
// so every CTA computes the same numbers and takes the same branches):
//   load   cp.async of the chunk into shared memory.
//   stats  per thread: the max (pass A), then the sum of exp relative to it (pass B, no rescaling
//          per element); x = v / t is computed there once and replaces v in shared memory.
//   select (top-k, top-p, top-n rows) a histogram over 2048 bins of d = max - x (value-relative,
//          so a row's mass spreads over many bins; the bin width is a power of two picked from the
//          row's spread), cluster-reduced through distributed shared memory; the bins that hold a
//          threshold (and the prefix of bins that holds the top-n logprobs) are flagged, their
//          elements compacted, gathered, sorted, and the thresholds resolved exactly on them. When
//          the candidates are a whole prefix of the order (a small kept set) the token, the kept
//          mass and the top-n come straight from them.
//   gumbel otherwise one sweep over the kept set: an upper bound of the noise from the hash bits
//          (g <= -log(1 - u)) gates the exact double evaluation against a lower bound of the
//          winning value, max + log(kept mass) - 3 (checked afterwards; the rare miss redoes the
//          sweep with the best value found as the bound).
// Rows the fast path cannot resolve (a crowded threshold bin, non-finite rows) are handed whole to
// the one-CTA algorithm, run by the cluster's first CTA from global memory.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "sampling/generic/sample_common.cuh"
#include "sampling/params.h"

namespace nmoe::sampling::cluster {

using namespace detail;
using u32 = uint32_t;
using u64 = unsigned long long;

constexpr int kBins = 2048;         // histogram bins
constexpr int kSuper = kBins / 32;  // super-bins of 32 bins: the first level of a cluster search
constexpr int kMaxRanks = 16;       // CTAs per cluster
constexpr int kMaxCap = 2048;
// Candidates per cluster (and per CTA): 2048 for 512-thread CTAs (two per SM), 1024 for 256-thread
// CTAs (so that three fit in an SM's shared memory).
template <int kT>
constexpr int cap_of() {
  return kT == 512 ? 2048 : 1024;
}

// ---------------------------------------------------------------- small helpers

__device__ __forceinline__ u32 cl_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ u32 cl_size() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ u32 cl_id() {
  u32 r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
// Split cluster barrier: arrive releases this thread's earlier writes (to local and remote shared
// memory), wait acquires everyone's. Every thread of every CTA calls them in the same sequence: the
// branches around them depend only on values every CTA computes alike.
__device__ __forceinline__ void cl_arrive() { __cluster_barrier_arrive(); }
__device__ __forceinline__ void cl_wait() { __cluster_barrier_wait(); }
__device__ __forceinline__ void cl_sync() {
  cl_arrive();
  cl_wait();
}
template <typename T>
__device__ __forceinline__ T* at_rank(T* p, u32 rank) {
  return static_cast<T*>(__cluster_map_shared_rank(static_cast<void*>(p), rank));
}

// The 2^-40 fixed-point mass floor(e * 2^40) split as hi * 2^20 + lo, each part as the bits of
// (2^23 + part): shared-memory atomics are native only for 32-bit integers, and a sum of the raw
// bits less count * (bits of 2^23) is the sum of the parts - exact while a bin of a CTA holds fewer
// than 4096 elements (checked).
__device__ __forceinline__ void mass_bits(float e, u32& hi_bits, u32& lo_bits) {
  const float h = __fmaf_rz(e, 1048576.f, kTwo23);      // 2^23 + floor(e * 2^20)
  const float y = e * 1099511627776.f;                   // e * 2^40, exact
  const float lo = __fmaf_rn(kTwo23 - h, 1048576.f, y);  // y - floor(e * 2^20) * 2^20, exact
  hi_bits = __float_as_uint(h);
  lo_bits = __float_as_uint(__fadd_rz(lo, kTwo23));      // 2^23 + floor(lo)
}
__device__ __forceinline__ u64 bin_mass(u32 count, u32 hi_bits, u32 lo_bits) {
  return (static_cast<u64>(hi_bits - count * kMagic) << 20) + static_cast<u64>(lo_bits - count * kMagic);
}
__device__ __forceinline__ u64 mass_of(float e) {
  u32 hb, lb;
  mass_bits(e, hb, lb);
  return bin_mass(1, hb, lb);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ u64 warp_incl_scan(u64 v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const u64 x = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += x;
  }
  return v;
}

struct Gum {  // Gumbel-max state over part of a kept set
  float bv;   // best noisy value
  int bi;     // its id (lowest on ties)
  float z;    // sum of exp(x - max) over the kept elements seen
  int cnt;    // kept elements seen
};
__device__ __forceinline__ Gum merge_gum(Gum a, Gum b) {
  const bool take = b.bv > a.bv || (b.bv == a.bv && b.bi < a.bi);
  return {take ? b.bv : a.bv, take ? b.bi : a.bi, a.z + b.z, a.cnt + b.cnt};
}
__device__ __forceinline__ Gum shfl_gum(const Gum& s, int o) {
  return {__shfl_xor_sync(0xffffffffu, s.bv, o), __shfl_xor_sync(0xffffffffu, s.bi, o),
          __shfl_xor_sync(0xffffffffu, s.z, o), __shfl_xor_sync(0xffffffffu, s.cnt, o)};
}

struct Stat {    // one part of a row's statistics
  float mr, zr;  // raw max, sum of exp(v - mr)
  int ir;        // lowest id with v == mr
  float mp, zp;  // processed (x = v / t) max, sum of exp(x - mp)
  int ip;        // lowest id with x == mp
  float vsum;    // sum of the finite first lanes of the float4s: the row's spread picks the bin width
  int vcnt;
};
__device__ __forceinline__ void merge_ms(float ma, float za, int ia, float mb, float zb, int ib, float& m, float& z,
                                         int& i) {
  m = fmaxf(ma, mb);
  const float sa = ma > neg_inf() ? za * ex2((ma - m) * kL2E) : 0.f;
  const float sb = mb > neg_inf() ? zb * ex2((mb - m) * kL2E) : 0.f;
  z = sa + sb;  // commutative, so every lane of a butterfly gets the same bits
  i = min(ma == m ? ia : kNone, mb == m ? ib : kNone);
}
__device__ __forceinline__ Stat merge_stat(const Stat& a, const Stat& b) {
  Stat o;
  merge_ms(a.mr, a.zr, a.ir, b.mr, b.zr, b.ir, o.mr, o.zr, o.ir);
  merge_ms(a.mp, a.zp, a.ip, b.mp, b.zp, b.ip, o.mp, o.zp, o.ip);
  o.vsum = a.vsum + b.vsum;
  o.vcnt = a.vcnt + b.vcnt;
  return o;
}
__device__ __forceinline__ Stat shfl_stat(const Stat& s, int o) {
  Stat t;
  t.mr = __shfl_xor_sync(0xffffffffu, s.mr, o);
  t.zr = __shfl_xor_sync(0xffffffffu, s.zr, o);
  t.ir = __shfl_xor_sync(0xffffffffu, s.ir, o);
  t.mp = __shfl_xor_sync(0xffffffffu, s.mp, o);
  t.zp = __shfl_xor_sync(0xffffffffu, s.zp, o);
  t.ip = __shfl_xor_sync(0xffffffffu, s.ip, o);
  t.vsum = __shfl_xor_sync(0xffffffffu, s.vsum, o);
  t.vcnt = __shfl_xor_sync(0xffffffffu, s.vcnt, o);
  return t;
}

struct Found {  // a cluster-wide crossing: the bin, and the totals in higher bins
  int bin;      // -1: no crossing
  u32 before, cnt, next;  // elements in higher bins, in the bin, in the next bin
  u64 mbefore, mass;      // masses likewise
};

// The row: parameters and cluster-wide statistics, identical in every CTA (kept in shared memory:
// registers are the scarce resource).
struct Row {
  int64_t r;
  u32 C, rank;
  int lo, n;          // this CTA's ids [lo, lo + n)
  int vocab, chunk;
  const float* gsrc;  // the row in global memory
  float t;
  bool greedy, t1;    // t1: x == v (greedy rows use the raw logits)
  bool topk_on, topp_on, minp_on, p_zero;
  int k;
  float top_p, min_p;
  int ntop;           // min(num_top, vocab)
  bool raw_top;       // top-n of raw logprobs (else processed)
  u32 key;            // the row's hash key
  float mr, log_zr;   // raw max, log of the raw sum of exp
  int ir;             // raw argmax (lowest id)
  float m;            // processed max
  int ip;             // processed argmax: the top composite, always kept
  float zall;         // sum of exp(x - m) over the row (when computed)
  float mean_v;
  bool need_zr;       // the raw sum of exp comes from pass B (else from the bin masses)
};

struct Run {  // the outcome of a selection run
  int ok, prefix;
  int N;      // gathered candidates
  int bmax;   // highest flagged bin
  int en;     // top-n window's last bin (-1: none)
  int bt;     // the threshold's bin outside a prefix (-1: none)
  float M, scale, dmax;
};

struct Misc {
  SampleParams prm;  // a copy of the kernel parameters: taking the address of the parameter itself
                     // (to pass it to a call) would copy it to every thread's stack
  Row row;
  Run run;
  Stat spart[kMaxRanks];     // pushed by every rank
  Gum gpart[2][kMaxRanks];   // pushed by every rank (the second set: a redone Gumbel sweep)
  u32 ncand_all[kMaxRanks];  // pushed by every rank
  int top_ok;                // pushed by rank 0
  u32 lsc[kSuper];           // this CTA's super-bin counts (pulled)
  u64 lsm[kSuper];           // this CTA's super-bin masses (pulled)
  u32 lovf;                  // a bin of this CTA may overflow the split mass sums (pulled)
  u32 rovf;
  u64 rsc[kSuper], rsm[kSuper];  // super-bins reduced over the cluster
  Found found[3];                // k, n, p
  u64 tgt_p, total_m;            // top-p target and the row's mass (mass units)
  Stat red_stat[16];             // per-warp scratch (at most 16 warps)
  Gum red_gum[16];
  u64 red_u[16];
  int red_i[16];
  int res_i[4];
  u64 res_u[4];
  u32 ncand;
  int row_id;  // the row this cluster samples
};

__device__ __forceinline__ unsigned char* smem_base() {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  return dyn_smem;
}
__device__ __forceinline__ Misc& misc() { return *reinterpret_cast<Misc*>(smem_base()); }

__host__ __device__ constexpr size_t align16(size_t x) { return (x + 15) & ~static_cast<size_t>(15); }
// Layout: Misc | data[chunk] | cand[cap] | hc[kBins] | hh[kBins] | hl[kBins] | flags[kBins]; the
// gathered candidates (gath[cap]) alias hc.. once no CTA reads a histogram any more.
__host__ __device__ constexpr size_t off_data() { return align16(sizeof(Misc)); }
__host__ __device__ constexpr size_t off_cand(int chunk) { return off_data() + align16(static_cast<size_t>(chunk) * 4); }
__host__ __device__ constexpr size_t off_hist(int chunk, int cap) { return off_cand(chunk) + static_cast<size_t>(cap) * 8; }
__host__ __device__ constexpr size_t smem_bytes(int chunk, int cap) {
  return off_hist(chunk, cap) + kBins * 4 * 3 + kBins;
}
static_assert(kMaxCap * 8 <= kBins * 4 * 3, "the gathered candidates alias the histograms");

template <int kT>
struct Bufs {
  float* data;
  u64* cand;
  u32 *hc, *hh, *hl;
  u64* gath;
  unsigned char* flags;
  __device__ __forceinline__ explicit Bufs(int chunk) {
    unsigned char* b = smem_base();
    data = reinterpret_cast<float*>(b + off_data());
    cand = reinterpret_cast<u64*>(b + off_cand(chunk));
    hc = reinterpret_cast<u32*>(b + off_hist(chunk, cap_of<kT>()));
    hh = hc + kBins;
    hl = hh + kBins;
    gath = reinterpret_cast<u64*>(hc);
    flags = reinterpret_cast<unsigned char*>(hl + kBins);
  }
};

// Calls f(value, id) for this CTA's n elements (ids base..base+n-1), a float4 at a time.
template <int kT, typename F>
__device__ __forceinline__ void for_local(const float* data, int n, int base, F&& f) {
  const int n4 = n >> 2;
  const float4* d4 = reinterpret_cast<const float4*>(data);
#pragma unroll 2
  for (int j = threadIdx.x; j < n4; j += kT) {
    const float4 v = d4[j];
    const int i = base + 4 * j;
    f(v.x, i);
    f(v.y, i + 1);
    f(v.z, i + 2);
    f(v.w, i + 3);
  }
  for (int j = 4 * n4 + threadIdx.x; j < n; j += kT) f(data[j], base + j);
}

// Block-wide reductions and scans in a fixed order; every thread gets the result.
template <int kT>
__device__ u64 block_sum_u64(u64 v) {
  Misc& ms = misc();
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) ms.red_u[threadIdx.x >> 5] = v;
  __syncthreads();
  u64 s = 0;
  for (int w = 0; w < kT / 32; ++w) s += ms.red_u[w];
  __syncthreads();
  return s;
}
template <int kT>
__device__ int block_sum_int(int v) {
  Misc& ms = misc();
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) ms.red_i[threadIdx.x >> 5] = v;
  __syncthreads();
  int s = 0;
  for (int w = 0; w < kT / 32; ++w) s += ms.red_i[w];
  __syncthreads();
  return s;
}
template <int kT>
__device__ u64 block_excl_scan_u64(u64 v) {
  Misc& ms = misc();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const u64 incl = warp_incl_scan(v);
  __syncthreads();
  if (lane == 31) ms.red_u[warp] = incl;
  __syncthreads();
  u64 before = incl - v;
  for (int w = 0; w < warp; ++w) before += ms.red_u[w];
  __syncthreads();
  return before;
}
template <int kT>
__device__ Gum block_gum(Gum g) {
  Misc& ms = misc();
#pragma unroll
  for (int o = 16; o > 0; o /= 2) g = merge_gum(g, shfl_gum(g, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) ms.red_gum[threadIdx.x >> 5] = g;
  __syncthreads();
  Gum s = ms.red_gum[0];
  for (int w = 1; w < kT / 32; ++w) s = merge_gum(s, ms.red_gum[w]);
  __syncthreads();
  return s;
}

// ---------------------------------------------------------------- Gumbel sweep over a kept set

// Over this CTA's elements: kept = (thr off or composite >= (xt, idt)) and (min-p off or
// exp(x - m) >= min_p or id == ip). The exact noise only where x - log(1 - u) can reach `gate`.
template <int kT, bool kThr, bool kMinp>
__device__ __forceinline__ Gum gumbel_sweep(float xt, int idt, float gate) {
  const Row& R = misc().row;
  const Bufs<kT> sm(R.chunk);
  const float m = R.m, min_p = R.min_p;
  const int ip = R.ip;
  const u32 key = R.key;
  // exp(x - gate') = e * sT for gate' = gate - slack: the slack covers the fast exp and the
  // rounding of x + noise near the max.
  const float sT = ex2((m - gate + kGateSlack + fabsf(m) * 1e-6f) * kL2E);
  Gum g{neg_inf(), kNone, 0.f, 0};
  for_local<kT>(sm.data, R.n, R.lo, [&](float x, int id) {
    const float e = rel_exp(m - x);
    bool kept = true;
    if (kThr) kept = x > xt || (x == xt && id <= idt);
    if (kMinp) kept = kept && (e >= min_p || id == ip);
    if (!kept) return;
    g.z += e;
    g.cnt += 1;
    const u32 h = token_hash(key, id);
    if (one_minus_u_lb(h) <= e * sT) {
      const float v = x + noise_exact(h);
      if (v > g.bv || (v == g.bv && id < g.bi)) g.bv = v, g.bi = id;
    }
  });
  return g;
}

// The cluster's Gumbel-max over the kept set: pushed to every CTA, one cluster barrier, merged in
// rank order (every CTA gets the same).
template <int kT>
__device__ __noinline__ Gum gumbel_cluster(bool thr_on, float xt, int idt, float gate, int set) {
  Misc& ms = misc();
  const Row& R = ms.row;
  Gum g;
  if (thr_on) {
    g = R.minp_on ? gumbel_sweep<kT, true, true>(xt, idt, gate) : gumbel_sweep<kT, true, false>(xt, idt, gate);
  } else {
    g = R.minp_on ? gumbel_sweep<kT, false, true>(xt, idt, gate) : gumbel_sweep<kT, false, false>(xt, idt, gate);
  }
  // The top token is always kept and its exact value bounds the winner from below (so a redone
  // sweep has a finite gate); every CTA offers it, the merge keeps one.
  if (threadIdx.x == 0) {
    const float v = R.m + noise_exact(token_hash(R.key, R.ip));
    if (v > g.bv || (v == g.bv && R.ip < g.bi)) g.bv = v, g.bi = R.ip;
  }
  g = block_gum<kT>(g);
  if (threadIdx.x == 0)
    for (u32 q = 0; q < R.C; ++q) at_rank(&ms.gpart[set][R.rank], q)[0] = g;
  cl_sync();
  Gum s = ms.gpart[set][0];
  for (u32 q = 1; q < R.C; ++q) s = merge_gum(s, ms.gpart[set][q]);
  return s;
}

// The gate is below the winning value for all but ~2e-9 of rows; when the best found is below it,
// the sweep is redone with the best found as the gate (then exact).
template <int kT>
__device__ Gum gumbel_kept(bool thr_on, float xt, int idt, float gate) {
  Gum g = gumbel_cluster<kT>(thr_on, xt, idt, gate, 0);
  if (g.bv < gate) g = gumbel_cluster<kT>(thr_on, xt, idt, g.bv, 1);
  return g;
}

// ---------------------------------------------------------------- selection run

// First position of the sorted candidates whose bin (in the run's binning) is >= b.
__device__ __forceinline__ int first_pos(const u64* g, const Run& run, int b) {
  int lo = 0, hi = run.N;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (static_cast<int>(bin_of(run.M - key_value(g[mid]), run.scale, run.dmax)) < b)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Warp-level crossing search over the cluster histogram: the first bin (descending values) where
// the running count (or mass) reaches target >= 1. The super-bins are reduced already; the 32 bins
// of the crossing super-bin are summed over the CTAs here.
template <int kT>
__device__ Found warp_find(u64 target, bool by_mass, u32 C, bool with_mass) {
  const Misc& ms = misc();
  const Bufs<kT> sm(ms.row.chunk);
  const int lane = threadIdx.x & 31;
  Found f{-1, 0, 0, 0, 0, 0};
  const u64 c0 = ms.rsc[2 * lane], c1 = ms.rsc[2 * lane + 1], m0 = ms.rsm[2 * lane], m1 = ms.rsm[2 * lane + 1];
  const u64 a0 = by_mass ? m0 : c0, a1 = by_mass ? m1 : c1;
  const u64 ai = warp_incl_scan(a0 + a1), ae = ai - (a0 + a1);
  const u64 ci = warp_incl_scan(c0 + c1), ce = ci - (c0 + c1);
  const u64 mi = warp_incl_scan(m0 + m1), me = mi - (m0 + m1);
  const bool h0 = ae < target && target <= ae + a0;
  const bool h1 = !h0 && ae + a0 < target && target <= ai;
  const u32 bal = __ballot_sync(0xffffffffu, h0 || h1);
  if (bal == 0) return f;
  const int src = __ffs(bal) - 1;
  const bool s1 = __shfl_sync(0xffffffffu, h1, src);
  const int sb = 2 * src + (s1 ? 1 : 0);
  const u64 abefore = __shfl_sync(0xffffffffu, s1 ? ae + a0 : ae, src);
  const u64 cbefore = __shfl_sync(0xffffffffu, s1 ? ce + c0 : ce, src);
  const u64 mbefore = __shfl_sync(0xffffffffu, s1 ? me + m0 : me, src);
  const int b = sb * 32 + lane;
  u32 c = 0;
  u64 m = 0;
  for (u32 q = 0; q < C; ++q) {
    const u32 cq = at_rank(sm.hc, q)[b];
    c += cq;
    if (with_mass) m += bin_mass(cq, at_rank(sm.hh, q)[b], at_rank(sm.hl, q)[b]);
  }
  const u64 a = by_mass ? m : static_cast<u64>(c);
  const u64 fi = warp_incl_scan(a), fe = fi - a;
  const u64 fci = warp_incl_scan(static_cast<u64>(c));
  const u64 fmi = warp_incl_scan(m);
  const bool hit = abefore + fe < target && target <= abefore + fi;
  const u32 bal2 = __ballot_sync(0xffffffffu, hit);
  if (bal2 == 0) return f;
  const int L = __ffs(bal2) - 1;
  f.bin = sb * 32 + L;
  f.before = static_cast<u32>(cbefore + __shfl_sync(0xffffffffu, fci - c, L));
  f.cnt = __shfl_sync(0xffffffffu, c, L);
  f.mbefore = mbefore + __shfl_sync(0xffffffffu, fmi - m, L);
  f.mass = __shfl_sync(0xffffffffu, m, L);
  u32 nxt = __shfl_sync(0xffffffffu, c, (L + 1) & 31);
  if (L == 31) {
    nxt = 0;
    if (f.bin + 1 < kBins)
      for (u32 q = 0; q < C; ++q) nxt += at_rank(sm.hc, q)[f.bin + 1];
  }
  f.next = nxt;
  return f;
}

// One selection over the values in shared memory (x, or v for a raw run) relative to their max M:
// histogram; cluster crossing searches for the requested targets (the k-th by count, the n-th by
// count for the top-n window, the top-p target by mass over the whole row); the elements of the
// flagged bins (a prefix of bins where that fits, else the top-n prefix and the threshold's bin)
// compacted, gathered into gath and sorted descending - by every CTA when `thr_rows` outside a
// prefix (the threshold then feeds a sweep over every CTA's elements), else by rank 0 alone.
// The outcome lands in misc().run. On ok, every CTA has called cl_arrive() once after its gather
// and must call cl_wait() before it exits or writes to another CTA; on !ok nothing is pending.
template <int kT>
__device__ __noinline__ void select_run(float M, float D, bool with_mass, int k, int n, bool p_on, float top_p,
                                        bool thr_rows) {
  constexpr int kCap = cap_of<kT>();
  Misc& ms = misc();
  const Row& R = ms.row;
  const Bufs<kT> sm(R.chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float dmax;
  const float scale = pick_scale(D, dmax);

  // Histogram of the local elements.
  for (int b = threadIdx.x; b < kBins; b += kT) {
    sm.hc[b] = 0;
    if (with_mass) sm.hh[b] = 0, sm.hl[b] = 0;
  }
  if (threadIdx.x == 0) ms.lovf = 0;
  __syncthreads();
  if (with_mass) {
    for_local<kT>(sm.data, R.n, 0, [&](float x, int) {
      const float d = M - x;
      const u32 b = bin_of(d, scale, dmax);
      u32 hb, lb;
      mass_bits(rel_exp(d), hb, lb);
      atomicAdd(&sm.hc[b], 1u);
      atomicAdd(&sm.hh[b], hb);
      atomicAdd(&sm.hl[b], lb);
    });
  } else {
    for_local<kT>(sm.data, R.n, 0, [&](float x, int) { atomicAdd(&sm.hc[bin_of(M - x, scale, dmax)], 1u); });
  }
  __syncthreads();
  for (int sb = warp; sb < kSuper; sb += kT / 32) {
    const int b = sb * 32 + lane;
    const u32 c = sm.hc[b];
    const u64 mm = with_mass ? bin_mass(c, sm.hh[b], sm.hl[b]) : 0;
    if (__any_sync(0xffffffffu, with_mass && c >= 4096) && lane == 0) ms.lovf = 1;
    const u32 cs = warp_sum(c);
    const u64 msum = warp_sum(mm);
    if (lane == 0) ms.lsc[sb] = cs, ms.lsm[sb] = msum;
  }
  __syncthreads();
  cl_sync();  // every CTA's histogram is complete
  for (int t = threadIdx.x; t < kSuper; t += kT) {
    u64 c = 0, mm = 0;
    for (u32 q = 0; q < R.C; ++q) {
      c += at_rank(ms.lsc, q)[t];
      mm += at_rank(ms.lsm, q)[t];
    }
    ms.rsc[t] = c;
    ms.rsm[t] = mm;
  }
  if (threadIdx.x == 0) {
    u32 o = 0;
    for (u32 q = 0; q < R.C; ++q) o |= *at_rank(&ms.lovf, q);
    ms.rovf = o;
  }
  __syncthreads();

  // Crossing searches, a warp each.
  if (warp == 0 && k > 0) {
    const Found f = warp_find<kT>(static_cast<u64>(k), false, R.C, with_mass);
    if (lane == 0) ms.found[0] = f;
  }
  if (warp == 1 && n > 0) {
    const Found f = warp_find<kT>(static_cast<u64>(n), false, R.C, with_mass);
    if (lane == 0) ms.found[1] = f;
  }
  if (warp == 2 && p_on) {
    const u64 total = warp_sum(ms.rsm[2 * lane] + ms.rsm[2 * lane + 1]);
    u64 tgt = static_cast<u64>(static_cast<double>(top_p) * static_cast<double>(total));
    if (tgt > total) tgt = total;
    Found f{-1, 0, 0, 0, 0, 0};
    if (tgt > 0) f = warp_find<kT>(tgt, true, R.C, with_mass);
    if (lane == 0) ms.found[2] = f, ms.tgt_p = tgt, ms.total_m = total;
  }
  __syncthreads();

  // The plan: which bins' elements become candidates.
  if (threadIdx.x == 0) {
    bool ok = !(with_mass && ms.rovf);
    int bmax = -1, en = -1, bt = -1;
    u64 pmax = 0, pn = 0, ct = 0;
    if (k > 0) {
      const Found& f = ms.found[0];
      ok = ok && f.bin >= 0;
      bt = f.bin, ct = f.cnt;
      if (f.bin > bmax) bmax = f.bin, pmax = static_cast<u64>(f.before) + f.cnt;
    }
    if (p_on) {  // never with k: top-p over the top-k set resolves on the candidates
      const Found& f = ms.found[2];
      ok = ok && f.bin >= 0;
      bt = f.bin, ct = f.cnt;
      if (f.bin > bmax) bmax = f.bin, pmax = static_cast<u64>(f.before) + f.cnt;
    }
    if (n > 0) {
      const Found& f = ms.found[1];
      ok = ok && f.bin >= 0;
      en = min(f.bin + 1, kBins - 1);
      pn = static_cast<u64>(f.before) + f.cnt + (f.bin + 1 < kBins ? f.next : 0);
      if (en > bmax) bmax = en, pmax = pn;
    }
    ok = ok && bmax >= 0;
    const bool prefix = ok && pmax <= static_cast<u64>(kCap);
    u64 N = pmax;
    if (ok && !prefix) {
      N = (n > 0 ? pn : 0) + (bt >= 0 && bt > en ? ct : 0);
      ok = N <= static_cast<u64>(kCap);
    }
    Run& run = ms.run;
    run.ok = ok;
    run.prefix = prefix;
    run.bmax = bmax;
    run.en = en;
    run.bt = prefix ? -1 : bt;
    run.N = static_cast<int>(N);  // expected; checked against the compaction
    run.M = M, run.scale = scale, run.dmax = dmax;
    ms.ncand = 0;
  }
  __syncthreads();
  const Run plan = ms.run;
  if (!plan.ok) {
    cl_sync();  // no CTA still reads this CTA's histogram
    return;
  }
  for (int b = threadIdx.x; b < kBins; b += kT)
    sm.flags[b] = plan.prefix ? (b <= plan.bmax) : ((b <= plan.en) || b == plan.bt);
  __syncthreads();

  // Compaction. Elements below the lowest flagged bin (with a bin of slack for the rounding of d)
  // are skipped on their value alone, where M's float spacing is finer than a quarter bin.
  const float xpre = plan.bmax < kBins - 1 && fabsf(M) * scale < 2097152.f
                         ? M - static_cast<float>(plan.bmax + 2) / scale
                         : neg_inf();  // (the last bin also holds everything below it)
  for_local<kT>(sm.data, R.n, R.lo, [&](float x, int id) {
    if (!(x >= xpre)) return;
    if (!sm.flags[bin_of(M - x, scale, dmax)]) return;
    const u32 s = atomicAdd(&ms.ncand, 1u);
    if (s < static_cast<u32>(kCap)) sm.cand[s] = composite(x, id);
  });
  __syncthreads();
  if (threadIdx.x == 0)
    for (u32 q = 0; q < R.C; ++q) at_rank(&ms.ncand_all[R.rank], q)[0] = ms.ncand;
  cl_sync();  // every CTA's candidates are written; no CTA reads a histogram any more
  int N = 0;
  bool fits = true;
  for (u32 q = 0; q < R.C; ++q) {
    fits = fits && ms.ncand_all[q] <= static_cast<u32>(kCap);
    N += static_cast<int>(min(ms.ncand_all[q], static_cast<u32>(kCap)));
  }
  __syncthreads();
  if (threadIdx.x == 0) ms.run.ok = fits && N == plan.N;
  __syncthreads();
  if (!ms.run.ok) return;  // only local reads since the barrier
  if ((thr_rows && !plan.prefix) || R.rank == 0) {
    int off = 0;
    for (u32 q = 0; q < R.C; ++q) {
      const int cnt = static_cast<int>(ms.ncand_all[q]);
      const u64* src = at_rank(sm.cand, q);
      for (int i = threadIdx.x; i < cnt; i += kT) sm.gath[off + i] = src[i];
      off += cnt;
    }
    __syncthreads();
    cl_arrive();  // this CTA has read every CTA's candidates
    sort_desc<kT>(sm.gath, N);
  } else {
    cl_arrive();
  }
}

// First position q in [qa, qb) of the sorted candidates where base + the mass of qa..q reaches
// target, and that sum; -1 if none. Block-wide.
template <int kT>
__device__ __noinline__ int mass_crossing(int qa, int qb, u64 base, u64 target, u64* cum) {
  Misc& ms = misc();
  const Bufs<kT> sm(ms.row.chunk);
  const float m = ms.row.m;
  const int len = max(qb - qa, 0);
  const int per = (len + kT - 1) / kT;
  const int s = qa + threadIdx.x * per, e = min(s + per, qb);
  u64 local = 0;
  for (int q = s; q < e; ++q) local += mass_of(rel_exp(m - key_value(sm.gath[q])));
  u64 run = base + block_excl_scan_u64<kT>(local);
  if (threadIdx.x == 0) ms.res_i[0] = -1, ms.res_u[0] = 0;
  __syncthreads();
  if (run < target && target <= run + local) {
    for (int q = s; q < e; ++q) {
      run += mass_of(rel_exp(m - key_value(sm.gath[q])));
      if (run >= target) {
        ms.res_i[0] = q;
        ms.res_u[0] = run;
        break;
      }
    }
  }
  __syncthreads();
  const int q = ms.res_i[0];
  *cum = ms.res_u[0];
  __syncthreads();
  return q;
}

// The kept predicate on a candidate key (thr_on: composite >= thr; min-p unless the top token).
struct Kept {
  bool thr_on;
  u64 thr, ctop;
  __device__ __forceinline__ bool operator()(u64 c, const Row& R) const {
    if (thr_on && c < thr) return false;
    if (R.minp_on && c != ctop && !(rel_exp(R.m - key_value(c)) >= R.min_p)) return false;
    return true;
  }
};

// Writes the top-n logprobs of the row from the sorted candidates gath[0..W), which hold every
// element of the bins up to the window's end (so every element that can rank in the top n), ranked
// by composite(value, id); value = (x - mr) - log_zr (raw) or kept ? (x - m) - log_zk : -inf.
// Block-wide (rank 0). With `strict`, false when elements outside the window could tie the n-th.
template <int kT>
__device__ __noinline__ bool emit_top(int W, bool raw, Kept kept, float log_zk, bool strict) {
  Misc& ms = misc();
  const SampleParams& p = ms.prm;
  const Row& R = ms.row;
  const Bufs<kT> sm(R.chunk);
  const int n = R.ntop;
  // The values' composites into cand (free: every CTA is done with its gather).
  for (int q = threadIdx.x; q < W; q += kT) {
    const u64 c = sm.gath[q];
    const float x = key_value(c);
    const float v = raw ? (x - R.mr) - R.log_zr : kept(c, R) ? (x - R.m) - log_zk : neg_inf();
    sm.cand[q] = composite(v, key_id(c));
  }
  if (threadIdx.x == 0) ms.res_i[1] = 1;
  __syncthreads();
  const float scale = ms.run.scale;
  for (int a = threadIdx.x; a < W; a += kT) {
    const u64 ca = sm.cand[a];
    int rank = 0;
    for (int b = 0; b < W; ++b) rank += sm.cand[b] > ca;
    if (rank < n) {
      const float v = key_value(ca);
      p.top_ids[R.r * p.num_top + rank] = key_id(ca);
      p.top_logprobs[R.r * p.num_top + rank] = v;
      // Elements outside the window sit over a bin width (1 / scale) below its last element:
      // their logprobs cannot round to the n-th's while its float spacing is under half of that.
      if (rank == n - 1 && !(fabsf(v) * scale < 2097152.f)) ms.res_i[1] = 0;
    }
  }
  for (int a = n + threadIdx.x; a < p.num_top; a += kT) {  // num_top > vocab: pad
    p.top_ids[R.r * p.num_top + a] = 0;
    p.top_logprobs[R.r * p.num_top + a] = neg_inf();
  }
  __syncthreads();
  const bool ok = !strict || (ms.res_i[1] && W >= n);
  __syncthreads();
  return ok;
}

// Fewer kept tokens than n: after the kept ones (ranks [0, K)), the lowest ids not kept at -inf, as
// the composites of -inf order them. Rank 0 holds ids [0, chunk). Block-wide; false if short.
template <int kT>
__device__ __noinline__ bool fill_top(int K, Kept kept) {
  const SampleParams& p = misc().prm;
  const Row& R = misc().row;
  const Bufs<kT> sm(R.chunk);
  int filled = K;
  for (int base = 0; filled < R.ntop && base < R.n; base += kT) {
    const int j = base + threadIdx.x;
    const bool nk = j < R.n && !kept(composite(sm.data[j], j), R);
    const int slot = filled + static_cast<int>(block_excl_scan_u64<kT>(nk ? 1 : 0));
    if (nk && slot < R.ntop) {
      p.top_ids[R.r * p.num_top + slot] = j;
      p.top_logprobs[R.r * p.num_top + slot] = neg_inf();
    }
    filled += block_sum_int<kT>(nk ? 1 : 0);
  }
  return filled >= R.ntop;
}

// ---------------------------------------------------------------- the kernel

// The one-CTA algorithm on the row, by rank 0 from global memory (the others return). Callers reach
// it only where no CTA will touch another's shared memory again.
template <int kT>
__device__ __noinline__ void fallback_row() {
  const Row& R = misc().row;
  const int64_t r = R.r;
  const bool leader = R.rank == 0;
  const SampleParams p = misc().prm;
  __syncthreads();  // the Shared below overlays the row context
  if (leader) rowwise::sample_row<kT>(p, r, *reinterpret_cast<rowwise::Shared*>(smem_base()));
}

__device__ __forceinline__ void write_token(const Row& R, int token, float log_zk) {
  if (R.rank != 0 || threadIdx.x != 0) return;
  const SampleParams& p = misc().prm;
  const float v = __ldg(R.gsrc + token);
  const float lp_raw = (v - R.mr) - R.log_zr;
  p.tokens[R.r] = token;
  p.logprobs_raw[R.r] = lp_raw;
  p.logprobs_processed[R.r] = R.greedy ? lp_raw : (v / R.t - R.m) - log_zk;
}

// Load and statistics; fills misc().row. Returns false for rows the fast path does not take.
template <int kT>
__device__ __noinline__ bool load_and_stats(int chunk) {
  Misc& ms = misc();
  const SampleParams& p = ms.prm;
  Row& W = ms.row;
  if (threadIdx.x == 0) {
    W.C = cl_size();
    W.rank = cl_rank();
    W.r = ms.row_id;
    W.vocab = static_cast<int>(p.vocab);
    W.chunk = chunk;
    W.lo = static_cast<int>(W.rank) * chunk;
    W.n = max(0, min(W.vocab - W.lo, chunk));
    W.gsrc = p.logits + W.r * p.row_stride;
    const float temp = p.temperature[W.r];
    W.greedy = !(temp > 0.f);
    W.t = W.greedy ? 1.f : temp;
    W.t1 = W.greedy || temp == 1.f;
    W.k = p.top_k[W.r];
    W.top_p = p.top_p[W.r];
    W.min_p = p.min_p[W.r];
    W.topk_on = !W.greedy && W.k > 0 && W.k < W.vocab;
    W.topp_on = !W.greedy && W.top_p < 1.f;
    W.minp_on = !W.greedy && W.min_p > 0.f;
    W.p_zero = W.topp_on && !(W.top_p > 0.f);
    W.ntop = static_cast<int>(min(static_cast<int64_t>(p.num_top), p.vocab));
    W.raw_top = p.num_top > 0 && (W.greedy || !p.top_from_processed);
    W.key = row_key(p.seed[W.r], p.position[W.r]);
  }
  __syncthreads();
  const Row& R = ms.row;
  const Bufs<kT> sm(chunk);
  const bool with_mass = R.topp_on && !R.topk_on && !R.p_zero;
  const bool sep_raw = R.ntop > 0 && R.raw_top && !R.t1;
  const bool need_zr = R.greedy || !R.t1 || !with_mass || R.raw_top;  // else from the bin masses
  const bool need_zp = !R.greedy && !R.t1 && !(R.topk_on || R.topp_on || R.minp_on);
  const bool store_x = !R.t1 && !sep_raw;
  const int n = R.n, lo = R.lo;
  const float t = R.t;
  const bool t1 = R.t1;

  // Load the chunk (16-byte async copies: the host takes this path only for aligned rows).
  {
    const float* src = R.gsrc + lo;
    const int n4 = n >> 2;
    const u32 sbase = static_cast<u32>(__cvta_generic_to_shared(sm.data));
    for (int j = threadIdx.x; j < n4; j += kT) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sbase + 16u * j),
                   "l"(__cvta_generic_to_global(src + 4 * j))
                   : "memory");
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    for (int j = 4 * n4 + threadIdx.x; j < n; j += kT) sm.data[j] = __ldg(src + j);
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();
  }

  // Pass A: the thread's max, where it first occurs, and the spread sample.
  const int n4 = n >> 2;
  const float4* d4 = reinterpret_cast<const float4*>(sm.data);
  float mr = neg_inf(), vsum = 0.f;
  int jb = -1, vcnt = 0;
  for (int j = threadIdx.x; j < n4; j += kT) {
    const float4 v = d4[j];
    const float g = fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w));
    if (g > mr) mr = g, jb = 4 * j;
    if (v.x > neg_inf() && v.x < -neg_inf()) vsum += v.x, vcnt += 1;  // finite: masked ids are -inf
  }
  for (int j = 4 * n4 + threadIdx.x; j < n; j += kT) {
    const float v = sm.data[j];
    if (v > mr) mr = v, jb = j;
  }
  int ir = kNone;
  if (jb >= 0)
    for (int j = jb; j < min(jb + 4, n); ++j)
      if (sm.data[j] == mr) {
        ir = lo + j;
        break;
      }
  // Pass B: sums of exp relative to the thread's max; x = v / t, monotone in v, so the thread's
  // processed max is mr / t.
  const float mp = mr / t;
  const float mrs = mr > neg_inf() ? mr : 0.f, mps = mp > neg_inf() ? mp : 0.f;
  float zr = 0.f, zp = 0.f;
  int ip = t1 ? ir : kNone;
  if (need_zr || !t1) {
    float4* w4 = reinterpret_cast<float4*>(sm.data);
    for (int j = threadIdx.x; j < n4; j += kT) {
      const float4 v = d4[j];
      if (need_zr)
        zr += (ex2((v.x - mrs) * kL2E) + ex2((v.y - mrs) * kL2E)) + (ex2((v.z - mrs) * kL2E) + ex2((v.w - mrs) * kL2E));
      if (!t1) {
        const float4 x = make_float4(v.x / t, v.y / t, v.z / t, v.w / t);
        if (store_x) w4[j] = x;
        if (ip == kNone && (x.x == mp || x.y == mp || x.z == mp || x.w == mp))
          ip = lo + 4 * j + (x.x == mp ? 0 : x.y == mp ? 1 : x.z == mp ? 2 : 3);
        if (need_zp)
          zp += (ex2((x.x - mps) * kL2E) + ex2((x.y - mps) * kL2E)) + (ex2((x.z - mps) * kL2E) + ex2((x.w - mps) * kL2E));
      }
    }
    for (int j = 4 * n4 + threadIdx.x; j < n; j += kT) {
      const float v = sm.data[j];
      if (need_zr) zr += ex2((v - mrs) * kL2E);
      if (!t1) {
        const float x = v / t;
        if (store_x) sm.data[j] = x;
        if (ip == kNone && x == mp) ip = lo + j;  // tail ids come after the float4 ids
        if (need_zp) zp += ex2((x - mps) * kL2E);
      }
    }
  }
  Stat st{mr, mr > neg_inf() ? zr : 0.f, ir, mp, mp > neg_inf() ? zp : 0.f, ip, vsum, vcnt};
  // Block merge (fixed butterfly, warps in order), a push to every CTA, a merge in rank order:
  // every thread of the cluster gets the same statistics.
#pragma unroll
  for (int o = 16; o > 0; o /= 2) st = merge_stat(st, shfl_stat(st, o));
  if ((threadIdx.x & 31) == 0) ms.red_stat[threadIdx.x >> 5] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stat s = ms.red_stat[0];
    for (int w = 1; w < kT / 32; ++w) s = merge_stat(s, ms.red_stat[w]);
    for (u32 q = 0; q < R.C; ++q) at_rank(&ms.spart[R.rank], q)[0] = s;
  }
  cl_sync();
  if (threadIdx.x == 0) {
    Stat s = ms.spart[0];
    for (u32 q = 1; q < R.C; ++q) s = merge_stat(s, ms.spart[q]);
    W.mr = s.mr;
    W.ir = s.ir;
    W.m = t1 ? s.mr : s.mp;
    W.ip = t1 ? s.ir : s.ip;
    W.zall = t1 ? s.zr : s.zp;
    W.log_zr = logf(s.zr);
    W.mean_v = s.vcnt > 0 ? s.vsum / static_cast<float>(s.vcnt) : s.mr;
    W.need_zr = need_zr;
  }
  __syncthreads();
  // Rows with an infinite or NaN max take the one-CTA algorithm; past the barrier above no CTA
  // reads another's shared memory.
  return isfinite(R.mr) && isfinite(R.m) && R.ir != kNone && R.ip != kNone;
}

// Samples row `row` with this cluster (every CTA calls it with the same row).
template <int kT>
__device__ __forceinline__ void cluster_row(const SampleParams& p, int chunk, int row) {
  Misc& ms = misc();
  const Row& R = ms.row;
  if (threadIdx.x == 0) ms.prm = p, ms.row_id = row;
  __syncthreads();
  if (!load_and_stats<kT>(chunk)) {
    fallback_row<kT>();
    return;
  }
  const Bufs<kT> sm(chunk);
  const bool sep_raw = R.ntop > 0 && R.raw_top && !R.t1;  // raw top-n on v before v becomes x
  const bool top_here = R.ntop > 0 && !sep_raw;           // the top-n from the run on x below
  const bool with_mass = R.topp_on && !R.topk_on && !R.p_zero;

  if (sep_raw) {
    select_run<kT>(R.mr, R.mr - R.mean_v, false, 0, R.ntop, false, 1.f, false);
    if (!ms.run.ok) {
      fallback_row<kT>();
      return;
    }
    int ok = 1;
    if (R.rank == 0) ok = emit_top<kT>(first_pos(sm.gath, ms.run, ms.run.en + 1), true, Kept{}, 0.f, true);
    cl_wait();
    if (R.rank == 0 && threadIdx.x == 0)  // only rank 0 knows: tell every CTA
      for (u32 q = 0; q < R.C; ++q) at_rank(&ms.top_ok, q)[0] = ok;
    cl_sync();
    if (!ms.top_ok) {
      fallback_row<kT>();
      return;
    }
    float4* w4 = reinterpret_cast<float4*>(sm.data);
    const float t = R.t;
    for (int j = threadIdx.x; j < (R.n >> 2); j += kT) {
      const float4 v = w4[j];
      w4[j] = make_float4(v.x / t, v.y / t, v.z / t, v.w / t);
    }
    for (int j = 4 * (R.n >> 2) + threadIdx.x; j < R.n; j += kT) sm.data[j] = sm.data[j] / t;
    __syncthreads();
  }

  if (R.greedy && !top_here) {
    write_token(R, R.ir, 0.f);
    return;
  }
  if (R.p_zero && !R.topk_on && !top_here) {  // the top token alone is kept
    write_token(R, R.ip, 0.f);
    return;
  }
  if (!R.greedy && !R.topk_on && !R.topp_on && !top_here) {
    // No threshold: the Gumbel-max over everything (min-p as a predicate).
    const float gate = R.minp_on ? R.m - kGumbelMargin : R.m + logf(R.zall) - kGumbelMargin;
    const Gum g = gumbel_kept<kT>(false, 0.f, 0, gate);
    write_token(R, g.bi, logf(g.z));
    return;
  }

  // Selection on x: top-k, top-p (over the row, or over the top-k set), the top-n window.
  const bool thr_rows = !R.greedy && (R.topk_on || R.topp_on);
  select_run<kT>(R.m, R.m - R.mean_v / R.t, with_mass, R.topk_on ? R.k : 0, top_here ? R.ntop : 0, with_mass,
                 R.top_p, thr_rows);
  const Run run = ms.run;
  if (!run.ok) {
    fallback_row<kT>();
    return;
  }
  if (!R.need_zr && threadIdx.x == 0) ms.row.log_zr = logf(static_cast<float>(static_cast<double>(ms.total_m) * 0x1p-40));
  __syncthreads();
  const int N = run.N;
  const u64 ctop = composite(R.m, R.ip);
  const bool everyone = thr_rows && !run.prefix;  // the threshold feeds a sweep over every CTA
  const bool kept_in_cands = thr_rows && run.prefix;

  // Thresholds on the sorted candidates (by every CTA when `everyone`, else by rank 0).
  bool ok = true, zk_known = false;
  Kept kept{false, 0, ctop};
  u64 zk_fixed = 0;
  int qthr = -1;  // the threshold's position among the candidates
  if (everyone || R.rank == 0) {
    if (R.topk_on) {
      const Found fk = ms.found[0];
      const int fp0 = first_pos(sm.gath, run, fk.bin), fp1 = first_pos(sm.gath, run, fk.bin + 1);
      const int qk = fp0 + (R.k - 1 - static_cast<int>(fk.before));
      ok = qk >= fp0 && qk < fp1;
      if (ok) kept.thr_on = true, kept.thr = sm.gath[qk], qthr = qk;
      if (ok && R.topp_on) {  // over the top-k set: candidates [0, qk] of a prefix
        ok = run.prefix;
        if (ok && R.p_zero) {
          kept.thr = ctop, qthr = 0;
        } else if (ok) {
          u64 T = 0;
          for (int q = threadIdx.x; q <= qk; q += kT) T += mass_of(rel_exp(R.m - key_value(sm.gath[q])));
          T = block_sum_u64<kT>(T);
          u64 tgt = static_cast<u64>(static_cast<double>(R.top_p) * static_cast<double>(T));
          if (tgt > T) tgt = T;
          u64 cum = 0;
          const int qp = tgt > 0 ? mass_crossing<kT>(0, qk + 1, 0, tgt, &cum) : 0;
          ok = qp >= 0;
          if (ok && qp < qthr) kept.thr = sm.gath[qp], qthr = qp;
        }
      }
    } else if (R.topp_on) {
      if (R.p_zero || ms.tgt_p == 0) {
        kept.thr_on = true, kept.thr = ctop, qthr = 0, zk_fixed = 1ull << 40, zk_known = true;
      } else {
        const Found fp = ms.found[2];
        int qa = 0, qb = N;
        u64 base = 0, cum = 0;
        if (!run.prefix) qa = first_pos(sm.gath, run, fp.bin), qb = first_pos(sm.gath, run, fp.bin + 1), base = fp.mbefore;
        const int qp = mass_crossing<kT>(qa, qb, base, ms.tgt_p, &cum);
        ok = qp >= 0;
        if (ok) kept.thr_on = true, kept.thr = sm.gath[qp], qthr = qp, zk_fixed = cum, zk_known = true;
      }
    }
    if (kept_in_cands) ok = ok && N > 0 && sm.gath[0] == ctop;
  }
  // `everyone`: every CTA agrees. Else rank 0 alone resolved, and only rows with a threshold can
  // fail there - whose other CTAs only wait and exit below.
  if (!ok) {
    cl_wait();
    fallback_row<kT>();
    return;
  }

  int token = R.ir;
  float log_zk = 0.f;
  int K = R.vocab;  // kept tokens
  if (R.greedy) {
    cl_wait();
    if (R.rank != 0) return;
  } else if (kept_in_cands) {
    cl_wait();
    if (R.rank != 0) return;
    // The kept set is candidates [0, qthr] less min-p: its mass and its Gumbel-max directly.
    u64 Z = 0;
    int cnt = 0;
    Gum g{neg_inf(), kNone, 0.f, 0};
    for (int q = threadIdx.x; q <= qthr; q += kT) {
      const u64 c = sm.gath[q];
      if (!kept(c, R)) continue;
      const float x = key_value(c);
      const int id = key_id(c);
      Z += mass_of(rel_exp(R.m - x));
      cnt += 1;
      const float v = x + noise_exact(token_hash(R.key, id));
      if (v > g.bv || (v == g.bv && id < g.bi)) g.bv = v, g.bi = id;
    }
    Z = block_sum_u64<kT>(Z);
    K = block_sum_int<kT>(cnt);
    g = block_gum<kT>(g);
    token = g.bi;
    log_zk = logf(static_cast<float>(static_cast<double>(Z) * 0x1p-40));
  } else {
    // The kept set is larger than the candidates: one Gumbel sweep over every CTA's elements.
    float gate = R.m - kGumbelMargin;  // the top token alone reaches it but for a 2e-9 chance
    const float xt = key_value(kept.thr);
    if (!R.minp_on) {
      if (zk_known)
        gate = fmaxf(gate, R.m + logf(static_cast<float>(static_cast<double>(zk_fixed) * 0x1p-40)) - kGumbelMargin);
      else if (!kept.thr_on)
        gate = R.m + logf(R.zall) - kGumbelMargin;
      else if (R.topk_on)  // k kept tokens of value >= xt: the log-sum-exp is >= log k + xt
        gate = fmaxf(gate, xt + logf(static_cast<float>(R.k)) - kGumbelMargin);
    }
    cl_wait();  // every CTA has gathered: the pushes below cannot race a gather
    const Gum g = gumbel_kept<kT>(kept.thr_on, xt, key_id(kept.thr), gate);
    if (R.rank != 0) return;
    token = g.bi;
    log_zk = logf(g.z);
    K = g.cnt;
  }

  // Rank 0 alone from here; the other CTAs are done with every shared memory.
  if (top_here) {
    const int W = first_pos(sm.gath, run, run.en + 1);
    bool tok;
    if (R.raw_top) {  // greedy or t == 1 rows: x == v
      tok = emit_top<kT>(W, true, kept, 0.f, true);
    } else if (K >= R.ntop) {
      tok = emit_top<kT>(W, false, kept, log_zk, true);
    } else {
      // Fewer kept tokens than n: every kept token is a candidate (the window holds the threshold).
      int kin = 0;
      for (int q = threadIdx.x; q < W; q += kT) kin += kept(sm.gath[q], R);
      kin = block_sum_int<kT>(kin);
      emit_top<kT>(W, false, kept, log_zk, false);
      tok = fill_top<kT>(K, kept) && kin == K;
    }
    if (!tok) {
      fallback_row<kT>();
      return;
    }
  }
  write_token(R, R.greedy ? R.ir : token, log_zk);
}

// A cluster per row; with a row list (kList: the split sampler's leftovers), a persistent grid of
// clusters over the list, so that an empty list costs one short wave instead of a cluster per row.
// (Two instantiations: the loop costs the per-row kernel registers, and spills.)
template <int kT, bool kList>
__global__ void __launch_bounds__(kT, kT == 512 ? 2 : 3) sample_cluster_kernel(const SampleParams p, int chunk) {
  if (!kList) {
    cluster_row<kT>(p, chunk, static_cast<int>(cl_id()));
    return;
  }
  const int count = p.row_list[0];
  const int clusters = static_cast<int>(gridDim.x / cl_size());
  for (int i = static_cast<int>(cl_id()); i < count; i += clusters) {
    cluster_row<kT>(p, chunk, p.row_list[1 + i]);
    cl_sync();  // no CTA still works on the row (or reads another's shared memory) when the next starts
  }
}

// ---------------------------------------------------------------- host side

// Says once on stderr why the cluster sampler is not used (the one-CTA sampler runs instead).
inline void report_unavailable(const char* what, cudaError_t err) {
  static bool said = false;
  if (!said) std::fprintf(stderr, "nmoe sample: %s (%s); using the one-CTA-per-row sampler\n", what, cudaGetErrorString(err));
  said = true;
}

// Launches the cluster sampler for `ranks` CTAs of kT threads a row; sets `unavailable` (and
// launches nothing) when the device cannot run that cluster shape.
template <int kT, bool kList>
const char* launch_as(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable) {
  const size_t bytes = std::max(smem_bytes(chunk, cap_of<kT>()), sizeof(rowwise::Shared));
  auto kernel = sample_cluster_kernel<kT, kList>;
  static size_t set_bytes = 0;
  static bool nonportable = false;
  cudaError_t err = cudaSuccess;
  if (bytes > set_bytes) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) {
      cudaGetLastError();
      report_unavailable("shared memory size refused", err);
      unavailable = true;
      return nullptr;
    }
    set_bytes = bytes;
  }
  if (ranks > 8 && !nonportable) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) {
      cudaGetLastError();
      report_unavailable("clusters over 8 CTAs refused", err);
      unavailable = true;
      return nullptr;
    }
    nonportable = true;
  }
  cudaLaunchConfig_t cfg{};
  static int fit[kMaxRanks + 1] = {};  // clusters of this shape resident at once (queried below)
  int64_t clusters = p.rows;
  cfg.blockDim = dim3(kT);
  cfg.dynamicSmemBytes = bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = ranks;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Whether the device holds the shape at all (a driver query: once per shape and size).
  static size_t checked_bytes[kMaxRanks + 1] = {};
  if (checked_bytes[ranks] < bytes) {
    int active = 0;
    cfg.gridDim = dim3(static_cast<unsigned>(p.rows * ranks));
    err = cudaOccupancyMaxActiveClusters(&active, kernel, &cfg);
    if (err != cudaSuccess || active < 1) {
      cudaGetLastError();
      report_unavailable("no cluster of this shape fits", err);
      unavailable = true;
      return nullptr;
    }
    checked_bytes[ranks] = bytes;
    fit[ranks] = active;
  }
  if (kList) clusters = std::min<int64_t>(clusters, fit[ranks]);
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * ranks));
  err = cudaLaunchKernelEx(&cfg, kernel, p, chunk);
  if (err != cudaSuccess) {
    cudaGetLastError();
    report_unavailable("cluster launch failed", err);
    unavailable = true;
  }
  return nullptr;
}

template <int kT>
const char* launch(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable) {
  return p.row_list != nullptr ? launch_as<kT, true>(p, ranks, chunk, stream, unavailable)
                               : launch_as<kT, false>(p, ranks, chunk, stream, unavailable);
}

}  // namespace nmoe::sampling::cluster

namespace nmoe::sampling {
// The cluster sampler with 8 CTAs of 512 threads (sample_cluster.cu) or 16 of 256 (sample_cluster16.cu).
const char* cluster_launch_512(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable);
const char* cluster_launch_256(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable);
}  // namespace nmoe::sampling
