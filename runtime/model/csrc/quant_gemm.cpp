// Products of 4- or 8-bit weights with activations quantized to int8 per block of 32 (CPU).
//
// q8_linear(x [M, K], codes, scale, min, bias, bits, in_features) -> y [M, N] in x's dtype.
//
// Weights: per output row n and block b of 32 inputs, unsigned codes u and a float16 scale and
// min, w = u * scale[n, b] + min[n, b] (GGUF's Q4_1; an int8 weight is the same with u = c + 128,
// min = -128 * scale, which the kernel derives when `min` is absent: GGUF's Q8_0). K is padded to
// a multiple of 64 (zero codes, scale and min).
//
// Activations: each row's block of 32 is quantized on the fly to q = round(x / d), d = max|x| /
// 127 (GGUF's Q8_1): unlike one scale per tensor, an outlier only coarsens its own block, which is
// what keeps next-token agreement with float32 (per-tensor int8 activations took it to 59%).
//
// y[m, n] = sum_b scale[n, b] d[m, b] * (u . q)[n, m, b] + sum_b min[n, b] d[m, b] sum(q[m, b]).
//
// Layout, for AVX-512 VNNI (vpdpbusd: 64 unsigned bytes times 64 signed bytes, summed by four
// into 16 int32 lanes). A row's blocks go by groups of 16 blocks (512 inputs), interleaved so that
// int32 lane l holds block l: step s (0..7) of a group is 64 bytes, lane l's four bytes being
// inputs 4s..4s+3 of block l. Eight vpdpbusd then leave the 16 blocks' dot products in one
// register, which is converted and scaled by the 16 blocks' scales in three float instructions;
// the weight bytes are read as they are (8-bit) or as four 64-byte loads whose low nibbles are
// steps 0-3 and high nibbles steps 4-7 (4-bit). The blocks after the last whole group go by
// chunks of two blocks (64 inputs: 4-bit codes as 32 bytes, the first block in the low nibbles),
// where lanes 0-7 of a vpdpbusd hold the first block and 8-15 the second. Activations are
// quantized into the same layout. The portable path reads the same layout with plain loops.
// Which path runs is decided at run time (cpuid); the VNNI code is compiled for that ISA by
// function attributes whatever flags the build got.
//
// Batch invariance: each output (m, n) is computed by the same sequence of operations whatever M
// is and wherever row m sits in its tile (padded rows are zeros), so a sequence's logits do not
// depend on which other sequences share its step (tests check this bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "to_float.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SCALESIM_X86 1
#endif

namespace {

using scalesim::to_float;

constexpr int64_t kBlock = 32;   // inputs per activation / weight block
constexpr int64_t kChunk = 64;   // inputs per vpdpbusd in the tail (two blocks)
constexpr int64_t kGroup = 16;   // blocks per interleaved group (one int32 lane each)

inline float half_to_float(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The activations of one call, quantized: rows padded to a multiple of the tile's rows.
struct Quantized {
  int64_t rows = 0, padded_k = 0, blocks = 0, tail_chunks = 0;
  std::vector<int8_t> q;       // [rows][padded_k] in the layout above
  std::vector<int8_t> natural; // [rows][padded_k] in input order (the portable path)
  std::vector<float> d;        // [rows][blocks]: the block's scale
  std::vector<float> ds;       // [rows][blocks]: d * sum(q), what the weights' min multiplies
  std::vector<float> d_lanes;  // [rows][tail_chunks][16]: d of a tail chunk's blocks, 8 lanes each
};

// The block scale and the codes by the same IEEE operations as the torch reference
// (weights.quantize_activations), so both find the same codes: -ffast-math, which the build
// passes, could turn `amax / 127` into `amax * (1 / 127)`, one ulp off; the SSE intrinsics are
// opaque to it. (A function-level optimize("no-fast-math") would do too, but then gcc inlines
// nothing into it: std::max became a call per element.)
inline float ieee_div(float a, float b) {
#ifdef SCALESIM_X86
  return _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(a), _mm_set_ss(b)));
#else
  return a / b;
#endif
}

// Round half to even, as torch.round does (the default rounding mode).
inline int32_t round_even(float v) {
#ifdef SCALESIM_X86
  return _mm_cvtss_si32(_mm_set_ss(v));
#else
  return static_cast<int32_t>(std::lrintf(v));
#endif
}

