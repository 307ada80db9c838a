// Element types and their float conversions, usable from host and device code.
//
// Storage types: float, double, bf16 (CPU and CUDA) and __half (CUDA only, see
// cuda/). Arithmetic always happens in the accumulation type Acc<T>: double for
// double, float for everything else.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DDETR_HD __host__ __device__ __forceinline__
#else
#define DDETR_HD inline
#endif

namespace ddetr {

// bfloat16 as 16 raw bits: the upper half of an IEEE float32. Defined here rather
// than taken from a framework so the CPU core stays framework-free; the CUDA code
// uses the same struct (bit operations only), so one layout serves both.
struct bf16 {
  uint16_t bits;
};

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <> struct AccOf<void> { using type = void; };  // untyped pointer structs
template <class T> using Acc = typename AccOf<T>::type;

DDETR_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DDETR_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DDETR_HD float to_acc(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
DDETR_HD float to_acc(float x) { return x; }
DDETR_HD double to_acc(double x) { return x; }

// Round to nearest even, NaN kept quiet (what torch does for float -> bfloat16).
DDETR_HD bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <class T> DDETR_HD T from_acc(Acc<T> x);
template <> DDETR_HD float from_acc<float>(float x) { return x; }
template <> DDETR_HD double from_acc<double>(double x) { return x; }
template <> DDETR_HD bf16 from_acc<bf16>(float x) { return to_bf16(x); }

}  // namespace ddetr
