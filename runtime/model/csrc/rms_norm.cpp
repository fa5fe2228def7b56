// RMSNorm fused with the residual add that precedes it in a pre-norm decoder layer, and the
// SwiGLU activation of a fused gate/up projection (CPU).
//
// add_rms_norm(x, residual, weight, eps): x += residual in place, then returns
// weight * x / sqrt(mean(x^2) + eps), row by row; rms_norm is the same without the add. One pass
// over each row instead of the five to seven kernels the composite takes, which is what a decode
// step of a small model pays for: per row the work is a few hundred elements, the dispatch of an
// op some microseconds. Statistics are accumulated in float32 whatever the dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "to_float.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using scalesim::to_float;

template <typename T>
void norm_rows(T* x, const T* residual, const T* weight, T* out, int64_t rows, int64_t h,
               float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * h;
      float squares = 0.f;
      if (residual != nullptr) {
        const T* rr = residual + r * h;
        // The sum is stored in x's dtype first, as the unfused add would store it; the
        // statistics are taken from what was stored.
        for (int64_t i = 0; i < h; ++i) xr[i] = static_cast<T>(to_float(xr[i]) + to_float(rr[i]));
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < h; ++i) squares += to_float(xr[i]) * to_float(xr[i]);
      } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < h; ++i) squares += to_float(xr[i]) * to_float(xr[i]);
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + eps);
      T* o = out + r * h;
      // As transformers computes it: the normalized row rounded to the dtype, then scaled.
      for (int64_t i = 0; i < h; ++i)
        o[i] = static_cast<T>(to_float(weight[i]) * to_float(static_cast<T>(to_float(xr[i]) * inv)));
    }
  });
}

at::Tensor norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "rms_norm: contiguous x [rows, hidden] and weight [hidden]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: float32 or bfloat16 x and weight of one dtype");
  at::Tensor r;
  if (residual.has_value()) {
    r = residual->contiguous();
    TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x");
  }
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x.data_ptr<float>(), r.defined() ? r.data_ptr<float>() : nullptr,
                     w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), e);
  } else {
    norm_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(),
                            r.defined() ? r.data_ptr<at::BFloat16>() : nullptr,
                            w.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), x.size(0),
                            x.size(1), e);
  }
  return out;
}

at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  return norm(x, residual, weight, eps);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm(x.contiguous(), c10::nullopt, weight, eps);
}

// silu_mul(gate_up [rows, 2 i]) -> silu(gate) * up [rows, i]: the SwiGLU of a fused gate/up
// projection in one pass.
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        // Each product rounded as the unfused ops round it: silu in the dtype, then the product.
        const float a = to_float(g[i]);
        const float silu = to_float(static_cast<T>(a / (1.f + std::exp(-a))));
        o[i] = static_cast<T>(silu * to_float(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 &&
                  (gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16),
              "silu_mul: gate_up [rows, 2 intermediate] of float32 or bfloat16");
  at::Tensor gu = gate_up.contiguous();
  const int64_t inter = gu.size(1) / 2;
  at::Tensor out = at::empty({gu.size(0), inter}, gu.options());
  if (gu.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gu.data_ptr<float>(), out.data_ptr<float>(), gu.size(0), inter);
  } else {
    silu_mul_rows<at::BFloat16>(gu.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                                gu.size(0), inter);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
  m.def("add_rms_norm(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
}
