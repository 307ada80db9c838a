// What the binding files share: NamedStruct (a C++ struct Python builds by field name),
// the structs every family's call carries (Device, Level), the MSDA shape of a call, the
// one dtype / device dispatch, pointer casts and null checks.
//
// The boundary has names: every entry point takes one struct whose fields Python sets
// by name (python/ddetr/_native/ builds them), pointers as integers (0 = none).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ddetr/msda.h"

namespace ddetr {
namespace bind {

namespace py = pybind11;

// Binds T as a Python class built by name: T(field=value, ...) sets those fields and
// leaves the others at their defaults; a positional argument is a TypeError, an unknown
// field name a TypeError naming it, a value of the wrong type a TypeError naming the
// field. Fields stay readable and writable as attributes; the class attribute `fields`
// lists them in declaration order, and repr() shows them all.
template <class T> class NamedStruct {
 public:
  NamedStruct(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc), setters_(std::make_shared<Setters>()) {
    const std::string type_name = name;
    cls_.def(py::init([setters = setters_, type_name](const py::kwargs& fields) {
      T t;
      for (auto item : fields) {
        Py_ssize_t size = 0;
        const char* key = PyUnicode_AsUTF8AndSize(item.first.ptr(), &size);
        if (key == nullptr) throw py::error_already_set();
        const auto found = setters->find(std::string_view(key, size_t(size)));
        if (found == setters->end())
          throw py::type_error(type_name + " has no field " + std::string(key, size_t(size)));
        found->second(t, item.second, type_name);
      }
      return t;
    }));
    cls_.def("__repr__", [](py::handle self) {
      std::string out = py::str(py::type::handle_of(self).attr("__name__"));
      const char* sep = "(";
      for (auto field : py::type::handle_of(self).attr("fields")) {
        const std::string f = py::str(field);
        out += sep + f + "=" + std::string(py::repr(self.attr(field)));
        sep = ", ";
      }
      return out + ")";
    });
    cls_.attr("fields") = py::tuple();
  }

  template <class F> NamedStruct& field(const char* name, F T::*member, const char* doc) {
    cls_.def_readwrite(name, member, doc);
    (*setters_)[name] = [member, name](T& t, py::handle value, const std::string& type_name) {
      try {
        t.*member = value.cast<F>();
      } catch (const py::cast_error&) {
        throw py::type_error(type_name + "." + name + ": cannot take a " +
                             std::string(py::str(py::type::handle_of(value).attr("__name__"))));
      }
    };
    names_.push_back(name);
    cls_.attr("fields") = py::tuple(py::cast(names_));
    return *this;
  }

 private:
  using Setter = std::function<void(T&, py::handle, const std::string&)>;
  using Setters = std::map<std::string, Setter, std::less<>>;  // found by string_view
  py::class_<T> cls_;
  std::shared_ptr<Setters> setters_;
  std::vector<std::string> names_;
};

// Where a call runs.
struct Device {
  std::string kind;      // "cpu" or "cuda"
  int index = -1;        // CUDA device index the pointers live on (-1 on the CPU)
  uintptr_t stream = 0;  // torch's current cudaStream_t on that device (0 on the CPU)
  int threads = 0;       // CPU threads of the kernels (torch.get_num_threads())
};

// One level of the multi-scale value map: H x W pixels from row `start` of S.
struct Level {
  int64_t H = 0, W = 0, start = 0;
};

// Registers Device and Level (bindings/common.cpp).
void bind_common(py::module_& m);

// The families (one binding file each).
void bind_msda(py::module_& m);     // bindings/msda.cpp
void bind_flatten(py::module_& m);  // bindings/flatten.cpp
void bind_gemm(py::module_& m);     // bindings/gemm.cpp
void bind_dropout(py::module_& m);  // bindings/dropout.cpp
void bind_layers(py::module_& m);   // bindings/layers.cpp

// The MSDA shape of any call with the fields N, S, M, D, Lq, L, P and levels (an MSDA
// call, a layer call), checked (validate: ValueError naming the inconsistent size).
template <class Call> MsdaShape msda_shape(const Call& c) {
  MsdaShape s;
  s.N = c.N; s.S = c.S; s.M = c.M; s.D = c.D; s.Lq = c.Lq; s.L = c.L; s.P = c.P;
  if (int64_t(c.levels.size()) != s.L)
    throw std::invalid_argument("level table has " + std::to_string(c.levels.size()) +
                                " entries but L = " + std::to_string(s.L));
  if (s.L > kMaxLevels)
    throw std::invalid_argument("at most " + std::to_string(kMaxLevels) +
                                " levels are supported, got " + std::to_string(s.L));
  for (int64_t l = 0; l < s.L; ++l) {
    s.level_h[l] = c.levels[l].H;
    s.level_w[l] = c.levels[l].W;
    s.level_start[l] = c.levels[l].start;
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
void on_device(const std::string& dtype, const Device& device, Cpu&& cpu, Cuda&& cuda) {
  if (device.kind == "cpu") return dispatch_cpu(dtype, cpu);
  if (device.kind == "cuda") {
#ifdef DDETR_WITH_CUDA
    return cuda(cuda_dtype(dtype));
#else
    (void)cuda;
    no_cuda();
#endif
  }
  throw std::invalid_argument("unsupported device type " + device.kind);
}

inline void require(uintptr_t ptr, bool needed, const std::string& name) {
  if (needed && ptr == 0) throw std::invalid_argument(name + " is a null pointer");
}

template <class T> T* as(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace bind
}  // namespace ddetr
