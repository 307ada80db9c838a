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

#include "ddetr/blas.h"
#include "ddetr/dropout.h"
#include "ddetr/flatten.h"
#include "ddetr/msda.h"
#include "common.h"

#ifdef DDETR_WITH_CUDA
#include "../cuda/runtime_status.h"
#endif

namespace py = pybind11;

namespace ddetr {

void bind_layers(pybind11::module_& m);  // bindings/layers.cpp

namespace {

using namespace bind;

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
  on_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        using A = Acc<T>;
        msda_forward_cpu<T>(s, as<const T>(value), as<const A>(loc), as<const A>(attn),
                            as<T>(out), num_threads);
      },
      [&](auto dt) {
        msda_forward_cuda(dt, s, as<const void>(value), as<const void>(loc),
                          as<const void>(attn), as<void>(out), device_index, stream);
      });
}

size_t workspace_bytes(const std::string& device, int device_index, const Sizes& sizes,
                       const Levels& levels, bool deterministic) {
  const MsdaShape s = make_shape(sizes, levels);
  if (device != "cuda") return 0;
#ifdef DDETR_WITH_CUDA
  return msda_backward_workspace_bytes_cuda(s, deterministic, device_index);
#else
  (void)s; (void)deterministic; (void)device_index;
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
  on_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        using A = Acc<T>;
        msda_backward_cpu<T>(s, as<const T>(value), as<const A>(loc), as<const A>(attn),
                             as<const T>(grad_out), as<A>(grad_value), as<A>(grad_loc),
                             as<A>(grad_attn), num_threads);
      },
      [&](auto dt) {
        msda_backward_cuda(dt, s, as<const void>(value), as<const void>(loc),
                           as<const void>(attn), as<const void>(grad_out), as<void>(grad_value),
                           as<void>(grad_loc), as<void>(grad_attn), as<void>(workspace),
                           workspace_size, deterministic, device_index, stream);
      });
}

// ---------------------------------------------------------------------------
// CPU GEMM (ddetr/blas.h): float32 / float64 through the run-time loaded OpenBLAS;
// bfloat16 A, B and bias with C in `c_dtype` (bfloat16 or float32), which needs a
// workspace of gemm_workspace_bytes("bfloat16") bytes, and `kernel` "auto", "avx512"
// or "widen" (Bf16GemmKernel).

size_t gemm_workspace_bytes(const std::string& dtype) {
  if (dtype == "bfloat16") return kGemmBf16ScratchBytes;
  if (dtype == "float32" || dtype == "float64") return 0;
  throw std::invalid_argument("gemm takes float32, float64 or bfloat16, got " + dtype);
}

Bf16GemmKernel bf16_kernel(const std::string& name) {
  if (name == "auto") return Bf16GemmKernel::automatic;
  if (name == "avx512") return Bf16GemmKernel::avx512;
  if (name == "widen") return Bf16GemmKernel::widen;
  throw std::invalid_argument("gemm: kernel must be auto, avx512 or widen, got " + name);
}

void cpu_gemm(const std::string& dtype, bool trans_a, bool trans_b, int64_t M, int64_t N,
              int64_t K, uintptr_t A, int64_t lda, uintptr_t B, int64_t ldb, double beta,
              uintptr_t C, int64_t ldc, uintptr_t bias, bool relu, int num_threads,
              const std::string& c_dtype, uintptr_t workspace, size_t workspace_size,
              const std::string& kernel) {
  const GemmArgs g = gemm_args(trans_a, trans_b, M, N, K, as<const void>(A), lda,
                               as<const void>(B), ldb, beta, as<void>(C), ldc,
                               as<const void>(bias), relu);
  const std::string c_type = c_dtype.empty() ? dtype : c_dtype;
  if (dtype == "bfloat16") {
    if (c_type != "bfloat16" && c_type != "float32")
      throw std::invalid_argument("gemm: bfloat16 operands take a bfloat16 or float32 C, got " +
                                  c_type);
    const Bf16GemmKernel k = bf16_kernel(kernel);
    const size_t needed = gemm_workspace_bytes(dtype);
    require(workspace, true, "workspace");
    if (workspace_size < needed)
      throw std::invalid_argument("workspace: " + std::to_string(workspace_size) +
                                  " bytes, the bfloat16 GEMM needs " + std::to_string(needed));
    if (workspace % 64 != 0) throw std::invalid_argument("workspace: not 64-byte aligned");
    py::gil_scoped_release unlocked;
    gemm_bf16(g, c_type == "float32", num_threads, as<float>(workspace), k);
    return;
  }
  if (dtype != "float32" && dtype != "float64")
    throw std::invalid_argument("gemm takes float32, float64 or bfloat16, got " + dtype);
  if (c_type != dtype)
    throw std::invalid_argument("gemm: " + dtype + " operands take a C of the same dtype, got " +
                                c_type);
  const DType t = dtype == "float32" ? DType::f32 : DType::f64;
  py::gil_scoped_release unlocked;
  gemm(t, g, num_threads);
}