#ifdef SCALESIM_X86
// One whole block with AVX-512: the same operations as the scalar loop below, vectorized
// (vcvtps2dq rounds half to even in the default rounding mode, as _mm_cvtss_si32 does).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) float quantize_block_avx512(
    const T* x, int8_t* c, int32_t* sum) {
  __m512 lo, hi;
  if constexpr (std::is_same_v<T, float>) {
    lo = _mm512_loadu_ps(x);
    hi = _mm512_loadu_ps(x + 16);
  } else {  // bfloat16: the top half of a float32
    const __m512i raw = _mm512_loadu_si512(x);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    hi = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = ieee_div(amax, 127.f);
  const __m512 id = _mm512_set1_ps(d > 0.f ? ieee_div(1.f, d) : 0.f);
  const __m512i limit = _mm512_set1_epi32(127);
  const __m512i qlo = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lo, id)), limit),
                                       _mm512_sub_epi32(_mm512_setzero_si512(), limit));
  const __m512i qhi = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(hi, id)), limit),
                                       _mm512_sub_epi32(_mm512_setzero_si512(), limit));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm512_cvtepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16), _mm512_cvtepi32_epi8(qhi));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  return d;
}
#endif

// `vector`: whole blocks through the AVX-512 quantizer (the VNNI path: its CPU has AVX-512);
// `natural`: also keep the codes in input order (the portable path).
template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int64_t rows_per_tile, bool vector,
                   bool natural, Quantized& out) {
  out.rows = (m + rows_per_tile - 1) / rows_per_tile * rows_per_tile;
  out.padded_k = (k + kChunk - 1) / kChunk * kChunk;
  out.blocks = out.padded_k / kBlock;
  const int64_t tail_first = out.blocks / kGroup * kGroup;
  out.tail_chunks = (out.blocks - tail_first) / 2;
  out.q.assign(out.rows * out.padded_k, 0);
  if (natural) out.natural.assign(out.rows * out.padded_k, 0);
  out.d.assign(out.rows * out.blocks, 0.f);
  out.ds.assign(out.rows * out.blocks, 0.f);
  out.d_lanes.assign(out.rows * out.tail_chunks * 16, 0.f);
  const int64_t groups = out.blocks / kGroup;
  for (int64_t r = 0; r < m; ++r) {
    const T* xr = x + r * k;
    int8_t* qr = out.q.data() + r * out.padded_k;
    for (int64_t b = 0; b * kBlock < k; ++b) {
      const int64_t n = std::min<int64_t>(kBlock, k - b * kBlock);
      int8_t c[kBlock] = {0};
      int32_t sum = 0;
      float d;
#ifdef SCALESIM_X86
      if (vector && n == kBlock) {
        d = quantize_block_avx512<T>(xr + b * kBlock, c, &sum);
      } else
#endif
      {
        float amax = 0.f;
        for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(to_float(xr[b * kBlock + i])));
        d = ieee_div(amax, 127.f);
        const float id = d > 0.f ? ieee_div(1.f, d) : 0.f;
        for (int64_t i = 0; i < n; ++i) {
          c[i] = static_cast<int8_t>(std::max(-127, std::min(127, round_even(to_float(xr[b * kBlock + i]) * id))));
          sum += c[i];
        }
      }
      if (b < groups * kGroup) {  // interleaved: input 4s + e of block l at 64 s + 4 l + e
        int8_t* base = qr + (b / kGroup) * kGroup * kBlock + (b % kGroup) * 4;
        for (int64_t step = 0; step < 8; ++step) std::memcpy(base + step * 64, c + step * 4, 4);
      } else {
        std::memcpy(qr + b * kBlock, c, kBlock);
      }
      if (natural) std::memcpy(out.natural.data() + r * out.padded_k + b * kBlock, c, kBlock);
      out.d[r * out.blocks + b] = d;
      out.ds[r * out.blocks + b] = d * static_cast<float>(sum);
      if (b >= tail_first) {
        const int64_t t = (b - tail_first) / 2;
        float* lanes = out.d_lanes.data() + (r * out.tail_chunks + t) * 16 + ((b - tail_first) % 2) * 8;
        for (int i = 0; i < 8; ++i) lanes[i] = d;
      }
    }
  }
}

