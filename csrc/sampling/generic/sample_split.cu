// The split sampler (NMOE_SAMPLE_KERNEL=split): every row cut into chunks of up to 8192 logits (work
// items, row-major), run by persistent 256-thread CTAs, three an SM, each copying its next item into
// shared memory (cp.async) while it runs the current one - so a batch streams through HBM once,
// every SM busy. (The cluster sampler holds a row in shared memory and runs rows one after another
// per cluster slot: at B = 256 it is bound by one row's latency times ~8.) Same contract as the
// other samplers (docs/kernels.md, `sample`).
//
// Per chunk, out of shared memory:
//   stats  the raw max and its lowest id; the sums of exp relative to it, raw and processed
//          (x = v / t); non-finite values flag the row.
//   gumbel rows sampled over the whole vocabulary (no top-k / top-p / min-p): the chunk's exact
//          Gumbel-max, the exact noise only where an upper bound from the hash bits reaches the
//          chunk's log-sum-exp - 3 (the rare miss redoes the sweep with the best found as gate).
//   top    rows with a threshold or top-n: a 2048-bin histogram of d = max - x, the smallest prefix
//          of bins holding `target` elements (at most kCap), and those elements written out with
//          T_c, the least x among them: every finite x >= T_c of the chunk is a candidate (-inf:
//          every finite element is).
// Then one CTA per row (a second kernel, so every row's merge runs at once) merges its chunks in
// chunk order: the max,
// both log-sum-exps, and on the candidates with x >= T* = max T_c - exactly the top of the row in
// order - sorted, the top-k, top-p and min-p cuts, the Gumbel-max over the kept prefix, the top-n.
// A row it cannot resolve - a cut or a top-n entry below T* (a kept set deeper than the candidates),
// a max that is not finite - is listed in the workspace and sampled afterwards, whole, by the
// cluster sampler (SampleParams::row_list). Masses here are float sums in a fixed order (so rows are
// deterministic and independent of the batch), not the other samplers' 2^-40 fixed point: a top-p
// boundary token can differ between the samplers when the mass sits within ~1e-6 of p.
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/generic/sample_common.cuh"
#include "sampling/params.h"

