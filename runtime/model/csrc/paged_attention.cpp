// Attention of ragged query rows over the paged KV pool, read in place (CPU).
//
// Row r of `q [rows, heads, d]` belongs to sequence `row_seq[r]` and attends to that sequence's
// first `row_keys[r]` positions, found through its block table `tables[seq]` in the pools
// `[blocks, block_size, kv_heads, d]` (the layout of runtime/kv_cache.py). A decode is one row
// with every key; the tokens of a short chunk are rows with growing key counts (causal). Nothing
// is gathered: keys and values are streamed once from the pool, which is what a decode step is
// bound by.
//
// Work items are (row, span of keys): a row's keys are split into spans when there are fewer rows
// than threads (flash-decoding), so a single long decode still uses every core. Each item keeps,
// per query head, its running max, the sum of exponentials and the weighted sum of values
// (online softmax); the items of a row are merged at the end. Each key's K and V rows of all
// kv heads are contiguous in the pool and read once per item, for all query heads of the group.
//
// bfloat16 pools on a CPU with AVX512-BF16 score 16 keys at a time: vdpbf16ps multiplies q and k
// pairs exactly and sums them in float32, and the 16 keys' partial sums are reduced together
// (one transpose-and-add tree instead of a horizontal sum per key and head). float32 pools, the
// reference, keep the plain loops.
//
// int8 pools (runtime/kv_cache.py, `quantized`) hold each key and value row as head_dim codes and
// a float32 scale: half the bytes a decode step streams. Their scores take AVX-512 16 keys at a
// time too (codes widened to float, the same reduction, one multiply by the 16 keys' scales);
// values are widened and scaled as they are summed. `kv_quantize_write` stores a step's new keys
// and values into such a pool: per row, scale = max|x| / 127 and codes round(x / scale).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "to_float.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SCALESIM_X86 1
#endif

namespace {

using scalesim::to_float;

// Ask for one key's K and V rows (`elements` each) of the next block: a sequence's blocks lie
// anywhere in the pool, so the hardware prefetcher, which follows one address stream, stalls at
// each block's start. One key's rows per key of the current block spreads the requests over its
// work (all at once, they queue behind each other).
template <typename KT>
inline void prefetch_row(const KT* k, const KT* v, int64_t elements) {
  constexpr int64_t kLine = 64 / sizeof(KT);  // elements per cache line
  for (int64_t x = 0; x < elements; x += kLine) {
    __builtin_prefetch(k + x);
    __builtin_prefetch(v + x);
  }
}

// The float32 scale stored after the `d` codes of an int8 row (1 for a plain row).
template <typename KT>
inline float row_scale(const KT* row, int64_t d) {
  if constexpr (std::is_same_v<KT, int8_t>) {
    float scale;
    std::memcpy(&scale, row + d, sizeof scale);
    return scale;
  } else {
    return 1.f;
  }
}

#ifdef SCALESIM_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// Sixteen vectors into one: lane o of the result is the sum of the lanes of v[o]. Four rounds of
// pairwise unpack-and-add instead of sixteen horizontal sums.
AVX512_TARGET inline __m512 sum_lanes16(__m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the 4 sums of v[4i .. 4i+3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i) {  // across 128-bit lanes: [0+1, 2+3] of b[2i], then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  }
  // 128-bit lane L of the result: the sums of v[4L .. 4L+3].
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Scores of up to 16 keys (rows `token_stride` apart, bfloat16) for `group` query heads
// (bfloat16, contiguous, D each): vdpbf16ps multiplies pairs exactly and sums them in float32;
// out[j * out_stride + o] = scale * q_j . k_o.
template <int64_t D>
BF16_TARGET void scores_bf16(const at::BFloat16* q, const at::BFloat16* k, int64_t token_stride,
                             int64_t keys, int64_t group, float scale, float* out,
                             int64_t out_stride) {
  static_assert(D % 32 == 0, "whole vectors of 32 bfloat16");
  for (int64_t j = 0; j < group; ++j) {
    __m512bh qv[D / 32];
    for (int64_t x = 0; x < D / 32; ++x) qv[x] = (__m512bh)_mm512_loadu_si512(q + j * D + x * 32);
    __m512 parts[16];
    for (int64_t o = 0; o < 16; ++o) {
      __m512 acc = _mm512_setzero_ps();
      if (o < keys) {
        const at::BFloat16* kr = k + o * token_stride;
        for (int64_t x = 0; x < D / 32; ++x)
          acc = _mm512_dpbf16_ps(acc, qv[x], (__m512bh)_mm512_loadu_si512(kr + x * 32));
      }
      parts[o] = acc;
    }
    const __m512 sums = _mm512_mul_ps(sum_lanes16(parts), _mm512_set1_ps(scale));
    _mm512_mask_storeu_ps(out + j * out_stride, static_cast<__mmask16>((1u << keys) - 1u), sums);
  }
}

// The most query heads per KV head the int8 scores keep in flight (larger groups take the loops).
constexpr int64_t kInt8MaxGroup = 8;

// Scores of up to 16 keys of an int8 pool (rows `token_stride` apart: D codes, then the row's
// float32 scale) for `group` query heads (float, contiguous, D each, the softmax scale already
// applied): out[j * out_stride + o] = scale_o * q_j . codes_o.
template <int64_t D>
AVX512_TARGET void scores_int8(const float* q, const int8_t* k, int64_t token_stride,
                               int64_t keys, int64_t group, float* out, int64_t out_stride) {
  static_assert(D % 16 == 0, "whole vectors of 16 codes");
  alignas(64) float scales[16] = {0.f};
  __m512 parts[kInt8MaxGroup][16];
  for (int64_t o = 0; o < 16; ++o) {
    if (o >= keys) {
      for (int64_t j = 0; j < group; ++j) parts[j][o] = _mm512_setzero_ps();
      continue;
    }
    const int8_t* kr = k + o * token_stride;
    std::memcpy(&scales[o], kr + D, sizeof(float));
    __m512 kv[D / 16];
    for (int64_t x = 0; x < D / 16; ++x)
      kv[x] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + x * 16))));
    for (int64_t j = 0; j < group; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t x = 0; x < D / 16; ++x)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * D + x * 16), kv[x], acc);
      parts[j][o] = acc;
    }
  }
  const __m512 sv = _mm512_load_ps(scales);
  for (int64_t j = 0; j < group; ++j) {
    const __m512 sums = _mm512_mul_ps(sum_lanes16(parts[j]), sv);
    _mm512_mask_storeu_ps(out + j * out_stride, static_cast<__mmask16>((1u << keys) - 1u), sums);
  }
}

