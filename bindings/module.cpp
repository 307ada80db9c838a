// The pybind11 module ddetr._C: unpacks what python/ddetr/ops/_native.py hands over
// (raw pointers, sizes, the level table), re-checks it, dispatches on dtype and
// device, and releases the GIL around the kernels. Nothing else lives here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ddetr/msda.h"

namespace py = pybind11;

namespace ddetr {
namespace {

using Sizes = std::array<int64_t, 7>;  // N, S, M, D, Lq, L, P
using Levels = std::vector<std::array<int64_t, 3>>;  // (H, W, start) per level

MsdaShape make_shape(const Sizes& sz, const Levels& levels) {
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
  if (dtype == "float32") fn(Tag<float>{});
  else if (dtype == "float64") fn(Tag<double>{});
  else if (dtype == "bfloat16") fn(Tag<bf16>{});
  else
    throw std::invalid_argument("the CPU kernels take float32, float64 or bfloat16, got " +
                                dtype);
}

#ifdef DDETR_WITH_CUDA
DType cuda_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::f32;
  if (dtype == "float64") return DType::f64;
  if (dtype == "float16") return DType::f16;
  if (dtype == "bfloat16") return DType::bf16;
  throw std::invalid_argument(
      "the CUDA kernels take float32, float64, float16 or bfloat16, got " + dtype);
}
#else
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "ddetr was built without CUDA, so it cannot run on CUDA tensors. Rebuild with a CUDA "
      "toolkit on PATH: pip install . --config-settings=cmake.define.DDETR_CUDA=ON");
}
#endif

void require(uintptr_t ptr, bool needed, const char* name) {
  if (needed && ptr == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
}

template <class T> T* as(uintptr_t p) { return reinterpret_cast<T*>(p); }

void forward(const std::string& dtype, const std::string& device, int device_index,
             const Sizes& sizes, const Levels& levels, uintptr_t value, uintptr_t loc,
             uintptr_t attn, uintptr_t out, int num_threads, uintptr_t stream) {
  const MsdaShape s = make_shape(sizes, levels);
  const bool work = s.N * s.Lq * s.M * s.D > 0;
  require(out, work, "output");
  require(value, work && s.S > 0, "value");
  require(loc, work && s.L * s.P > 0, "sampling_locations");
  require(attn, work && s.L * s.P > 0, "attention_weights");
  py::gil_scoped_release unlocked;
  if (device == "cpu") {
    dispatch_cpu(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = Acc<T>;
      msda_forward_cpu<T>(s, as<const T>(value), as<const A>(loc), as<const A>(attn),
                          as<T>(out), num_threads);
    });
  } else if (device == "cuda") {
#ifdef DDETR_WITH_CUDA
    msda_forward_cuda(cuda_dtype(dtype), s, as<const void>(value), as<const void>(loc),
                      as<const void>(attn), as<void>(out), device_index, stream);
#else
    (void)device_index; (void)stream;
    no_cuda();
#endif
  } else {
    throw std::invalid_argument("unsupported device type " + device);
  }
}

size_t workspace_bytes(const std::string& device, int device_index, const Sizes& sizes,
                       const Levels& levels, bool deterministic) {
  const MsdaShape s = make_shape(sizes, levels);
  if (device != "cuda") return 0;
#ifdef DDETR_WITH_CUDA
  return msda_backward_workspace_bytes_cuda(s, deterministic, device_index);
#else
  (void)deterministic; (void)device_index;
  no_cuda();
#endif
}

void backward(const std::string& dtype, const std::string& device, int device_index,
              const Sizes& sizes, const Levels& levels, uintptr_t value, uintptr_t loc,
              uintptr_t attn, uintptr_t grad_out, uintptr_t grad_value, uintptr_t grad_loc,
              uintptr_t grad_attn, uintptr_t workspace, size_t workspace_size,
              bool deterministic, int num_threads, uintptr_t stream) {
  const MsdaShape s = make_shape(sizes, levels);
  const bool work = s.N * s.Lq * s.M > 0 && s.L * s.P > 0;
  require(grad_out, work && s.D > 0, "grad_output");
  require(value, work && s.S * s.D > 0, "value");
  require(grad_value, work && s.S * s.D > 0, "grad_value");
  require(loc, work, "sampling_locations");
  require(attn, work, "attention_weights");
  require(grad_loc, work, "grad_sampling_locations");
  require(grad_attn, work, "grad_attention_weights");
  py::gil_scoped_release unlocked;
  if (device == "cpu") {
    dispatch_cpu(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = Acc<T>;
      msda_backward_cpu<T>(s, as<const T>(value), as<const A>(loc), as<const A>(attn),
                           as<const T>(grad_out), as<A>(grad_value), as<A>(grad_loc),
                           as<A>(grad_attn), num_threads);
    });
  } else if (device == "cuda") {
#ifdef DDETR_WITH_CUDA
    msda_backward_cuda(cuda_dtype(dtype), s, as<const void>(value), as<const void>(loc),
                       as<const void>(attn), as<const void>(grad_out), as<void>(grad_value),
                       as<void>(grad_loc), as<void>(grad_attn), as<void>(workspace),
                       workspace_size, deterministic, device_index, stream);
#else
    (void)device_index; (void)stream; (void)workspace; (void)workspace_size;
    (void)deterministic;
    no_cuda();
#endif
  } else {
    throw std::invalid_argument("unsupported device type " + device);
  }
}

py::dict build_info() {
  py::dict info;
  info["version"] = DDETR_VERSION;
#ifdef DDETR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = DDETR_CUDA_ARCHS;
  info["cuda_version"] = DDETR_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_version"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  info["cpu_arch_flags"] = DDETR_CPU_ARCH_FLAGS;
  info["max_levels"] = kMaxLevels;
  return info;
}

}  // namespace
}  // namespace ddetr

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddetr native core (CPU kernels, CUDA kernels when built with CUDA)";
  m.def("build_info", &ddetr::build_info);
  m.def("msda_forward", &ddetr::forward);
  m.def("msda_backward", &ddetr::backward);
  m.def("msda_backward_workspace_bytes", &ddetr::workspace_bytes);
}