namespace nmoe::sampling {
namespace {

using namespace detail;
using u32 = uint32_t;
using u64 = unsigned long long;

constexpr int kT = 256;
constexpr int kMaxChunk = 8192;                // logits per work item (a chunk of a row)
constexpr int kMaxChunks = 16;                 // so vocabularies up to 131072
constexpr int kBins = 2048;
constexpr int kCap = 128;                      // candidates per chunk
constexpr int kMaxCand = kCap * kMaxChunks;    // per row
constexpr int kMinTarget = 64;                 // candidates a chunk aims for, at least

struct Stat {  // one chunk's part of its row
  float m;     // max raw value (-inf: no finite value)
  int im;      // lowest id holding it
  float zr;    // sum of exp(v - m)
  float zp;    // sum of exp(x - m / t)
  float thr;   // T_c
  int ncand;   // candidates written
  float gv;    // the chunk's Gumbel-max value (whole-vocabulary rows)
  int gi;      // its id
  int bad;     // a NaN or +inf seen
};

struct Cand {
  float x;
  int id;
};

struct Work {
  Stat* stats;  // [rows, chunks]
  Cand* cand;   // [rows, chunks, kCap]
  int* fallback;  // [1 + rows]: the count, then the rows handed to the fallback (zeros at the start)
  int chunks;
  int chunk;
};

struct Cfg {  // a row's parameters, as every sampler reads them
  float t, top_p, min_p;
  int k, ntop;
  bool greedy, topk_on, topp_on, minp_on, filtered, proc_top, cand, gumbel;
};
// A row's parameters as they sit in memory; the chunk kernel copies them into shared memory with the
// chunk (prefetch), so that no dependent global read lies on an item's path (H200, B = 256 greedy,
// two machines: the chunk kernel 51.3 us with the copy, 53.2-53.5 us reading them at the item's start).
struct RowArgs {
  int64_t seed, position;
  float temperature, top_p, min_p;
  int32_t top_k;
};
__device__ Cfg cfg_from(const SampleParams& p, const RowArgs& a) {
  Cfg c;
  c.greedy = !(a.temperature > 0.f);
  c.t = c.greedy ? 1.f : a.temperature;
  c.k = a.top_k;
  c.top_p = a.top_p;
  c.min_p = a.min_p;
  c.topk_on = !c.greedy && c.k > 0 && c.k < p.vocab;
  c.topp_on = !c.greedy && c.top_p < 1.f;
  c.minp_on = !c.greedy && c.min_p > 0.f;
  c.filtered = c.topk_on || c.topp_on || c.minp_on;
  c.ntop = static_cast<int>(p.num_top < p.vocab ? p.num_top : p.vocab);
  c.proc_top = !c.greedy && p.top_from_processed;
  c.cand = c.filtered || c.ntop > 0;
  c.gumbel = !c.greedy && !c.filtered;
  return c;
}
__device__ RowArgs row_args(const SampleParams& p, int64_t r) {
  return RowArgs{p.seed[r], p.position[r], p.temperature[r], p.top_p[r], p.min_p[r], p.top_k[r]};
}

struct ChunkSmem {  // a chunk's (the logits themselves are in the dynamic buffers)
  u32 hist[kBins];
  Best best[32];
  float4 f4[kT / 32];
  u32 u[kT / 32];
  int n, first;
  u32 lo_bits;
};

struct MergeSmem {  // a row's merge
  u64 keys[kMaxCand];  // the row's candidates at or above T*, sorted
  float mass[kMaxCand];
  Best best[32];
  float f[32];
  Stat st[kMaxChunks];
  u32 kept_ids[kMaxTopLogprobs * 2 / 32];  // ids below 2048 that are kept (the top-n filler)
  int n, first;
  u32 lo_bits;
};

__device__ __forceinline__ float4 block_sum4(float4 v, float4* slots) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    v.z += __shfl_xor_sync(0xffffffffu, v.z, o);
    v.w += __shfl_xor_sync(0xffffffffu, v.w, o);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  float4 s = slots[0];
  for (int w = 1; w < kT / 32; ++w) s.x += slots[w].x, s.y += slots[w].y, s.z += slots[w].z, s.w += slots[w].w;
  return s;
}

// Exclusive scan of one value per thread in thread order; `total` gets the sum. Deterministic.
template <typename T>
__device__ __forceinline__ T block_excl_scan(T v, T* slots, T& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const T y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) slots[warp] = incl;
  __syncthreads();
  T before = T(0);
  total = T(0);
  for (int w = 0; w < kT / 32; ++w) {
    if (w < warp) before += slots[w];
    total += slots[w];
  }
  return before + incl - v;
}

// The chunk's Gumbel-max over its finite x (x[q] holds ids base + 4q ..), the exact noise only
// where x - log(1 - u) can reach `gate`.
__device__ __forceinline__ Best gumbel_sweep(const float4* x, int n4, int base, float mx, u32 key, float gate) {
  const float sT = ex2((mx - gate + kGateSlack + fabsf(mx) * 1e-6f) * kL2E);
  Best g{neg_inf(), INT64_MAX};
  for (int q = threadIdx.x; q < n4; q += kT) {
    const float4 f = x[q];
    const float e[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (!(e[c] > neg_inf())) continue;
      const int id = base + 4 * q + c;
      const u32 h = token_hash(key, id);
      if (one_minus_u_lb(h) <= ex2((e[c] - mx) * kL2E) * sT) g = merge(g, Best{e[c] + noise_exact(h), id});
    }
  }
  return g;
}