// Sixteen elements of a key or value row as float32.
AVX512_TARGET inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_TARGET inline __m512 widen16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
AVX512_TARGET inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// The block's weighted values, added to each query head's accumulator:
// acc[j * D + x] += sum_o sc[j * block_size + o] * scale_o * v_o[x] for the G query heads j of
// each KV head. The G heads' accumulators stay in registers over the block's keys, 64 columns at
// a time, and each value row is widened once for all G of them (the plain loop kept them in
// memory: a load and a store per multiply-add).
template <int64_t D, int64_t G, typename KT>
AVX512_TARGET void accumulate_values(const KT* v, int64_t token_stride, int64_t row,
                                     int64_t count, int64_t kv_heads, const float* sc,
                                     int64_t block_size, float* acc, const KT* next_k,
                                     const KT* next_v) {
  static_assert(D % 64 == 0, "64 columns at a time");
  constexpr int64_t W = 4;  // vectors of 16 per 64 columns
  for (int64_t kh = 0; kh < kv_heads; ++kh) {
    for (int64_t x0 = 0; x0 < D; x0 += 16 * W) {
      __m512 a[G][W];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t w = 0; w < W; ++w) a[g][w] = _mm512_loadu_ps(acc + (kh * G + g) * D + x0 + 16 * w);
      for (int64_t o = 0; o < count; ++o) {
        if (next_k != nullptr && kh == 0 && x0 == 0)
          prefetch_row(next_k + o * token_stride, next_v + o * token_stride, token_stride);
        const KT* vr = v + o * token_stride + kh * row;
        const float vs = row_scale(vr, D);
        __m512 vv[W];
        for (int64_t w = 0; w < W; ++w) vv[w] = widen16(vr + x0 + 16 * w);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 weight = _mm512_set1_ps(sc[(kh * G + g) * block_size + o] * vs);
          for (int64_t w = 0; w < W; ++w) a[g][w] = _mm512_fmadd_ps(weight, vv[w], a[g][w]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t w = 0; w < W; ++w) _mm512_storeu_ps(acc + (kh * G + g) * D + x0 + 16 * w, a[g][w]);
    }
  }
}

