// The pybind11 module ddetr._C: how it was built, what its CUDA runtime finds, and one
// binding file per native family (msda, flatten, gemm, dropout, layers), each taking
// named structs that python/ddetr/_native/ fills (bindings/common.h).
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "ddetr/msda.h"

#ifdef DDETR_WITH_CUDA
#include "../cuda/runtime_status.h"
#endif

namespace ddetr {
namespace {

namespace py = pybind11;

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
  info["cpu_runtime_dispatch"] = msda_cpu_per_isa();
  info["max_levels"] = kMaxLevels;
  return info;
}

// Whether ddetr's own CUDA runtime (the toolkit's, linked statically) can run on this
// machine's driver: python/ddetr/_native/loader.py decides from it whether CUDA tensors
// may take the CUDA kernels. A build without CUDA answers too, with built = False.
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
  ddetr::bind::bind_common(m);
  ddetr::bind::bind_msda(m);
  ddetr::bind::bind_flatten(m);
  ddetr::bind::bind_gemm(m);
  ddetr::bind::bind_dropout(m);
  ddetr::bind::bind_layers(m);
}