std::string gemm_bf16_kernel() {
  return gemm_bf16_default_kernel() == Bf16GemmKernel::avx512 ? "avx512" : "widen";
}

// ---------------------------------------------------------------------------
// Dropout with regenerated masks (ddetr/dropout.h). Flat arrays of n elements.

DropoutArgs dropout_args(int64_t n, double p, uint64_t seed, uint64_t offset) {
  DropoutArgs a;
  a.n = n;
  a.p = float(p);
  a.seed = seed;
  a.offset = offset;
  validate_dropout(a);
  return a;
}

void dropout(const std::string& dtype, const std::string& device, int device_index, int64_t n,
             double p, uint64_t seed, uint64_t offset, bool relu, uintptr_t x, uintptr_t out,
             int num_threads, uintptr_t stream) {
  const DropoutArgs a = dropout_args(n, p, seed, offset);
  require(x, n > 0, "x");
  require(out, n > 0, "out");
  py::gil_scoped_release unlocked;
  on_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        dropout_cpu<T>(a, as<const T>(x), as<T>(out), relu, num_threads);
      },
      [&](auto dt) {
        dropout_cuda(dt, a, as<const void>(x), as<void>(out), relu, device_index,
                     stream);
      });
}

void relu_dropout_backward(const std::string& dtype, const std::string& device,
                           int device_index, int64_t n, double p, uintptr_t out,
                           uintptr_t grad_out, uintptr_t grad_x, int num_threads,
                           uintptr_t stream) {
  const DropoutArgs a = dropout_args(n, p, 0, 0);
  require(out, n > 0, "out");
  require(grad_out, n > 0, "grad_out");
  require(grad_x, n > 0, "grad_x");
  py::gil_scoped_release unlocked;
  on_device(
      dtype, device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        relu_dropout_backward_cpu<T>(a, as<const T>(out), as<const T>(grad_out),
                                     as<T>(grad_x), num_threads);
      },
      [&](auto dt) {
        relu_dropout_backward_cuda(dt, a, as<const void>(out),
                                   as<const void>(grad_out), as<void>(grad_x), device_index,
                                   stream);
      });
}

// ---------------------------------------------------------------------------
// Multi-scale flattening and the encoder reference points (ddetr/flatten.h).
// Lists of per-level tensors arrive as lists of pointers, one per level; the level
// table is the (H, W) of every level (the starts and S are derived natively).

using Pointers = std::vector<uintptr_t>;
using LevelSizes = std::vector<std::array<int64_t, 2>>;  // (H, W) per level

FlattenShape flatten_shape(int64_t N, int64_t C, const LevelSizes& levels) {
  if (int64_t(levels.size()) > kMaxLevels)
    throw std::invalid_argument("at most " + std::to_string(kMaxLevels) +
                                " levels are supported, got " + std::to_string(levels.size()));
  int64_t h[kMaxLevels] = {}, w[kMaxLevels] = {};
  for (size_t l = 0; l < levels.size(); ++l) {
    h[l] = levels[l][0];
    w[l] = levels[l][1];
  }
  return make_flatten_shape(N, C, int64_t(levels.size()), h, w);
}