// Row r's merge (one CTA per row). Returns false when the row is left to the fallback.
__device__ __forceinline__ bool merge_row(const SampleParams& p, const Work& w, const Cfg& c, const RowArgs& a,
                                          int64_t r, MergeSmem& sh) {
  const int S = w.chunks;
  if (threadIdx.x < S) sh.st[threadIdx.x] = w.stats[r * S + threadIdx.x];
  __syncthreads();
  Best M{neg_inf(), INT64_MAX};
  int bad = 0;
  for (int i = 0; i < S; ++i) M = merge(M, Best{sh.st[i].m, sh.st[i].im}), bad |= sh.st[i].bad;
  if (bad || !(M.v > neg_inf())) return false;
  const float Mv = M.v, Mx = Mv / c.t;
  float Zr = 0.f, Zp = 0.f;
  for (int i = 0; i < S; ++i) {
    const Stat& st = sh.st[i];
    if (!(st.m > neg_inf())) continue;
    Zr += st.zr * ex2((st.m - Mv) * kL2E);
    Zp += st.zp * ex2((st.m / c.t - Mx) * kL2E);
  }
  const float log_zr = logf(Zr);
  int64_t token = M.i;
  float log_zk = logf(Zp);
  if (c.gumbel) {
    Best g{neg_inf(), INT64_MAX};
    for (int i = 0; i < S; ++i) g = merge(g, Best{sh.st[i].gv, sh.st[i].gi});
    token = g.i;
  }

  int N = 0, K = 0;
  bool covers = true;  // every finite element of the row is among the candidates
  u64* keys = sh.keys;
  float* mass = sh.mass;
  if (c.cand) {
    float tstar = neg_inf();
    for (int i = 0; i < S; ++i) tstar = fmaxf(tstar, sh.st[i].thr), covers &= sh.st[i].thr == neg_inf();
    if (threadIdx.x == 0) sh.n = 0;
    __syncthreads();
    const Cand* cand = w.cand + r * S * kCap;
    for (int q = threadIdx.x; q < S * kCap; q += kT) {
      if (q % kCap >= sh.st[q / kCap].ncand) continue;
      const Cand e = cand[q];
      if (e.x >= tstar) keys[atomicAdd(&sh.n, 1)] = composite(e.x, e.id);
    }
    __syncthreads();
    N = sh.n;
    if (N == 0) return false;
    sort_desc<kT>(keys, N);

    // Inclusive prefix of the masses in sorted order.
    const int per = (N + kT - 1) / kT, lo = min(N, threadIdx.x * per), hi = min(N, lo + per);
    float run = 0.f;
    for (int i = lo; i < hi; ++i) run += ex2((key_value(keys[i]) - Mx) * kL2E), mass[i] = run;
    float total;
    const float before = block_excl_scan(run, sh.f, total);
    for (int i = lo; i < hi; ++i) mass[i] += before;
    __syncthreads();

    if (c.filtered) {
      // Cuts as counts kept (kNone: below the candidates); the top token is always kept.
      int cut = kNone;
      float zk = covers ? mass[N - 1] : Zp;
      bool zk_known = true;
      if (c.topk_on) {
        if (c.k <= N) cut = c.k, zk = mass[c.k - 1];
        else zk_known = covers;
      }
      if (threadIdx.x == 0) sh.first = kNone;
      __syncthreads();
      if (c.topp_on) {
        if (!zk_known) return false;
        const float target = c.top_p > 0.f ? c.top_p * zk : 0.f;
        for (int i = threadIdx.x; i < N; i += kT)
          if (mass[i] >= target) atomicMin(&sh.first, i + 1);
      }
      __syncthreads();
      if (sh.first < cut) cut = sh.first;
      __syncthreads();
      if (threadIdx.x == 0) sh.first = kNone;
      __syncthreads();
      if (c.minp_on)
        for (int i = threadIdx.x; i < N; i += kT)
          if (!(ex2((key_value(keys[i]) - Mx) * kL2E) >= c.min_p)) atomicMin(&sh.first, max(i, 1));
      __syncthreads();
      if (sh.first < cut) cut = sh.first;
      if (cut == kNone) {
        if (!covers) return false;
        cut = N;
      }
      K = min(cut, N);
      log_zk = logf(mass[K - 1]);
      const u32 key = row_key(a.seed, a.position);
      Best g{neg_inf(), INT64_MAX};
      for (int i = threadIdx.x; i < K; i += kT) {
        const int id = key_id(keys[i]);
        g = merge(g, Best{key_value(keys[i]) + noise_exact(token_hash(key, id)), id});
      }
      g = rowwise::block_reduce<kT>(g, sh.best);
      if (!c.greedy) token = g.i;
    }
  }

  const float* row = p.logits + r * p.row_stride;
  const float v_tok = __ldg(row + token);
  const float lp_raw = (v_tok - Mv) - log_zr;

  if (c.ntop > 0) {
    const int n = c.ntop;
    const bool proc = c.proc_top;
    int count = N;  // entries ranked below
    if (proc && c.filtered) {
      count = K;
      if (K < n) {  // the kept ones, then the lowest ids not kept, at -inf
        for (int i = threadIdx.x; i < kMaxTopLogprobs * 2 / 32; i += kT) sh.kept_ids[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < K; i += kT) {
          const int id = key_id(keys[i]);
          if (id < kMaxTopLogprobs * 2) atomicOr(&sh.kept_ids[id / 32], 1u << (id % 32));
        }
        __syncthreads();
      }
    }
    // The logprob of every ranked entry, as a composite key (value, then lower id); the least.
    if (threadIdx.x == 0) sh.lo_bits = 0xffffffffu;
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += kT) {
      if (i >= count) {
        keys[i] = 0;
        continue;
      }
      const float x = key_value(keys[i]);
      const int id = key_id(keys[i]);
      const float lp = proc ? (x - Mx) - log_zk : ((c.greedy ? x : __ldg(row + id)) - Mv) - log_zr;
      keys[i] = composite(lp, id);
      atomicMin(&sh.lo_bits, order_bits(lp));
    }
    __syncthreads();
    sort_desc<kT>(keys, count);
    const bool exact_set = proc && c.filtered;  // the kept set is known in full
    if (!exact_set) {
      // Entries outside the candidates have x < T*, so logprobs at most the least ranked one's:
      // the n-th must be above it (or nothing finite lies outside).
      if (n > count) return false;
      if (!covers && !(static_cast<u32>(keys[n - 1] >> 32) > sh.lo_bits)) return false;
    }
    const int ranked = min(n, count);
    for (int a = threadIdx.x; a < ranked; a += kT) {
      p.top_ids[r * p.num_top + a] = key_id(keys[a]);
      p.top_logprobs[r * p.num_top + a] = key_value(keys[a]);
    }
    if (ranked < n && threadIdx.x < 32) {  // the filler: ids in order, skipping kept ones
      int slot = ranked;
      for (int base = 0; slot < n; base += 32) {
        const int id = base + threadIdx.x;
        const bool kept = id < kMaxTopLogprobs * 2 && (sh.kept_ids[id / 32] >> (id % 32)) & 1u;
        const u32 free_mask = __ballot_sync(0xffffffffu, !kept);
        const int at = slot + __popc(free_mask & ((1u << threadIdx.x) - 1u));
        if (!kept && at < n) {
          p.top_ids[r * p.num_top + at] = id;
          p.top_logprobs[r * p.num_top + at] = neg_inf();
        }
        slot += __popc(free_mask);
      }
    }
    pad_top<kT>(p, r, n);
  }
  write_token(p, r, token, lp_raw, c.greedy ? lp_raw : (v_tok / c.t - Mx) - log_zk);
  return true;
}