template <int64_t D, typename KT>
using Accumulate = void (*)(const KT*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                            float*, const KT*, const KT*);

// accumulate_values for `group` query heads per KV head, or nullptr beyond 8.
template <int64_t D, typename KT, int64_t... Gs>
Accumulate<D, KT> accumulate_for(int64_t group, std::integer_sequence<int64_t, Gs...>) {
  Accumulate<D, KT> fn = nullptr;
  ((group == Gs ? (fn = &accumulate_values<D, Gs, KT>, 0) : 0), ...);
  return fn;
}

bool cpu_has(bool bf16) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         (!bf16 || __builtin_cpu_supports("avx512bf16"));
}
#else
bool cpu_has(bool) { return false; }
#endif

// Whether bfloat16 scores take vdpbf16ps, and int8 scores the AVX-512 path (cpuid, once).
const bool kBf16Dot = cpu_has(true);
const bool kAvx512 = cpu_has(false);

// Dot products of `group` query heads (float, contiguous, d each) with one key row of type T.
template <typename T, int64_t D>
inline void dots(const float* q, const T* k, int64_t group, int64_t runtime_d, float* out) {
  const int64_t d = D > 0 ? D : runtime_d;
  float kf[256];
  for (int64_t x = 0; x < d; ++x) kf[x] = to_float(k[x]);
  for (int64_t j = 0; j < group; ++j) {
    const float* qj = q + j * d;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t x = 0; x < d; ++x) s += qj[x] * kf[x];
    out[j] = s;
  }
}

// D > 0: the head dimension as a compile-time constant (64 and 128, the common ones), so loops
// unroll into registers; D == 0: any head dimension, read at run time. T is the queries' and the
// output's type, KT the pool's (T itself, or int8_t for quantized rows of d + 4 bytes).
template <typename T, typename KT, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
            const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
            at::Tensor& out, double scale) {
  const int64_t rows = q.size(0), heads = q.size(1), d = D > 0 ? D : q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2);
  const int64_t group = heads / kv_heads, width = tables.size(1);
  constexpr bool kQuantized = std::is_same_v<KT, int8_t>;
  const int64_t row = k_pool.size(3);  // d, or d + 4 for quantized rows
  const T* qp = q.data_ptr<T>();
  const KT* kp = k_pool.data_ptr<KT>();
  const KT* vp = v_pool.data_ptr<KT>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* seq = row_seq.data_ptr<int32_t>();
  const int32_t* keys = row_keys.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const float s = static_cast<float>(scale);
  const int64_t token_stride = kv_heads * row;

  // The values' weighted sums through accumulate_values where it applies (x86 with AVX-512, head
  // dims of 64k, groups of up to 8), else the plain loops.
#ifdef SCALESIM_X86
  Accumulate<(D > 0 && D % 64 == 0 ? D : 64), KT> accumulate = nullptr;
  if constexpr (D > 0 && D % 64 == 0) {
    if (kAvx512)
      accumulate = accumulate_for<D, KT>(group, std::integer_sequence<int64_t, 1, 2, 3, 4, 5, 6, 7, 8>{});
  }
