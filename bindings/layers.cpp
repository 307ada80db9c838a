// Bindings of the native encoder / decoder layers (ddetr/layers.h). Python
// (python/ddetr/ops/native_layers.py) hands over the sizes, the level table, the
// options and lists of raw pointers in the order of the structs below (0 = none).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "ddetr/layers.h"

namespace py = pybind11;

namespace ddetr {
namespace {

using namespace bind;
using Dims = std::array<int64_t, 5>;                // N, Lq, C, F, ref_dim
using Options = std::tuple<bool, bool, double, uint64_t>;  // training, recompute, p, seed
using Pointers = std::vector<uintptr_t>;

LayerShape layer_shape(bool decoder, const Dims& dims, const Sizes& sizes,
                       const Levels& levels) {
  LayerShape s;
  s.decoder = decoder;
  s.N = dims[0];
  s.Lq = dims[1];
  s.C = dims[2];
  s.F = dims[3];
  s.ref_dim = dims[4];
  s.msda = make_shape(sizes, levels);
  validate(s);
  return s;
}

LayerOptions layer_options(const Options& o) {
  LayerOptions r;
  r.training = std::get<0>(o);
  r.recompute = std::get<1>(o);
  const double p = std::get<2>(o);
  if (!(p >= 0.0 && p <= 1.0))
    throw std::invalid_argument("dropout: expected a probability in [0, 1], got " +
                                std::to_string(p));
  r.p = float(p);
  r.seed = std::get<3>(o);
  return r;
}

// `ptrs` must hold exactly `n` pointers; returns them as void pointers.
std::vector<void*> pointers(const Pointers& ptrs, size_t n, const char* name) {
  if (ptrs.size() != n)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) +
                                " pointers, got " + std::to_string(ptrs.size()));
  std::vector<void*> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = reinterpret_cast<void*>(ptrs[i]);
  return out;
}

// The 20 parameters in LayerWeights order; the decoder's first 6 are required for a
// decoder, everything else always.
template <class P> P param_struct(const Pointers& ptrs, bool decoder, const char* name) {
  auto v = pointers(ptrs, P::kCount, name);
  P p;
  auto f = p.fields();
  for (int i = 0; i < P::kCount; ++i) {
    if (i >= (decoder ? 0 : 6))
      require(ptrs[i], true, (std::string(name) + "[" + std::to_string(i) + "]").c_str());
    *f[i] = v[i];
  }
  return p;
}

LayerInputs<void> input_struct(const Pointers& ptrs, bool decoder) {
  auto v = pointers(ptrs, 5, "inputs");
  require(ptrs[0], true, "x");
  require(ptrs[2], true, "reference_points");
  require(ptrs[3], decoder, "memory");
  return {v[0], v[1], v[2], v[3], static_cast<const uint8_t*>(v[4])};
}

LayerSaved<void> saved_struct(const Pointers& ptrs) {
  auto v = pointers(ptrs, kLayerSavedCount, "saved");
  LayerSaved<void> saved;
  const auto f = saved.fields();
  for (int i = 0; i < kLayerSavedCount; ++i) *f[i] = v[i];
  return saved;
}

// float32, float64 or bfloat16 (float16 has no native layer), on either device
template <class Cpu, class Cuda>
void on_layer_device(const std::string& dtype, const std::string& device, Cpu&& cpu,
                     Cuda&& cuda) {
  if (dtype == "float16")
    throw std::invalid_argument("the native layers take float32, float64 or bfloat16, got " +
                                dtype);
  on_device(dtype, device, cpu, cuda);
}

std::vector<int64_t> saved_sizes(bool decoder, const Dims& dims, const Sizes& sizes,
                                 const Levels& levels, const Options& options) {
  std::vector<int64_t> out(kLayerSavedCount);
  layer_saved_sizes(layer_shape(decoder, dims, sizes, levels), layer_options(options),
                    out.data());
  return out;
}