struct Weights {
  const uint8_t* codes;   // [n][padded_k * bits / 8] in the layout above
  const uint16_t* scale;  // [n][blocks] float16
  const uint16_t* min;    // [n][blocks] float16, or nullptr: -128 * scale (symmetric int8)
  int64_t n, padded_k, blocks, bits;
  int64_t row_bytes() const { return padded_k * bits / 8; }
};

template <typename T>
inline void store(T* out, float v) { *out = static_cast<T>(v); }

// -- portable path ----------------------------------------------------------------------------

template <typename T>
void rows_portable(const Quantized& a, int64_t m, const Weights& w, const float* bias, T* y,
                   int64_t n_begin, int64_t n_end) {
  std::vector<int16_t> codes(w.padded_k);
  const int64_t groups = w.blocks / kGroup, head = groups * kGroup * kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes();
    // The row's codes in input order, once per row, walking the layout with constant strides.
    int16_t* out = codes.data();
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t step = 0; step < 8; ++step) {
        for (int64_t l = 0; l < kGroup; ++l) {
          for (int64_t e = 0; e < 4; ++e) {
            const int64_t i = (g * kGroup + l) * kBlock + step * 4 + e;
            if (w.bits == 8) {
              out[i] = row[g * kGroup * kBlock + step * 64 + l * 4 + e];
            } else {
              const uint8_t byte = row[g * kGroup * kBlock / 2 + (step % 4) * 64 + l * 4 + e];
              out[i] = step < 4 ? (byte & 0x0F) : (byte >> 4);
            }
          }
        }
      }
    }
    for (int64_t i = head; i < w.padded_k; ++i) {
      const int64_t t = i - head;
      if (w.bits == 8) {
        out[i] = row[i];
      } else {
        const uint8_t byte = row[head / 2 + (t / kChunk) * 32 + t % 32];
        out[i] = (t % kChunk) < 32 ? (byte & 0x0F) : (byte >> 4);
      }
    }
    const uint16_t* ws = w.scale + n * w.blocks;
    const uint16_t* wm = w.min == nullptr ? nullptr : w.min + n * w.blocks;
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* q = a.natural.data() + r * a.padded_k;
      float acc = 0.f, offset = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        int32_t dot = 0;
        for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) dot += codes[i] * q[i];
        const float scale = half_to_float(ws[b]);
        acc += static_cast<float>(dot) * (scale * a.d[r * a.blocks + b]);
        const float mn = wm == nullptr ? -128.f * scale : half_to_float(wm[b]);
        offset += mn * a.ds[r * a.blocks + b];
      }
      float v = acc + offset;
      if (bias != nullptr) v += bias[n];
      store(y + r * w.n + n, v);
    }
  }
}

// -- AVX-512 VNNI path ------------------------------------------------------------------------

#ifdef SCALESIM_X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,f16c")))