// One pointer per level into `out`. An empty list (when `optional`) means "none";
// `needed`: the level tensors hold data, so a null pointer is an error.
template <class P>
void level_pointers(const Pointers& ptrs, const FlattenShape& s, bool optional, bool needed,
                    const std::string& name, P* out) {
  if (ptrs.empty() && optional) return;
  if (int64_t(ptrs.size()) != s.L)
    throw std::invalid_argument(name + ": " + std::to_string(ptrs.size()) +
                                " pointers for a pyramid of " + std::to_string(s.L) + " levels");
  for (int64_t l = 0; l < s.L; ++l) {
    require(ptrs[l], needed, (name + "[" + std::to_string(l) + "]").c_str());
    out[l] = reinterpret_cast<P>(ptrs[l]);
  }
}

void flatten_forward(const std::string& dtype, const std::string& device, int device_index,
                     int64_t N, int64_t C, const LevelSizes& levels, const Pointers& features,
                     const Pointers& masks, const Pointers& pos_embeds, uintptr_t level_embed,
                     uintptr_t src, uintptr_t pos, uintptr_t mask, uintptr_t valid_ratios,
                     int num_threads, uintptr_t stream) {
  const FlattenShape s = flatten_shape(N, C, levels);
  FlattenForwardArgs a;
  level_pointers(features, s, false, N * C > 0, "features", a.features);
  level_pointers(pos_embeds, s, false, N * C > 0, "pos_embeds", a.pos_embeds);
  level_pointers(masks, s, true, N > 0, "masks", a.masks);
  a.level_embed = as<const void>(level_embed);
  require(src, N * C > 0, "src");
  require(pos, N * C > 0, "pos");
  require(mask, N > 0, "mask");
  require(valid_ratios, N > 0, "valid_ratios");
  a.src = as<void>(src);
  a.pos = as<void>(pos);
  a.mask = as<uint8_t>(mask);
  a.valid_ratios = as<void>(valid_ratios);
  py::gil_scoped_release unlocked;
  on_device(
      dtype, device,
      [&](auto tag) {
        flatten_forward_cpu<typename decltype(tag)::type>(s, a, num_threads);
      },
      [&](auto dt) {
        flatten_forward_cuda(dt, s, a, device_index, stream);
      });
}

size_t flatten_workspace_bytes(const std::string& device, int64_t N, int64_t C,
                               const LevelSizes& levels, bool with_level_embed) {
  return flatten_backward_workspace_bytes(flatten_shape(N, C, levels), with_level_embed,
                                          device == "cuda");
}

void flatten_backward(const std::string& dtype, const std::string& device, int device_index,
                      int64_t N, int64_t C, const LevelSizes& levels, uintptr_t grad_src,
                      uintptr_t grad_pos, const Pointers& grad_features,
                      const Pointers& grad_pos_embeds, uintptr_t grad_level_embed,
                      uintptr_t workspace, size_t workspace_size, int num_threads,
                      uintptr_t stream) {
  const FlattenShape s = flatten_shape(N, C, levels);
  FlattenBackwardArgs a;
  level_pointers(grad_features, s, true, N * C > 0, "grad_features", a.grad_features);
  level_pointers(grad_pos_embeds, s, true, N * C > 0, "grad_pos_embeds", a.grad_pos_embeds);
  const bool embed = grad_level_embed != 0;
  const size_t needed = flatten_backward_workspace_bytes(s, embed, device == "cuda");
  require(grad_src, !grad_features.empty() && N * C > 0, "grad_src");
  require(grad_pos, (!grad_pos_embeds.empty() || embed) && N * C > 0, "grad_pos");
  require(workspace, needed > 0, "workspace");
  if (workspace_size < needed)
    throw std::invalid_argument("workspace: " + std::to_string(workspace_size) +
                                " bytes, the backward needs " + std::to_string(needed));
  a.grad_src = as<const void>(grad_src);
  a.grad_pos = as<const void>(grad_pos);
  a.grad_level_embed = as<void>(grad_level_embed);
  a.workspace = as<void>(workspace);
  a.workspace_bytes = workspace_size;
  py::gil_scoped_release unlocked;
  on_device(
      dtype, device,
      [&](auto tag) {
        flatten_backward_cpu<typename decltype(tag)::type>(s, a, num_threads);
      },
      [&](auto dt) {
        flatten_backward_cuda(dt, s, a, device_index, stream);
      });
}