size_t workspace_bytes(const std::string& dtype, const std::string& device, int device_index,
                       bool decoder, const Dims& dims, const Sizes& sizes, const Levels& levels,
                       const Options& options, bool backward, bool deterministic) {
  const LayerShape s = layer_shape(decoder, dims, sizes, levels);
  const LayerOptions o = layer_options(options);
  const int elem = dtype == "float64" ? 8 : dtype == "bfloat16" ? 2 : 4;
  size_t bytes = 0;
  on_layer_device(
      dtype, device,
      [&](auto) { bytes = layer_workspace_bytes_cpu(s, o, backward, elem); },
      [&](auto) {
        bytes = layer_workspace_bytes_cuda(s, o, backward, elem, deterministic, device_index);
      });
  return bytes;
}

void forward(const std::string& dtype, const std::string& device, int device_index,
             bool decoder, const Dims& dims, const Sizes& sizes, const Levels& levels,
             const Options& options, const Pointers& params, const Pointers& inputs,
             uintptr_t out, const Pointers& saved, uintptr_t workspace, size_t workspace_size,
             bool deterministic, int num_threads, uintptr_t stream) {
  const LayerShape s = layer_shape(decoder, dims, sizes, levels);
  const LayerOptions o = layer_options(options);
  const auto w = param_struct<LayerParams<void>>(params, decoder, "params");
  const LayerInputs<void> in = input_struct(inputs, decoder);
  const LayerSaved<void> sv = saved_struct(saved);
  require(out, true, "out");
  require(workspace, workspace_size > 0, "workspace");
  py::gil_scoped_release unlocked;
  on_layer_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        layer_forward_cpu<T>(s, o, typed<T>(w), typed<T>(in), static_cast<T*>(as<void>(out)),
                             typed<T>(sv), as<void>(workspace), workspace_size, num_threads);
      },
      [&](auto dt) {
        layer_forward_cuda(dt, s, o, w, in, as<void>(out), sv, as<void>(workspace),
                           workspace_size, deterministic, device_index, stream);
      });
}

void backward(const std::string& dtype, const std::string& device, int device_index,
              bool decoder, const Dims& dims, const Sizes& sizes, const Levels& levels,
              const Options& options, const Pointers& params, const Pointers& inputs,
              const Pointers& saved, uintptr_t grad_out, const Pointers& grad_inputs,
              const Pointers& grad_params, uintptr_t workspace, size_t workspace_size,
              bool deterministic, int num_threads, uintptr_t stream) {
  const LayerShape s = layer_shape(decoder, dims, sizes, levels);
  const LayerOptions o = layer_options(options);
  const auto w = param_struct<LayerParams<void>>(params, decoder, "params");
  const auto gw = param_struct<LayerParamGrads<void>>(grad_params, decoder, "grad_params");
  const LayerInputs<void> in = input_struct(inputs, decoder);
  const LayerSaved<void> sv = saved_struct(saved);
  auto gv = pointers(grad_inputs, 4, "grad_inputs");
  require(grad_out, true, "grad_out");
  require(grad_inputs[0], true, "grad_inputs[0] (x)");
  require(workspace, workspace_size > 0, "workspace");
  const LayerInputGrads<void> gi{gv[0], gv[1], gv[2], gv[3]};
  py::gil_scoped_release unlocked;
  on_layer_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        layer_backward_cpu<T>(s, o, typed<T>(w), typed<T>(in), typed<T>(sv),
                              static_cast<const T*>(as<const void>(grad_out)), typed<T>(gi),
                              typed<T>(gw), as<void>(workspace), workspace_size, num_threads);
      },
      [&](auto dt) {
        layer_backward_cuda(dt, s, o, w, in, sv, as<const void>(grad_out), gi, gw,
                            as<void>(workspace), workspace_size, deterministic, device_index,
                            stream);
      });
}

bool cublas_ready() {
#ifdef DDETR_WITH_CUDA
  return cublas_loaded();
#else
  return false;
#endif
}

void open_cublas(const std::string& path) {
#ifdef DDETR_WITH_CUDA
  load_cublas(path.c_str());
#else
  (void)path;
  no_cuda();
#endif
}

}  // namespace

void bind_layers(py::module_& m) {
  m.def("layer_saved_sizes", &saved_sizes);
  m.def("layer_workspace_bytes", &workspace_bytes);
  m.def("layer_forward", &forward);
  m.def("layer_backward", &backward);
  m.def("load_cublas", &open_cublas);
  m.def("cublas_loaded", &cublas_ready);
}

}  // namespace ddetr
