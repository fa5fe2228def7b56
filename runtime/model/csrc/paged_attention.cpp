// Attention of ragged query rows over the paged KV pool, read in place (CPU).
//
// Row r of `q [rows, heads, d]` belongs to sequence `row_seq[r]` and attends to that sequence's
// first `row_keys[r]` positions, found through its block table `tables[seq]` in the pools
// `[blocks, block_size, kv_heads, d]` (the layout of runtime/kv_cache.py). A decode is one row
// with every key; the tokens of a short chunk are rows with growing key counts (causal). Nothing
// is gathered: each (row, kv head) task streams its keys and values once from the pool, which is
// what a decode step is bound by. Work is split over rows x kv heads with ATen's thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  // bfloat16 is the top half of a float32: a shift, which the compiler vectorizes.
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(at::BFloat16* p, int64_t i, float x) { p[i] = at::BFloat16(x); }

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
            const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
            at::Tensor& out, double scale) {
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
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

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kh = task % kv_heads;
      const int64_t n = keys[r];
      const int32_t* table = tp + static_cast<int64_t>(seq[r]) * width;
      for (int64_t j = 0; j < group; ++j)
        for (int64_t x = 0; x < d; ++x)
          qf[j * d + x] = load(qp, (r * heads + kh * group + j) * d + x) * s;
      scores.resize(group * n);
      // Block by block: the slot of a key is its block's base plus an offset, no division.
      for (int64_t first = 0, b = 0; first < n; first += block_size, ++b) {
        const int64_t count = std::min(block_size, n - first);
        const T* block = kp + static_cast<int64_t>(table[b]) * block_size * token_stride + kh * d;
        for (int64_t o = 0; o < count; ++o) {
          const T* k = block + o * token_stride;
          for (int64_t j = 0; j < group; ++j) {
            const float* qj = qf.data() + j * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t x = 0; x < d; ++x) dot += qj[x] * load(k, x);
            scores[j * n + first + o] = dot;
          }
        }
      }
      std::vector<float> total(group);
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores.data() + j * n;
        float top = -INFINITY;
        for (int64_t t = 0; t < n; ++t) top = std::max(top, sj[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = std::exp(sj[t] - top);
          sum += sj[t];
        }
        total[j] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0, b = 0; first < n; first += block_size, ++b) {
        const int64_t count = std::min(block_size, n - first);
        const T* block = vp + static_cast<int64_t>(table[b]) * block_size * token_stride + kh * d;
        for (int64_t o = 0; o < count; ++o) {
          const T* v = block + o * token_stride;
          for (int64_t j = 0; j < group; ++j) {
            const float p = scores[j * n + first + o];
            float* aj = acc.data() + j * d;
#pragma omp simd
            for (int64_t x = 0; x < d; ++x) aj[x] += p * load(v, x);
          }
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        const float inv = 1.f / total[j];
        for (int64_t x = 0; x < d; ++x)
          store(op, (r * heads + kh * group + j) * d + x, acc[j * d + x] * inv);
      }
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& tables, const at::Tensor& row_seq,
                           const at::Tensor& row_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_attention: q [rows, heads, d], pools [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3),
              "paged_attention: heads must be a multiple of kv_heads, head dims equal");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous(), "paged_attention: contiguous pools of q's dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && row_seq.scalar_type() == at::kInt &&
                  row_keys.scalar_type() == at::kInt, "paged_attention: int32 tables and rows");
  at::Tensor qc = q.contiguous(), tc = tables.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    attend<float>(qc, k_pool, v_pool, tc, row_seq.contiguous(), row_keys.contiguous(), out, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    attend<at::BFloat16>(qc, k_pool, v_pool, tc, row_seq.contiguous(), row_keys.contiguous(), out,
                         scale);
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16, got ", q.scalar_type());
  }
  return out.view({q.size(0), q.size(1) * q.size(2)});
}

}  // namespace

TORCH_LIBRARY(scalesim, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor row_seq, "
        "Tensor row_keys, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