#endif
  // Spans: enough items for every thread, none shorter than a few blocks.
  const int64_t threads = at::get_num_threads();
  int64_t spans = 1;
  if (rows < threads) {
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) longest = std::max<int64_t>(longest, keys[r]);
    const int64_t min_span = 4 * block_size;
    spans = std::max<int64_t>(1, std::min((threads + rows - 1) / rows, longest / min_span));
  }
  // Per item and head: max, sum, then d accumulated values.
  const int64_t stride = heads * (d + 2);
  std::vector<float> partial(rows * spans * stride);

  at::parallel_for(0, rows * spans, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * d), sc(heads * block_size), acc(heads * d), top(heads), sum(heads);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / spans, span = item % spans;
      const int64_t n = keys[r];
      // Spans start on block boundaries.
      const int64_t blocks = (n + block_size - 1) / block_size;
      const int64_t per = (blocks + spans - 1) / spans;
      const int64_t first_block = span * per;
      const int64_t last_block = std::min(blocks, first_block + per);
      float* result = partial.data() + item * stride;
      if (first_block >= last_block) {
        for (int64_t j = 0; j < heads; ++j) {
          result[j * (d + 2)] = -INFINITY;
          result[j * (d + 2) + 1] = 0.f;
        }
        continue;
      }
      const int32_t* table = tp + static_cast<int64_t>(seq[r]) * width;
      for (int64_t x = 0; x < heads * d; ++x) qf[x] = to_float(qp[r * heads * d + x]) * s;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(top.begin(), top.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t count = std::min(block_size, n - b * block_size);
        const int64_t base = static_cast<int64_t>(table[b]) * block_size * token_stride;
        // Scores of the block's keys for every head: sc[j * block_size + o].
        bool scored = false;
#ifdef SCALESIM_X86
        if constexpr (kQuantized && D > 0 && D % 16 == 0) {
          if (kAvx512 && group <= kInt8MaxGroup) {  // 16 keys at a time, q scaled already
            for (int64_t kh = 0; kh < kv_heads; ++kh) {
              for (int64_t o0 = 0; o0 < count; o0 += 16) {
                scores_int8<D>(qf.data() + kh * group * d, kp + base + o0 * token_stride + kh * row,
                               token_stride, std::min<int64_t>(16, count - o0), group,
                               sc.data() + kh * group * block_size + o0, block_size);
              }
            }
            scored = true;
          }
        }
        if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<KT, T> && D > 0 &&
                      D % 32 == 0) {
          if (kBf16Dot) {  // 16 keys at a time, bfloat16 dot products (q unscaled, then scaled)
            for (int64_t kh = 0; kh < kv_heads; ++kh) {
              for (int64_t o0 = 0; o0 < count; o0 += 16) {
                scores_bf16<D>(qp + (r * heads + kh * group) * d,
                               kp + base + o0 * token_stride + kh * d, token_stride,
                               std::min<int64_t>(16, count - o0), group, s,
                               sc.data() + kh * group * block_size + o0, block_size);
              }
            }
            scored = true;
          }
        }
#endif
        for (int64_t o = 0; o < count && !scored; ++o) {
          const KT* krow = kp + base + o * token_stride;
          for (int64_t kh = 0; kh < kv_heads; ++kh) {
            float dot[64];
            dots<KT, D>(qf.data() + kh * group * d, krow + kh * row, group, d, dot);
            const float ks = row_scale(krow + kh * row, d);
            for (int64_t g = 0; g < group; ++g) sc[(kh * group + g) * block_size + o] = dot[g] * ks;
          }
        }
        // Online softmax, once per block and head: rescale what was accumulated if the max
        // grew, then the block's weights (exp vectorized over its keys).
        for (int64_t j = 0; j < heads; ++j) {
          float* sj = sc.data() + j * block_size;
          float m = top[j];
          for (int64_t o = 0; o < count; ++o) m = std::max(m, sj[o]);
          if (m > top[j]) {
            const float shrink = std::exp(top[j] - m);
            sum[j] *= shrink;
            float* aj = acc.data() + j * d;
#pragma omp simd
            for (int64_t x = 0; x < d; ++x) aj[x] *= shrink;
            top[j] = m;
          }
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t o = 0; o < count; ++o) {
            sj[o] = std::exp(sj[o] - m);
            total += sj[o];
          }
          sum[j] += total;
        }
        // The next block's keys and values are asked for while this block's values are summed.
        const KT* next_k = nullptr;
        const KT* next_v = nullptr;
        if (b + 1 < last_block) {
          const int64_t next = static_cast<int64_t>(table[b + 1]) * block_size * token_stride;
          next_k = kp + next;
          next_v = vp + next;
        }
#ifdef SCALESIM_X86
        if (accumulate != nullptr) {
          accumulate(vp + base, token_stride, row, count, kv_heads, sc.data(), block_size,
                     acc.data(), next_k, next_v);
          continue;
        }
