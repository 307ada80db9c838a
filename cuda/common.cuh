// Plumbing every CUDA file shares, and nothing family-specific: float16 conversions,
// the check macro that turns a CUDA error into an exception, the device guard, the
// stream and dtype helpers, and the launch geometry. No kernels live here; the
// kernels of each family are in its own .cu file, which opens with their math, layout
// and thread mapping.
//
// Launch convention of every ddetr kernel: blocks of kBlock threads walk their work
// with a grid-stride loop, so grid_blocks may clamp the grid to the hardware limit and
// no size runs into it. Every launch is followed by DDETR_CUDA_CHECK_LAUNCH().
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ddetr/core.h"

namespace ddetr {

// float16 lives only on the CUDA side, so its conversions are added here rather
// than in scalar.h (which must compile without CUDA headers).
DDETR_HD float to_acc(__half x) { return __half2float(x); }
template <> DDETR_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }

namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("ddetr CUDA error at ") + file + ":" +
                           std::to_string(line) + ": " + expr + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace cuda_detail
}  // namespace ddetr

// Every CUDA runtime call, kernel launch and CUB call goes through this: a
// failure must surface as an exception to the caller, never as a silent
// half-written output.
#define DDETR_CUDA_CHECK(expr)                                                     \
  do {                                                                             \
    const cudaError_t ddetr_err_ = (expr);                                         \
    if (ddetr_err_ != cudaSuccess)                                                 \
      ::ddetr::cuda_detail::throw_cuda_error(ddetr_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// Launch errors (bad configuration, missing kernel image) are only reported
// through cudaGetLastError.
#define DDETR_CUDA_CHECK_LAUNCH() DDETR_CUDA_CHECK(cudaGetLastError())

namespace ddetr {
namespace cuda_detail {

// The driver's cuCtxGetCurrent (CUresult (CUcontext*)), looked up through the runtime
// so the extension keeps no link-time dependency on libcuda; null where the runtime
// cannot provide it (then DeviceGuard falls back to always restoring).
using CtxGetCurrentFn = int (*)(void**);

inline CtxGetCurrentFn driver_ctx_get_current() {
  static const CtxGetCurrentFn fn = [] {
    void* f = nullptr;
    bool ok = false;
#if CUDART_VERSION >= 12050
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    ok = cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &f, CUDART_VERSION,
                                          cudaEnableDefault, &found) == cudaSuccess &&
         found == cudaDriverEntryPointSuccess;
#elif CUDART_VERSION >= 12000
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    ok = cudaGetDriverEntryPoint("cuCtxGetCurrent", &f, cudaEnableDefault, &found) ==
             cudaSuccess &&
         found == cudaDriverEntryPointSuccess;
#elif CUDART_VERSION >= 11030
    ok = cudaGetDriverEntryPoint("cuCtxGetCurrent", &f, cudaEnableDefault) == cudaSuccess;
#endif
    (void)cudaGetLastError();  // a failed lookup must not surface at the next launch check
    return ok ? reinterpret_cast<CtxGetCurrentFn>(f) : nullptr;
  }();
  return fn;
}

// Makes `device` current for the duration of one launcher call, and puts the caller's
// device back afterwards, even when the launcher throws. It touches no other GPU:
// cudaGetDevice only reads the thread's current device, cudaSetDevice runs only when
// that differs from `device`, and the way back only when the guard switched.
// The way back also needs the caller to have had a context: since CUDA 12
// cudaSetDevice creates the device's primary context, and a thread that never used a
// GPU reports device 0 without having one, so "restoring" device 0 there would put a
// context (hundreds of MB) on GPU 0 of a process that only runs on, say, GPU 1. Such a
// thread keeps `device` current instead (torch's own guard likewise switches back only
// to a device that already has a primary context).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DDETR_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ == device) return;
    const CtxGetCurrentFn ctx_get_current = driver_ctx_get_current();
    void* context = nullptr;
    // Unknown (no driver entry point, or the query failed): restore, as before.
    restore_ = ctx_get_current == nullptr || ctx_get_current(&context) != 0 || context != nullptr;
    DDETR_CUDA_CHECK(cudaSetDevice(device));
    switched_ = true;
  }
  ~DeviceGuard() {
    // A destructor must not throw; a failure to switch back cannot be reported
    // without masking the exception that may already be in flight.
    if (switched_ && restore_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
  bool restore_ = false;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The single place where a DType becomes a C++ element type, and back: `f` is called
// with TypeTag<T>{} and reads the type back with `typename decltype(tag)::type`;
// dtype_of<T>() is the DType of T.
template <class T> struct TypeTag {
  using type = T;
};

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<__half>() { return DType::f16; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }

// Every DType.
template <class F> void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::f64: f(TypeTag<double>{}); return;
    case DType::f16: f(TypeTag<__half>{}); return;
    case DType::bf16: f(TypeTag<bf16>{}); return;
  }
  throw std::invalid_argument("ddetr: unknown DType " + std::to_string(static_cast<int>(dtype)));
}

// Only the listed types Ts, for launchers that take fewer (nothing is instantiated for
// the others); any other DType throws std::invalid_argument(refusal).
template <class... Ts, class F> void dispatch_only(DType dtype, const char* refusal, F&& f) {
  const bool found = ((dtype == dtype_of<Ts>() ? (f(TypeTag<Ts>{}), true) : false) || ...);
  if (!found) throw std::invalid_argument(refusal);
}

constexpr int kBlock = 256;  // threads per block of every kernel
constexpr int kWarp = 32;

// Blocks for `work` items at `per_block` items a block. Kernels loop with a
// grid stride, so clamping to the grid.x limit only makes blocks loop more.
inline unsigned grid_blocks(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) return 1u;
  return static_cast<unsigned>(blocks < int64_t(INT_MAX) ? blocks : int64_t(INT_MAX));
}

}  // namespace cuda_detail
}  // namespace ddetr