// One tile: rows m0 .. m0+MT of the activations against weight rows n0 .. n0+NR (a shorter last
// tile of weight rows repeats its last row and stores only the real ones).
template <int BITS, int MT, typename T>
VNNI_TARGET void tile_vnni(const Quantized& a, int64_t m0, int64_t m, const Weights& w, int64_t n0,
                           int64_t nr, const float* bias, T* y) {
  constexpr int NR = 4;
  __m512 acc[MT][NR];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  const uint16_t* ws[NR];
  const uint16_t* wm[NR];
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + std::min<int64_t>(j, nr - 1);
    rows[j] = w.codes + n * w.row_bytes();
    ws[j] = w.scale + n * w.blocks;
    wm[j] = w.min == nullptr ? nullptr : w.min + n * w.blocks;
  }
  const int64_t groups = w.blocks / kGroup;
  constexpr int64_t group_bytes = kGroup * kBlock * BITS / 8;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wg = rows[j] + g * group_bytes;
      __m512i wv[8];
      if constexpr (BITS == 8) {
        for (int s = 0; s < 8; ++s) wv[s] = _mm512_loadu_si512(wg + s * 64);
      } else {
        for (int t = 0; t < 4; ++t) {
          const __m512i both = _mm512_loadu_si512(wg + t * 64);
          wv[t] = _mm512_and_si512(both, low_nibbles);
          wv[t + 4] = _mm512_and_si512(_mm512_srli_epi16(both, 4), low_nibbles);
        }
      }
      const __m512 scale = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws[j] + g * kGroup)));
      const __m512 mn = wm[j] == nullptr
                            ? _mm512_mul_ps(scale, _mm512_set1_ps(-128.f))
                            : _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(wm[j] + g * kGroup)));
      for (int i = 0; i < MT; ++i) {
        const int64_t r = m0 + i;
        const int8_t* qa = a.q.data() + r * a.padded_k + g * kGroup * kBlock;
        // Two independent chains of four: vpdpbusd's latency is hidden behind the other's.
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int s = 0; s < 8; s += 2) {
          even = _mm512_dpbusd_epi32(even, wv[s], _mm512_loadu_si512(qa + s * 64));
          odd = _mm512_dpbusd_epi32(odd, wv[s + 1], _mm512_loadu_si512(qa + (s + 1) * 64));
        }
        const __m512 d = _mm512_loadu_ps(a.d.data() + r * a.blocks + g * kGroup);
        const __m512 ds = _mm512_loadu_ps(a.ds.data() + r * a.blocks + g * kGroup);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)),
                                    _mm512_mul_ps(scale, d), acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(mn, ds, acc[i][j]);
      }
    }
  }
  if (a.tail_chunks > 0) {
    // The blocks after the last group, by chunks of two: lanes 0-7 the first, 8-15 the second.
    const int64_t first_block = groups * kGroup;
    const int64_t tail_blocks = w.blocks - first_block;
    const __mmask16 mask = static_cast<__mmask16>((1u << tail_blocks) - 1u);
    __m512 scale16[NR];
    for (int j = 0; j < NR; ++j) {
      scale16[j] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ws[j] + first_block));
      const __m512 mn = wm[j] == nullptr
                            ? _mm512_mul_ps(scale16[j], _mm512_set1_ps(-128.f))
                            : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, wm[j] + first_block));
      for (int i = 0; i < MT; ++i) {
        const __m512 ds = _mm512_maskz_loadu_ps(mask, a.ds.data() + (m0 + i) * a.blocks + first_block);
        acc[i][j] = _mm512_fmadd_ps(mn, ds, acc[i][j]);
      }
    }
    const uint8_t* tail[NR];
    for (int j = 0; j < NR; ++j) tail[j] = rows[j] + groups * group_bytes;
    for (int64_t c = 0; c < a.tail_chunks; ++c) {
      const __m512i index = _mm512_set_epi32(
          2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
          2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c);
      __m512i codes[NR];
      __m512 wscale[NR];
      for (int j = 0; j < NR; ++j) {
        if constexpr (BITS == 8) {
          codes[j] = _mm512_loadu_si512(tail[j] + c * kChunk);
        } else {
          const __m512i both = _mm512_broadcast_i64x4(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail[j] + c * 32)));
          // Lower half: low nibbles (first block); upper half: shifted by 4 (second block).
          const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
          codes[j] = _mm512_and_si512(_mm512_srlv_epi64(both, shift), low_nibbles);
        }
        wscale[j] = _mm512_permutexvar_ps(index, scale16[j]);
      }
      for (int i = 0; i < MT; ++i) {
        const int64_t r = m0 + i;
        const __m512i q = _mm512_loadu_si512(a.q.data() + r * a.padded_k +
                                             first_block * kBlock + c * kChunk);
        const __m512 d = _mm512_loadu_ps(a.d_lanes.data() + (r * a.tail_chunks + c) * 16);
        for (int j = 0; j < NR; ++j) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[j], q);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale[j], d),
                                      acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    if (m0 + i >= m) break;
    for (int j = 0; j < nr; ++j) {
      float v = _mm512_reduce_add_ps(acc[i][j]);
      if (bias != nullptr) v += bias[n0 + j];
      store(y + (m0 + i) * w.n + n0 + j, v);
    }
  }
}

