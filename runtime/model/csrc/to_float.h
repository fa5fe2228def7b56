// Reading float32, bfloat16 and int8 (codes of a quantized KV row) elements as float32, for the kernels in this folder.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace scalesim {

inline float to_float(float x) { return x; }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(at::BFloat16 x) {
  // bfloat16 is the top half of a float32: a shift, which the compiler vectorizes.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace scalesim