void reference_points(const std::string& dtype, const std::string& device, int device_index,
                      int64_t N, const LevelSizes& levels, uintptr_t valid_ratios,
                      uintptr_t out, int num_threads, uintptr_t stream) {
  const FlattenShape s = flatten_shape(N, 0, levels);
  if (dtype != "float32" && dtype != "float64")
    throw std::invalid_argument("valid_ratios must be float32 or float64, got " + dtype);
  require(valid_ratios, N > 0, "valid_ratios");
  require(out, N > 0, "reference_points");
  py::gil_scoped_release unlocked;
  on_device(
      dtype, device,
      [&](auto tag) {
        using A = Acc<typename decltype(tag)::type>;
        encoder_reference_points_cpu<A>(s, as<const A>(valid_ratios), as<A>(out), num_threads);
      },
      [&](auto dt) {
        encoder_reference_points_cuda(dt, s, as<const void>(valid_ratios),
                                      as<void>(out), device_index, stream);
      });
}

// ---------------------------------------------------------------------------

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

// Whether ddetr's own CUDA runtime (the toolkit's, linked statically) can run on this
// machine's driver: python/ddetr/_ext.py decides from it whether CUDA tensors may take
// the CUDA kernels. A build without CUDA answers too, with built = False.
py::dict runtime_status() {
  py::dict info;
#ifdef DDETR_WITH_CUDA
  CudaRuntimeStatus s;
  {
    py::gil_scoped_release unlocked;  // the first query initialises the driver
    s = cuda_runtime_status();
  }
  info["built"] = true;
  info["driver_version"] = s.driver_version;
  info["runtime_version"] = s.runtime_version;
  info["device_count"] = s.device_count;
  info["error"] = std::string(s.error_name);
  info["insufficient_driver"] = s.insufficient_driver;
  info["usable"] = s.error == 0 && s.device_count > 0;
#else
  info["built"] = false;
  info["driver_version"] = 0;
  info["runtime_version"] = 0;
  info["device_count"] = 0;
  info["error"] = std::string("ddetr was built without CUDA");
  info["insufficient_driver"] = false;
  info["usable"] = false;
#endif
  return info;
}

}  // namespace
}  // namespace ddetr

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddetr native core (CPU kernels, CUDA kernels when built with CUDA)";
  m.def("build_info", &ddetr::build_info);
  m.def("cuda_runtime_status", &ddetr::runtime_status);
  m.def("dropout", &ddetr::dropout);
  m.def("load_blas", &ddetr::load_blas);
  m.def("blas_loaded", &ddetr::blas_loaded);
  m.def("blas_core", &ddetr::blas_core);
  m.def("gemm", &ddetr::cpu_gemm, py::arg("dtype"), py::arg("trans_a"), py::arg("trans_b"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("A"), py::arg("lda"), py::arg("B"),
        py::arg("ldb"), py::arg("beta"), py::arg("C"), py::arg("ldc"), py::arg("bias"),
        py::arg("relu"), py::arg("num_threads"), py::arg("c_dtype") = "",
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0, py::arg("kernel") = "auto");
  m.def("gemm_workspace_bytes", &ddetr::gemm_workspace_bytes);
  m.def("gemm_bf16_kernel", &ddetr::gemm_bf16_kernel);
  m.def("gemm_bf16_avx512_supported", &ddetr::gemm_bf16_avx512_supported);
  m.def("relu_dropout_backward", &ddetr::relu_dropout_backward);
  m.def("msda_forward", &ddetr::forward);
  m.def("msda_backward", &ddetr::backward);
  m.def("msda_backward_workspace_bytes", &ddetr::workspace_bytes);
  m.def("flatten_forward", &ddetr::flatten_forward);
  m.def("flatten_backward", &ddetr::flatten_backward);
  m.def("flatten_backward_workspace_bytes", &ddetr::flatten_workspace_bytes);
  m.def("encoder_reference_points", &ddetr::reference_points);
  ddetr::bind_layers(m);
}