// cp.async of `bytes` (4 or 8) at src into shared memory at dst.
__device__ __forceinline__ void cp_async_small(void* dst, const void* src, int bytes) {
  const u32 d = static_cast<u32>(__cvta_generic_to_shared(dst));
  if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}

// Starts the copy of chunk s of row r into buf, and of the row's parameters into args (one commit
// group); a vocabulary tail that is not a whole float4 is stored directly, padded with -inf.
__device__ __forceinline__ void prefetch(const SampleParams& p, const Work& w, int r, int s, float* buf,
                                         RowArgs* args) {
  const int begin = s * w.chunk;
  const int n = min(w.chunk, static_cast<int>(p.vocab) - begin);
  const float* src = p.logits + r * p.row_stride + begin;
  const u32 sbase = static_cast<u32>(__cvta_generic_to_shared(buf));
  switch (threadIdx.x) {
    case kT - 1: cp_async_small(&args->seed, p.seed + r, 8); break;
    case kT - 2: cp_async_small(&args->position, p.position + r, 8); break;
    case kT - 3: cp_async_small(&args->temperature, p.temperature + r, 4); break;
    case kT - 4: cp_async_small(&args->top_p, p.top_p + r, 4); break;
    case kT - 5: cp_async_small(&args->min_p, p.min_p + r, 4); break;
    case kT - 6: cp_async_small(&args->top_k, p.top_k + r, 4); break;
    default: break;
  }
  for (int q = threadIdx.x; q < n / 4; q += kT)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sbase + 16u * q), "l"(src + 4 * q) : "memory");
  if (n % 4 != 0 && threadIdx.x < 4) {
    const int i = n / 4 * 4 + threadIdx.x;
    buf[i] = i < n ? __ldg(src + i) : neg_inf();
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Block-wide max of a float, and min of an int (every thread gets the result).
__device__ __forceinline__ float block_max(float v, ChunkSmem& sh) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.f4[threadIdx.x / 32].x = v;
  __syncthreads();
  float m = sh.f4[0].x;
  for (int w = 1; w < kT / 32; ++w) m = fmaxf(m, sh.f4[w].x);
  return m;
}
__device__ __forceinline__ int block_min(int v, ChunkSmem& sh) {
  v = __reduce_min_sync(0xffffffffu, v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.u[threadIdx.x / 32] = static_cast<u32>(v);
  __syncthreads();
  int m = static_cast<int>(sh.u[0]);
  for (int w = 1; w < kT / 32; ++w) m = min(m, static_cast<int>(sh.u[w]));
  return m;
}

// Pass B of a chunk whose max m is finite: the sums relative to m (zr; zp relative to mx = m / t
// over x = v / t, which replaces v when kScaled; with kMean the sum and count of the finite x, for
// the bins' scale) and the lowest id of this thread holding m. An instantiation per case keeps
// the per-element work to what the row needs: this pass is most of the chunk kernel's instructions.
template <bool kScaled, bool kMean>
__device__ __forceinline__ float4 chunk_sums(float4* x4, int n4, int begin, float m, float t, int& bi) {
  const float mx = m / t;
  float4 sums = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int q = threadIdx.x; q < n4; q += kT) {
    const float4 f = x4[q];
    float e[4] = {f.x, f.y, f.z, f.w};
    if (fmaxf(fmaxf(e[0], e[1]), fmaxf(e[2], e[3])) == m && bi == kNone)  // ids increase per thread
      bi = begin + 4 * q + (e[0] == m ? 0 : e[1] == m ? 1 : e[2] == m ? 2 : 3);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sums.x += ex2((e[k] - m) * kL2E);
      if (kScaled) e[k] = e[k] / t;
      if (kScaled || kMean) {
        const bool fin = e[k] > neg_inf();
        if (kScaled && fin) sums.y += ex2((e[k] - mx) * kL2E);
        if (kMean && fin) sums.z += e[k], sums.w += 1.f;
      }
    }
    if (kScaled) x4[q] = make_float4(e[0], e[1], e[2], e[3]);
  }
  return sums;
}

