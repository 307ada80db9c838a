// What the CUDA runtime linked into ddetr (the toolkit's cudart_static) says about this
// machine: cuda/runtime_status.cu, reported to Python by _C.cuda_runtime_status.
// Plain C++ (no CUDA headers), so the binding that reports it needs none.
//
// Why it exists: ddetr carries the runtime of the toolkit it was built with, while
// torch carries its own. A driver older than ddetr's toolkit runs torch but fails every
// ddetr CUDA call (cudaErrorInsufficientDriver), so Python asks once and keeps CUDA
// tensors on the pure-PyTorch path with one warning (python/ddetr/_native/loader.py).
#pragma once

namespace ddetr {

struct CudaRuntimeStatus {
  int driver_version = 0;   // cudaDriverGetVersion: 1000 * major + 10 * minor; 0 = no driver
  int runtime_version = 0;  // cudaRuntimeGetVersion: the toolkit ddetr was built with
  int device_count = 0;     // cudaGetDeviceCount's answer, 0 when it failed
  int error = 0;            // cudaGetDeviceCount's cudaError_t (0 = cudaSuccess)
  const char* error_name = "";  // cudaGetErrorName(error), a static string
  bool insufficient_driver = false;  // error == cudaErrorInsufficientDriver
};

// Never throws, creates no context and leaves no error behind for the next
// cudaGetLastError; the device count initialises the driver (cuInit) if nothing has.
CudaRuntimeStatus cuda_runtime_status();

}  // namespace ddetr