template <int BITS, int MT, typename T>
VNNI_TARGET void rows_vnni(const Quantized& a, int64_t m, const Weights& w, const float* bias,
                           T* y, int64_t tile_begin, int64_t tile_end) {
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t n0 = t * 4, nr = std::min<int64_t>(4, w.n - n0);
    for (int64_t m0 = 0; m0 < a.rows; m0 += MT) tile_vnni<BITS, MT, T>(a, m0, m, w, n0, nr, bias, y);
  }
}

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
}
#else
bool cpu_has_vnni() { return false; }
#endif

// 0: portable, 1: AVX-512 VNNI. Chosen once from cpuid; quant_isa() may force the portable one.
std::atomic<int> g_isa{-1};

int isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = cpu_has_vnni() ? 1 : 0;
    g_isa.store(v);
  }
  return v;
}

template <typename T>
void run(const at::Tensor& x, const Weights& w, const float* bias, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1);
  const bool vnni = isa() == 1;
  // Single rows (one decode) run 1 x 4 tiles; more rows run 4 x 4, padded with zero rows.
  const int64_t mt = (vnni && m > 1) ? 4 : 1;
  Quantized a;
  quantize_rows<T>(x.data_ptr<T>(), m, k, mt, vnni, !vnni, a);
  T* out = y.data_ptr<T>();
  const int64_t tiles = (w.n + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, tiles / (4 * at::get_num_threads()));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
#ifdef SCALESIM_X86
    if (vnni) {
      if (w.bits == 4) {
        mt == 1 ? rows_vnni<4, 1, T>(a, m, w, bias, out, begin, end)
                : rows_vnni<4, 4, T>(a, m, w, bias, out, begin, end);
      } else {
        mt == 1 ? rows_vnni<8, 1, T>(a, m, w, bias, out, begin, end)
                : rows_vnni<8, 4, T>(a, m, w, bias, out, begin, end);
      }
      return;
    }
#endif
    rows_portable<T>(a, m, w, bias, out, begin * 4, std::min(w.n, end * 4));
  });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& min, const c10::optional<at::Tensor>& bias,
                     int64_t bits, int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "q8_linear: bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features,
              "q8_linear: x [rows, in_features] with in_features ", in_features);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "q8_linear: float32 or bfloat16 activations");
  const int64_t padded_k = (in_features + kChunk - 1) / kChunk * kChunk;
  const int64_t n = codes.size(0), blocks = padded_k / kBlock;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == padded_k * bits / 8,
              "q8_linear: uint8 codes [out, padded in * bits / 8]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  scale.sizes() == at::IntArrayRef({n, blocks}),
              "q8_linear: float16 scale [out, padded in / 32]");
  Weights w{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr()),
            nullptr, n, padded_k, blocks, bits};
  if (min.has_value()) {
    TORCH_CHECK(min->scalar_type() == at::kHalf && min->is_contiguous() &&
                    min->sizes() == scale.sizes(), "q8_linear: min like scale");
    w.min = reinterpret_cast<const uint16_t*>(min->data_ptr());
  } else {
    TORCH_CHECK(bits == 8, "q8_linear: 4-bit codes need their min");
  }
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "q8_linear: bias [out]");
  }
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    run<float>(xc, w, bp, y);
  } else {
    run<at::BFloat16>(xc, w, bp, y);
  }
  return y;
}

// Select the path ("auto": the best the CPU has, "portable", "avx512_vnni"; "": keep); returns
// the one that will run. "best" changes nothing and returns the best the CPU has. For tests and
// benchmarks that compare the paths.
std::string quant_isa(const std::string& which) {
  if (which == "best") return cpu_has_vnni() ? "avx512_vnni" : "portable";
  if (which == "portable") {
    g_isa.store(0);
  } else if (which == "avx512_vnni") {
    TORCH_CHECK(cpu_has_vnni(), "quant_isa: this CPU has no AVX-512 VNNI");
    g_isa.store(1);
  } else if (which == "auto") {
    g_isa.store(cpu_has_vnni() ? 1 : 0);
  } else if (which != "") {
    TORCH_CHECK(false, "quant_isa: auto, portable or avx512_vnni, got ", which);
  }
  return isa() == 1 ? "avx512_vnni" : "portable";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? min, Tensor? bias, int bits, "
        "int in_features) -> Tensor");
  m.impl("q8_linear", c10::DispatchKey::CPU, TORCH_FN(q8_linear));
  m.def("quant_isa(str which) -> str", TORCH_FN(quant_isa));
}