#endif
        for (int64_t o = 0; o < count; ++o) {
          if (next_k != nullptr)
            prefetch_row(next_k + o * token_stride, next_v + o * token_stride, token_stride);
          const KT* vrow = vp + base + o * token_stride;
          for (int64_t kh = 0; kh < kv_heads; ++kh) {
            float vf[256];
            const KT* vh = vrow + kh * row;
            if constexpr (kQuantized) {
              const float vs = row_scale(vh, d);
              for (int64_t x = 0; x < d; ++x) vf[x] = to_float(vh[x]) * vs;
            } else {
              for (int64_t x = 0; x < d; ++x) vf[x] = to_float(vh[x]);
            }
            for (int64_t g = 0; g < group; ++g) {
              const int64_t j = kh * group + g;
              const float w = sc[j * block_size + o];
              float* aj = acc.data() + j * d;
#pragma omp simd
              for (int64_t x = 0; x < d; ++x) aj[x] += w * vf[x];
            }
          }
        }
      }
      for (int64_t j = 0; j < heads; ++j) {
        result[j * (d + 2)] = top[j];
        result[j * (d + 2) + 1] = sum[j];
        std::memcpy(result + j * (d + 2) + 2, acc.data() + j * d, d * sizeof(float));
      }
    }
  });

  // Merge the spans of each row: rescale each to the common max.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < heads; ++j) {
      float top = -INFINITY;
      for (int64_t span = 0; span < spans; ++span)
        top = std::max(top, partial[(r * spans + span) * stride + j * (d + 2)]);
      float total = 0.f;
      float merged[256] = {0.f};
      for (int64_t span = 0; span < spans; ++span) {
        const float* part = partial.data() + (r * spans + span) * stride + j * (d + 2);
        if (part[1] == 0.f) continue;
        const float f = std::exp(part[0] - top);
        total += part[1] * f;
        for (int64_t x = 0; x < d; ++x) merged[x] += part[2 + x] * f;
      }
      T* o = op + (r * heads + j) * d;
      const float inv = 1.f / total;
      for (int64_t x = 0; x < d; ++x) o[x] = static_cast<T>(merged[x] * inv);
    }
  }
}

template <typename T>
void attend_pool(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                 const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                 at::Tensor& out, double scale) {
  const bool quantized = k_pool.scalar_type() == at::kChar;
  const int64_t d = q.size(2);
#define SCALESIM_ATTEND(D)                                                                \
  (quantized ? attend<T, int8_t, D>(q, k_pool, v_pool, tables, row_seq, row_keys, out, scale) \
             : attend<T, T, D>(q, k_pool, v_pool, tables, row_seq, row_keys, out, scale))
  if (d == 64) {
    SCALESIM_ATTEND(64);
  } else if (d == 128) {
    SCALESIM_ATTEND(128);
  } else {
    SCALESIM_ATTEND(0);
  }
#undef SCALESIM_ATTEND
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& tables, const at::Tensor& row_seq,
                           const at::Tensor& row_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_attention: q [rows, heads, d], pools [blocks, block_size, kv_heads, d]");
  const bool quantized = k_pool.scalar_type() == at::kChar;
  const int64_t row = q.size(2) + (quantized ? static_cast<int64_t>(sizeof(float)) : 0);
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && k_pool.size(3) == row && q.size(2) <= 256 &&
                  q.size(1) / k_pool.size(2) <= 64,
              "paged_attention: heads a multiple of kv_heads (at most 64 per group), head dims "
              "of at most 256, pool rows of d (d + 4 for int8 pools)");
  TORCH_CHECK((quantized || q.scalar_type() == k_pool.scalar_type()) &&
                  v_pool.scalar_type() == k_pool.scalar_type() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous(), "paged_attention: contiguous pools of q's dtype or int8");
  TORCH_CHECK(tables.scalar_type() == at::kInt && row_seq.scalar_type() == at::kInt &&
                  row_keys.scalar_type() == at::kInt, "paged_attention: int32 tables and rows");
  at::Tensor qc = q.contiguous(), tc = tables.contiguous();
  at::Tensor rs = row_seq.contiguous(), rk = row_keys.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged_attention: float32 or bfloat16, got ", q.scalar_type());
  if (q.scalar_type() == at::kBFloat16) {
    attend_pool<at::BFloat16>(qc, k_pool, v_pool, tc, rs, rk, out, scale);
  } else {
    attend_pool<float>(qc, k_pool, v_pool, tc, rs, rk, out, scale);
  }
  return out.view({q.size(0), q.size(1) * q.size(2)});
}