// One chunk out of shared memory (buf: its logits, which become x = v / t): its Stat and candidates.
__device__ void run_chunk(const SampleParams& p, const Work& w, int r, int s, float* buf, const RowArgs& args,
                          ChunkSmem& sh) {
  const int begin = s * w.chunk;
  const int n = min(w.chunk, static_cast<int>(p.vocab) - begin);
  const int n4 = (n + 3) / 4;
  float4* x4 = reinterpret_cast<float4*>(buf);
  const Cfg c = cfg_from(p, args);

  // Pass A: the max alone (fmaxf skips NaN; a NaN is caught by the sums below).
  float bv = neg_inf();
  for (int q = threadIdx.x; q < n4; q += kT) {
    const float4 f = x4[q];
    bv = fmaxf(bv, fmaxf(fmaxf(f.x, f.y), fmaxf(f.z, f.w)));
  }
  const float m = block_max(bv, sh);
  const bool scaled = c.t != 1.f;

  // Pass B: the sums relative to the max and the max's lowest id. A NaN anywhere makes zr NaN, so
  // the row is flagged (as is +inf, the max then); a chunk without a finite value flags its row
  // only if it holds a NaN.
  int bi = kNone;
  int bad = 0;
  float4 sums = make_float4(0.f, 0.f, 0.f, 0.f);  // zr, zp, sum of finite x, their count
  if (m > neg_inf() && m < -neg_inf()) {
    if (scaled)
      sums = c.cand ? chunk_sums<true, true>(x4, n4, begin, m, c.t, bi)
                    : chunk_sums<true, false>(x4, n4, begin, m, c.t, bi);
    else
      sums = c.cand ? chunk_sums<false, true>(x4, n4, begin, m, c.t, bi)
                    : chunk_sums<false, false>(x4, n4, begin, m, c.t, bi);
    sums = block_sum4(sums, sh.f4);
    if (!scaled) sums.y = sums.x;  // x = v
    bad = isnan(sums.x);
  } else if (m == neg_inf()) {
    for (int q = threadIdx.x; q < n4; q += kT) {
      const float4 f = x4[q];
      bad |= (f.x == f.x ? 0 : 1) | (f.y == f.y ? 0 : 1) | (f.z == f.z ? 0 : 1) | (f.w == f.w ? 0 : 1);
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) bi = begin;  // as the full scan chose: the chunk's first id
  } else {
    bad = 1;  // +inf
  }
  const Best b{m, block_min(bi, sh)};
  const float mx = m / c.t;
  const bool finite = m > neg_inf() && !bad;

  Best g{neg_inf(), kNone};
  if (finite && c.gumbel) {
    const u32 key = row_key(args.seed, args.position);
    const float gate = mx + logf(sums.y) - kGumbelMargin;
    // The max element's exact value bounds the winner from below (a finite gate for a redo).
    const Best top{mx + noise_exact(token_hash(key, b.i)), b.i};
    g = merge(rowwise::block_reduce<kT>(gumbel_sweep(x4, n4, begin, mx, key, gate), sh.best), top);
    if (g.v < gate) g = merge(rowwise::block_reduce<kT>(gumbel_sweep(x4, n4, begin, mx, key, g.v), sh.best), top);
  }

  float thr = neg_inf();
  int ncand = 0;
  if (finite && c.cand) {
    float dmax;
    const float scale = pick_scale(mx - sums.z / sums.w, dmax);
    for (int i = threadIdx.x; i < kBins; i += kT) sh.hist[i] = 0;
    if (threadIdx.x == 0) sh.n = 0, sh.first = kNone, sh.lo_bits = 0xffffffffu;
    __syncthreads();
    for (int q = threadIdx.x; q < n4; q += kT) {  // the tail's padding is -inf
      const float4 f = x4[q];
      const float e[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (e[k] > neg_inf()) atomicAdd(&sh.hist[bin_of(mx - e[k], scale, dmax)], 1u);
    }
    __syncthreads();
    int target = kMinTarget;
    if (c.topk_on) target = max(target, c.k);
    target = min(max(target, c.ntop), kCap);
    constexpr int kPer = kBins / kT;
    u32 mine = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) mine += sh.hist[threadIdx.x * kPer + i];
    u32 total;
    u32 before = block_excl_scan(mine, sh.u, total);
    int last_bin = kBins - 1;  // the last bin taken
    if (total > static_cast<u32>(kCap)) {
      for (int i = 0; i < kPer; ++i) {
        const u32 h = sh.hist[threadIdx.x * kPer + i];
        if (before < static_cast<u32>(target) && before + h >= static_cast<u32>(target)) {
          const int bin = threadIdx.x * kPer + i;
          sh.first = before + h <= static_cast<u32>(kCap) ? bin : bin - 1;
        }
        before += h;
      }
      __syncthreads();
      last_bin = sh.first;
    }
    Cand* out = w.cand + (static_cast<int64_t>(r) * w.chunks + s) * kCap;
    for (int q = threadIdx.x; q < n4; q += kT) {
      const float4 f = x4[q];
      const float e[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!(e[k] > neg_inf()) || static_cast<int>(bin_of(mx - e[k], scale, dmax)) > last_bin) continue;
        out[atomicAdd(&sh.n, 1)] = Cand{e[k], begin + 4 * q + k};
        atomicMin(&sh.lo_bits, order_bits(e[k]));
      }
    }
    __syncthreads();
    ncand = sh.n;
    if (total > static_cast<u32>(kCap)) thr = ncand > 0 ? from_order_bits(sh.lo_bits) : -neg_inf();
  }

  if (threadIdx.x == 0) {
    Stat st;
    st.m = finite ? m : neg_inf();
    st.im = static_cast<int>(b.i);
    st.zr = sums.x;
    st.zp = sums.y;
    st.thr = thr;
    st.ncand = ncand;
    st.gv = g.v;
    st.gi = static_cast<int>(g.i);
    st.bad = bad;
    w.stats[static_cast<int64_t>(r) * w.chunks + s] = st;
  }
}

