// Helpers shared by the binding files: the MSDA shape from Python's sizes and level
// table, the one dtype/device dispatch, pointer casts and null checks.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ddetr/msda.h"

namespace ddetr {
namespace bind {

using Sizes = std::array<int64_t, 7>;  // N, S, M, D, Lq, L, P
using Levels = std::vector<std::array<int64_t, 3>>;  // (H, W, start) per level

inline MsdaShape make_shape(const Sizes& sz, const Levels& levels) {
  MsdaShape s;
  s.N = sz[0]; s.S = sz[1]; s.M = sz[2]; s.D = sz[3]; s.Lq = sz[4]; s.L = sz[5]; s.P = sz[6];
  if (int64_t(levels.size()) != s.L)
    throw std::invalid_argument("level table has " + std::to_string(levels.size()) +
                                " entries but L = " + std::to_string(s.L));
  if (s.L > kMaxLevels)
    throw std::invalid_argument("at most " + std::to_string(kMaxLevels) +
                                " levels are supported, got " + std::to_string(s.L));
  for (int64_t l = 0; l < s.L; ++l) {
    s.level_h[l] = levels[l][0];
    s.level_w[l] = levels[l][1];
    s.level_start[l] = levels[l][2];
  }
  validate(s);
  return s;
}

template <class T> struct Tag { using type = T; };

// The one dtype dispatch of the CPU entry points.
template <class Fn> void dispatch_cpu(const std::string& dtype, Fn&& fn) {
  if (dtype == "float32") return fn(Tag<float>{});
  if (dtype == "float64") return fn(Tag<double>{});
  if (dtype == "bfloat16") return fn(Tag<bf16>{});
  throw std::invalid_argument("the CPU kernels take float32, float64 or bfloat16, got " + dtype);
}

inline DType cuda_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::f32;
  if (dtype == "float64") return DType::f64;
  if (dtype == "float16") return DType::f16;
  if (dtype == "bfloat16") return DType::bf16;
  throw std::invalid_argument(
      "the CUDA kernels take float32, float64, float16 or bfloat16, got " + dtype);
}
#ifndef DDETR_WITH_CUDA
[[noreturn]] inline void no_cuda() {
  throw std::runtime_error(
      "ddetr was built without CUDA, so it cannot run on CUDA tensors. Rebuild with a CUDA "
      "toolkit on PATH: pip install . --config-settings=cmake.define.DDETR_CUDA=ON");
}
#endif

// Runs `cpu(Tag<T>{})` with the CPU element type of `dtype`, or `cuda(DType)` on CUDA:
// the one place that dispatches on device and dtype, and knows a build may lack CUDA.
// `cuda` is a generic lambda, so without CUDA its body (which names the CUDA launchers)
// is never instantiated and nothing undefined is linked.
template <class Cpu, class Cuda>
void on_device(const std::string& dtype, const std::string& device, Cpu&& cpu, Cuda&& cuda) {
  if (device == "cpu") return dispatch_cpu(dtype, cpu);
  if (device == "cuda") {
#ifdef DDETR_WITH_CUDA
    return cuda(cuda_dtype(dtype));
#else
    (void)cuda;
    no_cuda();
#endif
  }
  throw std::invalid_argument("unsupported device type " + device);
}

inline void require(uintptr_t ptr, bool needed, const char* name) {
  if (needed && ptr == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
}

template <class T> T* as(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace bind
}  // namespace ddetr
