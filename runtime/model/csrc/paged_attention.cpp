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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "to_float.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using scalesim::to_float;

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
// unroll into registers; D == 0: any head dimension, read at run time.
template <typename T, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
            const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
            at::Tensor& out, double scale) {
  const int64_t rows = q.size(0), heads = q.size(1), d = D > 0 ? D : q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2);
  const int64_t group = heads / kv_heads, width = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* seq = row_seq.data_ptr<int32_t>();
  const int32_t* keys = row_keys.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const float s = static_cast<float>(scale);
  const int64_t token_stride = kv_heads * d;

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
        for (int64_t o = 0; o < count; ++o) {
          const T* krow = kp + base + o * token_stride;
          for (int64_t kh = 0; kh < kv_heads; ++kh) {
            float dot[64];
            dots<T, D>(qf.data() + kh * group * d, krow + kh * d, group, d, dot);
            for (int64_t g = 0; g < group; ++g) sc[(kh * group + g) * block_size + o] = dot[g];
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
        for (int64_t o = 0; o < count; ++o) {
          const T* vrow = vp + base + o * token_stride;
          for (int64_t kh = 0; kh < kv_heads; ++kh) {
            float vf[256];
            for (int64_t x = 0; x < d; ++x) vf[x] = to_float(vrow[kh * d + x]);
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

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& tables, const at::Tensor& row_seq,
                           const at::Tensor& row_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_attention: q [rows, heads, d], pools [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3) && q.size(2) <= 256 &&
                  q.size(1) / k_pool.size(2) <= 64,
              "paged_attention: heads a multiple of kv_heads (at most 64 per group), equal head "
              "dims of at most 256");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous(), "paged_attention: contiguous pools of q's dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && row_seq.scalar_type() == at::kInt &&
                  row_keys.scalar_type() == at::kInt, "paged_attention: int32 tables and rows");
  at::Tensor qc = q.contiguous(), tc = tables.contiguous();
  at::Tensor rs = row_seq.contiguous(), rk = row_keys.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged_attention: float32 or bfloat16, got ", q.scalar_type());
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t d = q.size(2);
  if (d == 64) {
    bf16 ? attend<at::BFloat16, 64>(qc, k_pool, v_pool, tc, rs, rk, out, scale)
         : attend<float, 64>(qc, k_pool, v_pool, tc, rs, rk, out, scale);
  } else if (d == 128) {
    bf16 ? attend<at::BFloat16, 128>(qc, k_pool, v_pool, tc, rs, rk, out, scale)
         : attend<float, 128>(qc, k_pool, v_pool, tc, rs, rk, out, scale);
  } else {
    bf16 ? attend<at::BFloat16, 0>(qc, k_pool, v_pool, tc, rs, rk, out, scale)
         : attend<float, 0>(qc, k_pool, v_pool, tc, rs, rk, out, scale);
  }
  return out.view({q.size(0), q.size(1) * q.size(2)});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor row_seq, "
        "Tensor row_keys, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
