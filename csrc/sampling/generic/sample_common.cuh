// Device pieces shared by the samplers (sample_cluster.cuh: one thread-block cluster per row out of
// shared memory, the default and the split sampler's fallback; sample_split.cu: chunks of rows
// streamed by persistent CTAs; sample.cu: one CTA per row straight from global memory):
//   - the composite order key, the counter-based hash and the exact Gumbel noise of ops/sampling.py;
//   - the fast exp, value-relative bins, the noise's gate and a bitonic sort (the two fast samplers);
//   - the one-CTA-per-row algorithm (`rowwise::sample_row`), generic over the block size, which the
//     cluster kernel also runs on a row it cannot resolve on its fast path (rows whose threshold
//     bucket is too crowded, non-finite rows).
//
// Row order: descending value, ties by lower id, as a 64-bit composite key (order-preserving bits of
// the value << 32 | ~id), so every prefix of the reference's stable descending sort is
// "composite >= threshold".
#pragma once

#include <cstdint>

#include "sampling/params.h"

namespace nmoe::sampling::detail {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ uint32_t order_bits(float v) {
  const uint32_t b = __float_as_uint(v == 0.f ? 0.f : v);  // -0 == +0, as in the sort
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inverse of order_bits (for keys of non-NaN values; -0 comes back as +0).
__device__ __forceinline__ float from_order_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

__device__ __forceinline__ uint64_t composite(float v, int64_t id) {
  return (static_cast<uint64_t>(order_bits(v)) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

__device__ __forceinline__ float key_value(uint64_t c) { return from_order_bits(static_cast<uint32_t>(c >> 32)); }
__device__ __forceinline__ int key_id(uint64_t c) { return static_cast<int>(0xffffffffu - static_cast<uint32_t>(c)); }

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ uint32_t row_key(int64_t seed, int64_t position) {
  const uint32_t s_lo = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t s_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return mix32(mix32(mix32(s_lo) ^ s_hi) ^ static_cast<uint32_t>(position));
}

__device__ __forceinline__ uint32_t token_hash(uint32_t key, int64_t id) {
  return mix32(key ^ mix32(static_cast<uint32_t>(id) + 0x9E3779B9u));
}

// The reference's noise, bit for bit: u = ((h >> 8) + 0.5) / 2^24 in double, -log(-log(u)) as float.
__device__ __forceinline__ float gumbel_exact(uint32_t h) {
  const double u = (static_cast<double>(h >> 8) + 0.5) / 16777216.0;
  return static_cast<float>(-log(-log(u)));
}

// A float estimate of gumbel_exact within about 1e-6 (u = n / 2^25 with n odd; each branch keeps
// its float argument exact).
__device__ __forceinline__ float gumbel_estimate(uint32_t h) {
  const uint32_t n = 2u * (h >> 8) + 1u;
  const float inner = n < (1u << 24) ? -logf(static_cast<float>(n) * 0x1p-25f)
                                     : -log1pf(-static_cast<float>((1u << 25) - n) * 0x1p-25f);
  return -logf(inner);
}

struct Best {  // larger value, then lower id
  float v;
  int64_t i;
};
__device__ __forceinline__ Best merge(Best a, Best b) { return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a; }

// ---------------------------------------------------------------- pieces of the two fast samplers
// (sample_cluster.cuh, sample_split.cu): the fast exp, value-relative bins, the noise's gate, a sort.

constexpr float kL2E = 1.4426950408889634f;
constexpr uint32_t kMagic = 0x4B000000u;  // bits of 2^23: (y + 2^23) rounded toward zero holds floor(y)
constexpr float kTwo23 = 8388608.f;
constexpr int kNone = 0x7fffffff;     // no id
constexpr float kGumbelMargin = 3.f;  // the winner is below log-sum-exp - 3 with probability 2e-9
constexpr float kGateSlack = 0.01f;   // absorbs the error of the fast exp in the gate

__device__ __forceinline__ float ex2(float a) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
// exp(x - max) from d = max - x: the one definition of a token's relative probability here (the
// fixed-point masses, min-p and the kept mass all use it; relative error ~1e-6).
__device__ __forceinline__ float rel_exp(float d) { return ex2(d * -kL2E); }

// Bin of d >= 0: floor(min(d, dmax) * scale) in [0, kBins), monotone in d (so in the value), by a
// round-toward-zero add of 2^23.
__device__ __forceinline__ uint32_t bin_of(float d, float scale, float dmax) {
  return __float_as_uint(__fmaf_rz(fminf(d, dmax), scale, kTwo23)) - kMagic;
}

// Lower bound of 1 - u for the hash's uniform u = ((h >> 8) + 0.5) / 2^24: 1 - u = (w + 0.5) / 2^24
// with w = ~h >> 8, at least (w >> 1) / 2^23. The noise -log(-log u) is at most -log(1 - u).
__device__ __forceinline__ float one_minus_u_lb(uint32_t h) {
  return __uint_as_float(((h >> 9) ^ 0x7fffffu) | 0x3f800000u) - 1.f;
}
// The exact noise (double logs) behind a call: it runs rarely, and inline it would cost registers
// in every loop that can reach it.
static __device__ __noinline__ float noise_exact(uint32_t h) { return gumbel_exact(h); }

// A power-of-two bin scale putting ~1024 bins between the max and the mean (D apart), so the bulk
// of any row spreads over many bins; bins cover d in [0, 2047 / scale], the last one all below.
__device__ __forceinline__ float pick_scale(float D, float& dmax) {
  int s = 16;
  if (D > 0.f && D < 3.0e38f) {
    int e;
    frexpf(D, &e);  // D in [2^(e-1), 2^e)
    s = min(16, max(2, 10 - e));
  } else if (D > 0.f) {
    s = 2;
  }
  const float scale = ldexpf(1.f, s);
  dmax = 2047.5f / scale;
  return scale;
}

// Bitonic sort of g[0..N) descending (padded with 0, below every real key).
template <int kT>
__device__ void sort_desc(unsigned long long* g, int N) {
  int np = 2;
  while (np < N) np <<= 1;
  for (int i = N + threadIdx.x; i < np; i += kT) g[i] = 0;
  __syncthreads();
  for (int k = 2; k <= np; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < np; i += kT) {
        const int l = i ^ j;
        if (l > i) {
          const unsigned long long a = g[i], b = g[l];
          const bool desc = (i & k) == 0;
          if (desc ? a < b : a > b) g[i] = b, g[l] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Top-n entries past the vocabulary (num_top > vocab, n = vocab): id 0 at -inf.
template <int kThreads>
__device__ __forceinline__ void pad_top(const SampleParams& p, int64_t r, int n) {
  for (int a = n + threadIdx.x; a < p.num_top; a += kThreads) {
    p.top_ids[r * p.num_top + a] = 0;
    p.top_logprobs[r * p.num_top + a] = neg_inf();
  }
}

// A row's token and logprobs (thread 0 writes).
__device__ __forceinline__ void write_token(const SampleParams& p, int64_t r, int64_t token, float lp_raw,
                                            float lp_proc) {
  if (threadIdx.x != 0) return;
  p.tokens[r] = token;
  p.logprobs_raw[r] = lp_raw;
  p.logprobs_processed[r] = lp_proc;
}

namespace rowwise {

constexpr int kMaxBins = 2048;
constexpr double kFixedOne = 1099511627776.0;  // 2^40
constexpr int kRounds = 6;
__device__ __constant__ int kShift[kRounds] = {53, 42, 32, 21, 10, 0};
__device__ __constant__ int kBits[kRounds] = {11, 11, 10, 11, 11, 10};  // 64 bits in all

struct MaxSum {  // online softmax state: max m and sum of exp(v - m)
  float m, z;
};
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return {m, 0.f};
  return {m, a.z * expf(a.m - m) + b.z * expf(b.m - m)};
}
__device__ __forceinline__ MaxSum push(MaxSum s, float v) {
  if (v == neg_inf()) return s;
  if (v > s.m) return {v, s.z * expf(s.m - v) + 1.f};
  return {s.m, s.z + expf(v - s.m)};
}
using detail::merge;
__device__ __forceinline__ float merge(float a, float b) { return a + b; }
__device__ __forceinline__ uint64_t merge(uint64_t a, uint64_t b) { return a > b ? a : b; }  // max: keys

__device__ __forceinline__ MaxSum shfl(MaxSum s, int o) {
  return {__shfl_xor_sync(0xffffffffu, s.m, o), __shfl_xor_sync(0xffffffffu, s.z, o)};
}
__device__ __forceinline__ Best shfl(Best s, int o) {
  return {__shfl_xor_sync(0xffffffffu, s.v, o), __shfl_xor_sync(0xffffffffu, s.i, o)};
}
__device__ __forceinline__ float shfl(float s, int o) { return __shfl_xor_sync(0xffffffffu, s, o); }
__device__ __forceinline__ uint64_t shfl(uint64_t s, int o) { return __shfl_xor_sync(0xffffffffu, s, o); }

template <typename T>
__device__ __forceinline__ T identity();
template <>
__device__ __forceinline__ MaxSum identity<MaxSum>() { return {neg_inf(), 0.f}; }
template <>
__device__ __forceinline__ Best identity<Best>() { return {neg_inf(), INT64_MAX}; }
template <>
__device__ __forceinline__ float identity<float>() { return 0.f; }
template <>
__device__ __forceinline__ uint64_t identity<uint64_t>() { return 0; }

struct Shared {
  uint32_t count[kMaxBins];
  unsigned long long mass[kMaxBins];
  union {
    MaxSum ms[32];
    Best best[32];
    float f[32];
    uint64_t u[32];
    unsigned long long scan[32];
  } red;
  int found_bin;
  unsigned long long found_before;
  int top_count;
  uint64_t top_key[kMaxTopLogprobs];
  float top_val[kMaxTopLogprobs];
  int top_id[kMaxTopLogprobs];
};

// Deterministic block reduction (fixed butterfly, then the warps' results in order); every thread
// gets the result.
template <int kThreads, typename T>
__device__ T block_reduce(T v, T* slots) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = merge(v, shfl(v, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x % 32 < kThreads / 32 ? slots[threadIdx.x % 32] : identity<T>();
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = merge(v, shfl(v, o));
  return v;
}

// Sum over the block (integer, so exact and order-independent); every thread gets the result.
template <int kThreads>
__device__ unsigned long long block_sum(unsigned long long v, Shared& sh) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.red.scan[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x % 32 < kThreads / 32 ? sh.red.scan[threadIdx.x % 32] : 0ull;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kThreads>
struct Row {
  const float* data;
  int64_t vocab;
  bool vec4;
  template <typename F>
  __device__ __forceinline__ void for_each(F&& f) const {
    int64_t tail = 0;
    if (vec4) {
      constexpr int kUnroll = 2;  // loads in flight per thread: the passes are latency-bound
      const int64_t n4 = vocab / 4;
      const auto* d4 = reinterpret_cast<const float4*>(data);
      int64_t j = threadIdx.x;
      for (; j + (kUnroll - 1) * kThreads < n4; j += kUnroll * kThreads) {
        float4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(d4 + j + u * kThreads);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = 4 * (j + u * kThreads);
          f(v[u].x, i), f(v[u].y, i + 1), f(v[u].z, i + 2), f(v[u].w, i + 3);
        }
      }
      for (; j < n4; j += kThreads) {
        const float4 v = __ldg(d4 + j);
        f(v.x, 4 * j), f(v.y, 4 * j + 1), f(v.z, 4 * j + 2), f(v.w, 4 * j + 3);
      }
      tail = n4 * 4;
    }
    for (int64_t i = tail + threadIdx.x; i < vocab; i += kThreads) f(__ldg(data + i), i);
  }
};

// Finds, over bins in descending order, the first bin where the running total reaches `target`
// (0 < target <= total). Sets sh.found_bin and sh.found_before (the total of the higher bins).
template <int kThreads, typename H>
__device__ void find_crossing(const H* hist, int nbins, unsigned long long target, Shared& sh) {
  const int per = (nbins + kThreads - 1) / kThreads;
  const int hi = nbins - threadIdx.x * per;  // this thread's bins: [hi - per, hi), highest first
  unsigned long long mine = 0;
  for (int k = 1; k <= per; ++k)
    if (hi - k >= 0) mine += hist[hi - k];
  // Exclusive scan in thread order (thread 0 holds the highest bins).
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long incl = mine;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const unsigned long long x = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += x;
  }
  __syncthreads();
  if (lane == 31) sh.red.scan[warp] = incl;
  __syncthreads();
  unsigned long long before = incl - mine;
  for (int w = 0; w < warp; ++w) before += sh.red.scan[w];
  for (int k = 1; k <= per; ++k) {
    if (hi - k < 0) break;
    const unsigned long long h = hist[hi - k];
    if (before < target && target <= before + h) {
      sh.found_bin = hi - k;
      sh.found_before = before;
    }
    before += h;
  }
  __syncthreads();
}

template <int kThreads>
__device__ void clear_hist(Shared& sh, int nbins, bool with_mass) {
  for (int b = threadIdx.x; b < nbins; b += kThreads) {
    sh.count[b] = 0;
    if (with_mass) sh.mass[b] = 0;
  }
  __syncthreads();
}

__device__ __forceinline__ bool prefix_match(uint64_t c, uint64_t prefix, int round) {
  if (round == 0) return true;
  const int hi = kShift[round] + kBits[round];
  return (c >> hi) == (prefix >> hi);
}

// The k-th largest key (1 <= k <= number of keyed elements); `key(v, i, c)` returns whether element
// i takes part and sets its composite c. Elements with composite >= the result are exactly k.
template <int kThreads, typename KeyFn>
__device__ uint64_t select_kth(const Row<kThreads>& row, int64_t k, KeyFn key, Shared& sh) {
  uint64_t prefix = 0;
  unsigned long long rem = static_cast<unsigned long long>(k);
  for (int r = 0; r < kRounds; ++r) {
    const int shift = kShift[r], nbins = 1 << kBits[r];
    clear_hist<kThreads>(sh, nbins, false);
    row.for_each([&](float v, int64_t i) {
      uint64_t c;
      if (key(v, i, c) && prefix_match(c, prefix, r)) atomicAdd(&sh.count[(c >> shift) & (nbins - 1)], 1u);
    });
    __syncthreads();
    find_crossing<kThreads>(sh.count, nbins, rem, sh);
    const int d = sh.found_bin;
    rem -= sh.found_before;
    prefix |= static_cast<uint64_t>(d) << shift;
    if (sh.count[d] == rem) break;  // the whole bucket is kept
    __syncthreads();
  }
  __syncthreads();
  return prefix;
}

// The composite at which the inclusive fixed-point mass (descending order, among elements with
// composite >= floor_key) first reaches top_p * total. Returns the top key when that target is 0.
template <int kThreads, typename MassFn>
__device__ uint64_t select_mass(const Row<kThreads>& row, float top_p, uint64_t floor_key, uint64_t top_key,
                                MassFn mass_of, Shared& sh) {
  uint64_t prefix = 0;
  unsigned long long above = 0, target = 0;
  for (int r = 0; r < kRounds; ++r) {
    const int shift = kShift[r], nbins = 1 << kBits[r];
    clear_hist<kThreads>(sh, nbins, true);
    row.for_each([&](float v, int64_t i) {
      uint64_t c;
      unsigned long long m;
      mass_of(v, i, c, m);
      if (c >= floor_key && prefix_match(c, prefix, r)) {
        const int b = static_cast<int>((c >> shift) & (nbins - 1));
        atomicAdd(&sh.count[b], 1u);
        if (m) atomicAdd(&sh.mass[b], m);
      }
    });
    __syncthreads();
    if (r == 0) {
      unsigned long long total = 0;
      for (int b = threadIdx.x; b < nbins; b += kThreads) total += sh.mass[b];
      total = block_sum<kThreads>(total, sh);
      target = static_cast<unsigned long long>(static_cast<double>(top_p) * static_cast<double>(total));
      if (target == 0) return top_key;
      if (target > total) target = total;
    }
    find_crossing<kThreads>(sh.mass, nbins, target - above, sh);
    const int d = sh.found_bin;
    above += sh.found_before;
    prefix |= static_cast<uint64_t>(d) << shift;
    if (sh.count[d] == 1) break;
    __syncthreads();
  }
  __syncthreads();
  return prefix;
}

// Samples row r of p with a block of kThreads threads (all of them call this), straight from global
// memory: a stats pass, a radix selection pass per round of each threshold, a final pass.
template <int kThreads>
__device__ void sample_row(const SampleParams& p, int64_t r, Shared& sh) {
  const Row<kThreads> row{p.logits + r * p.row_stride, p.vocab, p.vec4};
  const float temp = p.temperature[r];
  const bool greedy = !(temp > 0.f);
  const float t = greedy ? 1.f : temp;

  // Pass 1: raw softmax stats and argmax; processed (x = raw / t) stats and top composite.
  MaxSum raw{neg_inf(), 0.f}, proc{neg_inf(), 0.f};
  Best amax{neg_inf(), INT64_MAX};
  uint64_t ctop = 0;
  row.for_each([&](float v, int64_t i) {
    raw = push(raw, v);
    amax = merge(amax, Best{v, i});
    if (!greedy) {
      const float x = v / t;
      proc = push(proc, x);
      const uint64_t c = composite(x, i);
      ctop = c > ctop ? c : ctop;
    }
  });
  raw = block_reduce<kThreads>(raw, sh.red.ms);
  amax = block_reduce<kThreads>(amax, sh.red.best);
  const float log_zr = logf(raw.z);
  int64_t token = amax.i;
  float lp_proc = 0.f, log_zk = 0.f;
  uint64_t thr_k = 0, thr_p = 0;
  bool minp_on = false;
  float min_p = 0.f;

  if (!greedy) {
    proc = block_reduce<kThreads>(proc, sh.red.ms);
    ctop = block_reduce<kThreads, uint64_t>(ctop, sh.red.u);
    const float m = proc.m;
    const int k = p.top_k[r];
    if (k > 0 && k < p.vocab) {
      thr_k = select_kth(row, k, [&](float v, int64_t i, uint64_t& c) { return c = composite(v / t, i), true; }, sh);
    }
    const float top_p = p.top_p[r];
    if (top_p < 1.f) {
      thr_p = top_p > 0.f ? select_mass(
                                row, top_p, thr_k, ctop,
                                [&](float v, int64_t i, uint64_t& c, unsigned long long& mass) {
                                  const float x = v / t;
                                  c = composite(x, i);
                                  mass = static_cast<unsigned long long>(expf(x - m) * static_cast<float>(kFixedOne));
                                },
                                sh)
                          : ctop;
    }
    min_p = p.min_p[r];
    minp_on = min_p > 0.f;

    // Final pass: mass of the kept set and the Gumbel-max over it.
    const uint32_t key = row_key(p.seed[r], p.position[r]);
    const uint64_t thr = thr_k > thr_p ? thr_k : thr_p;
    float zk = 0.f;
    Best best{neg_inf(), INT64_MAX};
    row.for_each([&](float v, int64_t i) {
      const float x = v / t;
      const uint64_t c = composite(x, i);
      const float e = expf(x - m);
      if (c != ctop && (c < thr || (minp_on && !(e >= min_p)))) return;
      zk += e;
      const uint32_t h = token_hash(key, i);
      if (x + gumbel_estimate(h) + 1e-3f >= best.v) best = merge(best, Best{x + gumbel_exact(h), i});
    });
    zk = block_reduce<kThreads>(zk, sh.red.f);
    best = block_reduce<kThreads>(best, sh.red.best);
    token = best.i;
    log_zk = logf(zk);
    lp_proc = (__ldg(row.data + token) / t - m) - log_zk;
  }
  const float lp_raw = (__ldg(row.data + token) - raw.m) - log_zr;

  if (p.num_top > 0) {
    const int n = static_cast<int>(p.num_top < p.vocab ? p.num_top : p.vocab);
    const bool processed = !greedy && p.top_from_processed;
    const float m = proc.m;
    const uint64_t thr = thr_k > thr_p ? thr_k : thr_p;
    const uint64_t ctop_ = ctop;
    auto value = [&](float v, int64_t i) {
      if (!processed) return (v - raw.m) - log_zr;
      const float x = v / t;
      const uint64_t c = composite(x, i);
      const float e = expf(x - m);
      const bool kept = c == ctop_ || (c >= thr && !(minp_on && !(e >= min_p)));
      return kept ? (x - m) - log_zk : neg_inf();
    };
    const uint64_t cut =
        select_kth(row, n, [&](float v, int64_t i, uint64_t& c) { return c = composite(value(v, i), i), true; }, sh);
    if (threadIdx.x == 0) sh.top_count = 0;
    __syncthreads();
    row.for_each([&](float v, int64_t i) {
      const float lp = value(v, i);
      const uint64_t c = composite(lp, i);
      if (c < cut) return;
      const int slot = atomicAdd(&sh.top_count, 1);
      if (slot < kMaxTopLogprobs) sh.top_key[slot] = c, sh.top_val[slot] = lp, sh.top_id[slot] = static_cast<int>(i);
    });
    __syncthreads();
    for (int a = threadIdx.x; a < n; a += kThreads) {
      int rank = 0;
      for (int b = 0; b < n; ++b) rank += sh.top_key[b] > sh.top_key[a];
      p.top_ids[r * p.num_top + rank] = sh.top_id[a];
      p.top_logprobs[r * p.num_top + rank] = sh.top_val[a];
    }
    pad_top<kThreads>(p, r, n);
  }
  write_token(p, r, token, lp_raw, greedy ? lp_raw : lp_proc);
}

}  // namespace rowwise
}  // namespace nmoe::sampling::detail
