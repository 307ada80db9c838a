// cuda_runtime_status (runtime_status.h): can the CUDA runtime ddetr was linked with
// run on this machine's driver?
//
// cudaGetDeviceCount is the cheapest call that needs a working driver: it initialises
// the driver but creates no context, and fails with cudaErrorInsufficientDriver when
// the driver is older than the runtime (or with cudaErrorNoDevice, or another error,
// when no GPU can be used). The versions come from calls that need no device at all.
#include <cuda_runtime.h>

#include "runtime_status.h"

namespace ddetr {

CudaRuntimeStatus cuda_runtime_status() {
  CudaRuntimeStatus s;
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  if (cudaRuntimeGetVersion(&s.runtime_version) != cudaSuccess) s.runtime_version = 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  s.device_count = err == cudaSuccess ? count : 0;
  s.error = static_cast<int>(err);
  s.error_name = cudaGetErrorName(err);
  s.insufficient_driver = err == cudaErrorInsufficientDriver;
  // The failure is also this thread's "last error": clear it, or the next kernel
  // launch's cudaGetLastError check would report it as its own.
  (void)cudaGetLastError();
  return s;
}

}  // namespace ddetr
