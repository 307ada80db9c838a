// Shared plumbing of the CUDA MSDA kernels: float16 conversions, error checks,
// the device guard, the dtype dispatch, the channel split every kernel uses and
// the launch geometry. No kernels live here.
//
// Thread mapping shared by all row kernels (forward, fast backward, deterministic
// reduce): a "group" of `group` consecutive lanes (a power of two dividing 32)
// owns one output row of D channels; lane t of the group handles channels
// t, t + group, ..., so each corner load of a group is one coalesced run of
// `group` elements. Each lane keeps CPL (channels per lane, a template constant
// so the accumulators stay in registers) channels at a time; a D wider than
// group * CPL is walked in chunks of that width.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "ddetr/bilinear.h"
#include "ddetr/msda.h"
#include "ddetr/scalar.h"

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

// The single place where a DType becomes a C++ element type: `f` is called with
// TypeTag<T>{} and reads the type back with `typename decltype(tag)::type`.
template <class T> struct TypeTag {
  using type = T;
};

template <class F> void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::f64: f(TypeTag<double>{}); return;
    case DType::f16: f(TypeTag<__half>{}); return;
    case DType::bf16: f(TypeTag<bf16>{}); return;
  }
  throw std::invalid_argument("ddetr: unknown DType " + std::to_string(static_cast<int>(dtype)));
}

constexpr int kBlock = 256;  // threads per block of every kernel
constexpr int kWarp = 32;

// How a row of D channels is spread over a group of lanes.
struct ChannelSplit {
  int group;  // lanes per row: a power of two in [1, 32]
  int cpl;    // channels per lane per chunk: 1, 2, 4 or 8
};

// Small D gets small groups so a warp still has 32 busy lanes (several rows per
// warp); up to 256 channels fit one chunk, so the per-sample setup is done once.
inline ChannelSplit split_channels(int64_t D) {
  int group = 1;
  while (group < kWarp && group < D) group *= 2;
  const int64_t per_lane = (D + group - 1) / group;
  const int cpl = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
  return ChannelSplit{group, cpl};
}

// Calls `f` with std::integral_constant<int, CPL> for the runtime value `cpl`.
template <class F> void dispatch_cpl(int cpl, F&& f) {
  switch (cpl) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
  }
  throw std::logic_error("ddetr: unsupported channels-per-lane " + std::to_string(cpl));
}

// Blocks for `work` items at `per_block` items a block. Kernels loop with a
// grid stride, so clamping to the grid.x limit only makes blocks loop more.
inline unsigned grid_blocks(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) return 1u;
  return static_cast<unsigned>(blocks < int64_t(INT_MAX) ? blocks : int64_t(INT_MAX));
}

// A location pair (x, y) or its gradient. Two scalar accesses, not one float2 /
// double2: a contiguous view of a caller's tensor may start at an odd element,
// and the pair shares one cache line anyway.
template <class A> struct Vec2 {
  A x, y;
};

template <class A>
__device__ __forceinline__ Vec2<A> load_xy(const A* __restrict__ loc, int64_t i) {
  return Vec2<A>{loc[2 * i], loc[2 * i + 1]};
}

template <class A>
__device__ __forceinline__ void store_xy(A* __restrict__ loc, int64_t i, Vec2<A> v) {
  loc[2 * i] = v.x;
  loc[2 * i + 1] = v.y;
}

// The backward kernels keep every lane on the same path up to the warp
// shuffles, including lanes whose row is past the end: those must not read loc
// but still need a Bilinear that says "nothing here". Clearing on a miss as well
// keeps the kernels correct whatever bilinear_setup leaves in `b` then.
template <class A>
__device__ __forceinline__ bool setup_or_clear(bool active, A x, A y, int64_t H, int64_t W,
                                               Bilinear<A>& b) {
  if (active && bilinear_setup(x, y, H, W, b)) return true;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    b.pixel[k] = -1;
    b.weight[k] = A(0);
  }
  b.ly = A(0);
  b.lx = A(0);
  return false;
}

// grad_value of the deterministic path (cuda/msda_backward_deterministic.cu): adds
// each element's share into grad_value in a fixed order, without floating-point atomics.
// Explicitly instantiated there for float, double, __half and bf16.
template <class T>
void deterministic_grad_value(const MsdaShape& shape, const Acc<T>* loc, const Acc<T>* attn,
                              const T* grad_out, Acc<T>* grad_value, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// Workspace of deterministic_grad_value on the current device (0 when there is
// nothing to do). Throws std::invalid_argument when the problem overflows the
// 32-bit sort keys and ids.
size_t deterministic_workspace_bytes(const MsdaShape& shape);

}  // namespace cuda_detail
}  // namespace ddetr
