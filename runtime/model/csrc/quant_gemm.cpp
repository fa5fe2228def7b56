// Products of 4- or 8-bit weights with activations quantized to int8 per block of 32 (CPU).
//
// q8_linear(x [M, K], codes, scale, min, bias, bits, in_features) -> y [M, N] in x's dtype.
//
// Weights: per output row n and block b of 32 inputs, unsigned codes u and a float scale and min,
// w = u * scale[n, b] + min[n, b] (the form of GGUF's Q4_1; an int8 weight is the same with
// u = c + 128, min = -128 * scale, which the kernel derives when `min` is absent). K is padded to a
// multiple of 64 (zero codes, zero scale and min). Codes are stored by chunks of 64 inputs (two
// blocks): 8-bit codes as they are; 4-bit codes as 32 bytes whose low nibbles are the first
// block's 32 codes and whose high nibbles the second's, so one 256-bit load, a shift of the upper
// half and a mask give the chunk's 64 codes in block order.
//
// Activations: each row's block of 32 is quantized on the fly to q = round(x / d), d = max|x| /
// 127 (GGUF's Q8_1): unlike one scale per tensor, an outlier only coarsens its own block, which is
// what keeps next-token agreement with float32 (per-tensor int8 activations took it to 59%).
//
// y[m, n] = sum_b scale[n, b] d[m, b] * (u . q)[n, m, b] + sum_b min[n, b] d[m, b] sum(q[m, b]).
// The integer dot products are exact; with AVX-512 VNNI one vpdpbusd multiplies 64 unsigned
// codes by 64 signed activations into 16 int32 lanes (lanes 0-7 the first block, 8-15 the
// second), which are converted and scaled per block in float. The portable path computes the same
// sums with plain loops. Which one runs is decided at run time (the CPU's cpuid); the VNNI code is
// compiled for that ISA by function attributes whatever flags the build got.
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
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SCALESIM_X86 1
#endif

namespace {

using scalesim::to_float;

constexpr int64_t kBlock = 32;  // inputs per activation / weight block
constexpr int64_t kChunk = 64;  // inputs per vpdpbusd (two blocks)

// The activations of one call, quantized: rows padded to a multiple of `rows_per_tile`.
struct Quantized {
  int64_t rows = 0, padded_k = 0, blocks = 0;
  std::vector<int8_t> q;      // [rows][padded_k]
  std::vector<float> d;       // [rows][blocks]: the block's scale
  std::vector<float> ds;      // [rows][blocks]: d * sum(q), what the weights' min multiplies
  std::vector<float> d_lanes; // [rows][padded_k / 64][16]: d of each chunk's two blocks, 8 lanes each
};

// Compiled without -ffast-math: with it gcc may turn `amax / 127` into `amax * (1 / 127)`, one
// ulp off, and a code could then differ from the torch reference's.
template <typename T>
__attribute__((optimize("no-fast-math"))) void quantize_rows(const T* x, int64_t m, int64_t k, int64_t rows_per_tile, Quantized& out) {
  out.rows = (m + rows_per_tile - 1) / rows_per_tile * rows_per_tile;
  out.padded_k = (k + kChunk - 1) / kChunk * kChunk;
  out.blocks = out.padded_k / kBlock;
  out.q.assign(out.rows * out.padded_k, 0);
  out.d.assign(out.rows * out.blocks, 0.f);
  out.ds.assign(out.rows * out.blocks, 0.f);
  out.d_lanes.assign(out.rows * (out.padded_k / kChunk) * 16, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    const T* xr = x + r * k;
    for (int64_t b = 0; b * kBlock < k; ++b) {
      const int64_t n = std::min<int64_t>(kBlock, k - b * kBlock);
      float v[kBlock];
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        v[i] = to_float(xr[b * kBlock + i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      // The same float operations as the torch reference (weights.quantize_activations), so
      // both find the same codes.
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = out.q.data() + r * out.padded_k + b * kBlock;
      int32_t sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * id));
        q[i] = static_cast<int8_t>(std::max(-127, std::min(127, c)));
        sum += q[i];
      }
      out.d[r * out.blocks + b] = d;
      out.ds[r * out.blocks + b] = d * static_cast<float>(sum);
      float* lanes = out.d_lanes.data() + (r * (out.padded_k / kChunk) + b / 2) * 16 + (b % 2) * 8;
      for (int i = 0; i < 8; ++i) lanes[i] = d;
    }
  }
}

struct Weights {
  const uint8_t* codes;  // [n][padded_k * bits / 8]
  const float* scale;    // [n][blocks]
  const float* min;      // [n][blocks], or nullptr: -128 * scale (symmetric int8)
  int64_t n, padded_k, blocks, bits;
  int64_t row_bytes() const { return padded_k * bits / 8; }
};

template <typename T>
inline void store(T* out, float v) { *out = static_cast<T>(v); }

// -- portable path ----------------------------------------------------------------------------

inline int code_at(const Weights& w, const uint8_t* row, int64_t i) {
  if (w.bits == 8) return row[i];
  const int64_t chunk = i / kChunk, j = i % kChunk;
  const uint8_t byte = row[chunk * 32 + (j % 32)];
  return j < 32 ? (byte & 0x0F) : (byte >> 4);
}