// Persistent CTAs over the work items (row-major: a row's chunks run close together), each with two
// chunk buffers: the next item's copy is in flight while the current one runs.
__global__ void __launch_bounds__(kT, 3) sample_split_kernel(const SampleParams p, const Work w) {
  extern __shared__ __align__(16) float bufs[];  // [2][kMaxChunk]
  __shared__ ChunkSmem sh;
  __shared__ RowArgs args[2];  // the row parameters of the item in each buffer
  const int items = static_cast<int>(p.rows) * w.chunks;  // < 2^31: sample_split_suits
  int item = blockIdx.x;
  if (item < items) prefetch(p, w, item / w.chunks, item % w.chunks, bufs, &args[0]);
  for (int it = 0; item < items; ++it, item += gridDim.x) {
    const int next = item + gridDim.x;
    if (next < items) {
      prefetch(p, w, next / w.chunks, next % w.chunks, bufs + ((it + 1) & 1) * kMaxChunk, &args[(it + 1) & 1]);
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    __syncthreads();
    const RowArgs a = args[it & 1];
    run_chunk(p, w, item / w.chunks, item % w.chunks, bufs + (it & 1) * kMaxChunk, a, sh);
    __syncthreads();  // buffer (it & 1) and its args are refilled by the next iteration's prefetch
  }
}

// One CTA per row, after the chunks: every row's merge at once.
__global__ void __launch_bounds__(kT) sample_merge_kernel(const SampleParams p, const Work w) {
  __shared__ MergeSmem sh;
  const int64_t r = blockIdx.x;
  const RowArgs a = row_args(p, r);
  if (!merge_row(p, w, cfg_from(p, a), a, r, sh) && threadIdx.x == 0)
    w.fallback[1 + atomicAdd(w.fallback, 1)] = static_cast<int>(r);
}

int chunks_of(int64_t vocab) { return static_cast<int>((vocab + kMaxChunk - 1) / kMaxChunk); }
int chunk_of(int64_t vocab, int chunks) { return static_cast<int>(((vocab + chunks - 1) / chunks + 3) / 4 * 4); }
int64_t stats_bytes(const SampleParams& p) {
  return (p.rows * chunks_of(p.vocab) * static_cast<int64_t>(sizeof(Stat)) + 15) / 16 * 16;
}

}  // namespace