// Rows `x [tokens, kv_heads, d]` quantized into the int8 rows (d codes, float32 scale) of the
// flat pool slots `slots[t]`.
template <typename T>
void quantize_into(const at::Tensor& x, const at::Tensor& slots, at::Tensor& pool) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), row = pool.size(3);
  const T* xp = x.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  int8_t* pp = pool.data_ptr<int8_t>();
  at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads;
      const T* src = xp + i * d;
      int8_t* dst = pp + (sp[t] * heads + h) * row;
      float amax = 0.f;
      for (int64_t c = 0; c < d; ++c) amax = std::max(amax, std::fabs(to_float(src[c])));
      const float scale = amax / 127.f;
      for (int64_t c = 0; c < d; ++c) {
        const float code = scale > 0.f ? std::nearbyint(to_float(src[c]) / scale) : 0.f;
        dst[c] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, code)));
      }
      std::memcpy(dst + d, &scale, sizeof scale);
    }
  });
}

// The rows of `blocks` of an int8 pool `[blocks, block_size, kv_heads, d + 4]`, in order, as
// `[blocks * block_size, kv_heads, d]` of `dtype` (code * scale): what the matrix-product path of
// long chunks attends to, in one pass instead of a gather and four elementwise ops.
template <typename T>
void dequantize_blocks(const at::Tensor& pool, const int64_t* blocks, int64_t n, at::Tensor& out) {
  const int64_t per_block = pool.size(1) * pool.size(2), row = pool.size(3), d = row - 4;
  const int8_t* pp = pool.data_ptr<int8_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int8_t* src = pp + blocks[i] * per_block * row;
      T* dst = op + i * per_block * d;
      for (int64_t r = 0; r < per_block; ++r) {
        const float scale = row_scale(src + r * row, d);
        for (int64_t c = 0; c < d; ++c) dst[r * d + c] = static_cast<T>(src[r * row + c] * scale);
      }
    }
  });
}

at::Tensor kv_dequantize(const at::Tensor& pool, const at::Tensor& blocks, at::ScalarType dtype) {
  TORCH_CHECK(pool.scalar_type() == at::kChar && pool.is_contiguous() && pool.dim() == 4 &&
                  pool.size(3) > 4, "kv_dequantize: a contiguous int8 pool [blocks, block_size, "
                  "kv_heads, d + 4]");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 1,
              "kv_dequantize: int64 block ids");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "kv_dequantize: float32 or bfloat16, got ", dtype);
  const at::Tensor ids = blocks.contiguous();
  const int64_t n = ids.numel(), d = pool.size(3) - 4;
  const int64_t* bp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(bp[i] >= 0 && bp[i] < pool.size(0), "kv_dequantize: block ", bp[i], " out of range");
  at::Tensor out = at::empty({n * pool.size(1), pool.size(2), d}, pool.options().dtype(dtype));
  if (dtype == at::kBFloat16) {
    dequantize_blocks<at::BFloat16>(pool, bp, n, out);
  } else {
    dequantize_blocks<float>(pool, bp, n, out);
  }
  return out;
}

void kv_quantize_write(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& slots,
                       const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k_pool.scalar_type() == at::kChar && v_pool.scalar_type() == at::kChar &&
                  k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 4 &&
                  v_pool.sizes() == k_pool.sizes(),
              "kv_quantize_write: contiguous int8 pools [blocks, block_size, kv_heads, d + 4]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_pool.size(2) &&
                  k.size(2) + static_cast<int64_t>(sizeof(float)) == k_pool.size(3) &&
                  slots.scalar_type() == at::kLong && slots.numel() == k.size(0),
              "kv_quantize_write: k, v [tokens, kv_heads, d] and one int64 slot per token");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "kv_quantize_write: float32 or bfloat16 keys and values, got ", k.scalar_type());
  const at::Tensor sc = slots.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  if (k.scalar_type() == at::kBFloat16) {
    quantize_into<at::BFloat16>(kc, sc, k_pool);
    quantize_into<at::BFloat16>(vc, sc, v_pool);
  } else {
    quantize_into<float>(kc, sc, k_pool);
    quantize_into<float>(vc, sc, v_pool);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor row_seq, "
        "Tensor row_keys, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
  m.def("kv_quantize_write(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, Tensor k, "
        "Tensor v) -> ()");
  m.impl("kv_quantize_write", c10::DispatchKey::CPU, TORCH_FN(kv_quantize_write));
  m.def("kv_dequantize(Tensor pool, Tensor blocks, ScalarType dtype) -> Tensor");
  m.impl("kv_dequantize", c10::DispatchKey::CPU, TORCH_FN(kv_dequantize));
}