template <typename T>
void rows_portable(const Quantized& a, int64_t m, const Weights& w, const float* bias, T* y,
                   int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes();
    const float* ws = w.scale + n * w.blocks;
    const float* wm = w.min == nullptr ? nullptr : w.min + n * w.blocks;
    int32_t codes[kBlock];
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* q = a.q.data() + r * a.padded_k;
      float acc = 0.f, offset = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        for (int64_t i = 0; i < kBlock; ++i) codes[i] = code_at(w, row, b * kBlock + i);
        int32_t dot = 0;
        for (int64_t i = 0; i < kBlock; ++i) dot += codes[i] * q[b * kBlock + i];
        acc += static_cast<float>(dot) * (ws[b] * a.d[r * a.blocks + b]);
        const float mn = wm == nullptr ? -128.f * ws[b] : wm[b];
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
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// The 64 codes of chunk `c` of a weight row, as unsigned bytes in block order.
template <int BITS>
VNNI_TARGET inline __m512i chunk_codes(const uint8_t* row, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(row + c * kChunk);
  } else {
    const __m512i both = _mm512_broadcast_i64x4(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32)));
    // Lower half: low nibbles (first block); upper half: shifted by 4 (second block).
    const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi64(both, shift), _mm512_set1_epi8(0x0F));
  }
}

// One tile: rows m0 .. m0+MT of the activations against weight rows n0 .. n0+NR (NR <= 4; a
// shorter last tile of rows repeats computing nothing for the missing ones).
template <int BITS, int MT, typename T>
VNNI_TARGET void tile_vnni(const Quantized& a, int64_t m0, int64_t m, const Weights& w, int64_t n0,
                           int64_t nr, const float* bias, T* y) {
  constexpr int NR = 4;
  __m512 acc[MT][NR];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  const float* ws[NR];
  const float* wm[NR];
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + std::min<int64_t>(j, nr - 1);  // a missing row reads the last one
    rows[j] = w.codes + n * w.row_bytes();
    ws[j] = w.scale + n * w.blocks;
    wm[j] = w.min == nullptr ? nullptr : w.min + n * w.blocks;
  }
  const int64_t chunks = w.padded_k / kChunk;
  const int64_t chunk_lanes = chunks * 16;
  // Lane l of a chunk's scale vector is block 2c + l / 8: index 2c' or 2c'+1 of 16 blocks.
  for (int64_t g = 0; g * 8 < chunks; ++g) {
    const int64_t first_block = g * 16;
    const int64_t group_blocks = std::min<int64_t>(16, w.blocks - first_block);
    const __mmask16 mask = static_cast<__mmask16>((1u << group_blocks) - 1u);
    __m512 scale16[NR];
    for (int j = 0; j < NR; ++j) scale16[j] = _mm512_maskz_loadu_ps(mask, ws[j] + first_block);
    const int64_t group_chunks = std::min<int64_t>(8, chunks - g * 8);
    for (int64_t cc = 0; cc < group_chunks; ++cc) {
      const int64_t c = g * 8 + cc;
      const __m512i index = _mm512_set_epi32(
          2 * cc + 1, 2 * cc + 1, 2 * cc + 1, 2 * cc + 1, 2 * cc + 1, 2 * cc + 1, 2 * cc + 1,
          2 * cc + 1, 2 * cc, 2 * cc, 2 * cc, 2 * cc, 2 * cc, 2 * cc, 2 * cc, 2 * cc);
      __m512i codes[NR];
      __m512 wscale[NR];
      for (int j = 0; j < NR; ++j) {
        codes[j] = chunk_codes<BITS>(rows[j], c);
        wscale[j] = _mm512_permutexvar_ps(index, scale16[j]);
      }
      for (int i = 0; i < MT; ++i) {
        const int64_t r = m0 + i;
        const __m512i q = _mm512_loadu_si512(a.q.data() + r * a.padded_k + c * kChunk);
        const __m512 d = _mm512_loadu_ps(a.d_lanes.data() + r * chunk_lanes + c * 16);
        for (int j = 0; j < NR; ++j) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[j], q);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale[j], d),
                                      acc[i][j]);
        }
      }
    }
    // The mins' part of the group's 16 blocks: lanes of acc are summed at the end anyway.
    for (int j = 0; j < NR; ++j) {
      const __m512 mn = wm[j] == nullptr
                            ? _mm512_mul_ps(scale16[j], _mm512_set1_ps(-128.f))
                            : _mm512_maskz_loadu_ps(mask, wm[j] + first_block);
      for (int i = 0; i < MT; ++i) {
        const __m512 ds = _mm512_maskz_loadu_ps(mask, a.ds.data() + (m0 + i) * a.blocks +
                                                          first_block);
        acc[i][j] = _mm512_fmadd_ps(mn, ds, acc[i][j]);
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
         __builtin_cpu_supports("avx512vnni");
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
  quantize_rows<T>(x.data_ptr<T>(), m, k, mt, a);
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
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.sizes() == at::IntArrayRef({n, blocks}),
              "q8_linear: float32 scale [out, padded in / 32]");
  Weights w{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), nullptr, n, padded_k, blocks,
            bits};
  if (min.has_value()) {
    TORCH_CHECK(min->scalar_type() == at::kFloat && min->is_contiguous() &&
                    min->sizes() == scale.sizes(), "q8_linear: min like scale");
    w.min = min->data_ptr<float>();
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

// Select the path ("auto": the best the CPU has, "portable", "avx512_vnni"); returns the one that
// will run. For tests and benchmarks that compare the paths.
std::string quant_isa(const std::string& which) {
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