bool sample_split_suits(const SampleParams& p) {
  return p.vec4 && p.rows >= 1 && p.vocab <= static_cast<int64_t>(kMaxChunk) * kMaxChunks &&
         p.rows <= 0x7fffffff / kMaxChunks;  // work items are int
}

int64_t sample_split_workspace_bytes(const SampleParams& p) {
  return stats_bytes(p) + p.rows * chunks_of(p.vocab) * kCap * static_cast<int64_t>(sizeof(Cand));
}

const char* sample_split_launch(const SampleParams& p, const SampleWorkspace& ws, cudaStream_t stream) {
  Work w;
  w.chunks = chunks_of(p.vocab);
  w.chunk = chunk_of(p.vocab, w.chunks);
  w.stats = static_cast<Stat*>(ws.data);
  w.cand = reinterpret_cast<Cand*>(static_cast<char*>(ws.data) + stats_bytes(p));
  w.fallback = ws.fallback;
  constexpr int kDynBytes = 2 * kMaxChunk * static_cast<int>(sizeof(float));
  static bool attr_set = false;
  if (!attr_set) {
    if (cudaFuncSetAttribute(sample_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDynBytes) !=
        cudaSuccess)
      return "sample: the split kernel's shared memory size was refused";
    attr_set = true;
  }
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return "sample: no device attributes";
  const int64_t items = p.rows * w.chunks;
  const unsigned grid = static_cast<unsigned>(items < 3 * sms ? items : 3 * sms);  // three CTAs an SM
  sample_split_kernel<<<grid, kT, kDynBytes, stream>>>(p, w);
  sample_merge_kernel<<<static_cast<unsigned>(p.rows), kT, 0, stream>>>(p, w);
  return cudaPeekAtLastError() == cudaSuccess ? nullptr : "sample: split kernel launch failed";
}

}  // namespace nmoe::sampling
