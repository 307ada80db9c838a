// The native encoder / decoder layers on CUDA (ddetr/layers.h): the entry points, which
// run the shared driver (ddetr/layer_driver.h) on CudaOps (layer_ops.cuh), and the
// cuBLAS that CudaOps::gemm calls.
//
// cuBLAS is loaded at run time: Python passes the path of a libcublas (the one the
// torch install ships) to load_cublas, which opens it with dlopen and looks its entry
// points up by name. Building ddetr so needs no cuBLAS headers or libraries, and the
// extension has no link-time dependency on them.
//
// Row-major GEMMs through a column-major library: a row-major (R, C) matrix with row
// stride ld is the column-major (C, R) matrix of its transpose with the same ld, so
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets B first
// (op from tb), then A (op from ta), and m = N, n = M, k = K.
//
// Handles: one per device, created on first use (under a mutex, with that device
// current) and kept for the life of the process; never destroyed, since at exit the CUDA
// driver may already be gone. cuBLAS handles are not safe to re-target from two threads
// at once, so each call sets the stream and enqueues the GEMM under the handle's mutex
// (both are asynchronous: the lock is held for microseconds).
//
// Workspace: one per layer pass, hence one per stream. The handle's own (default)
// workspace pool is shared by every stream the handle is set to, and cuBLAS promises the
// same bits on every run only when a handle's streams do not share one: the algorithm a
// GEMM gets may depend on what the shared pool holds at the time. So every pass reserves
// a cuBLAS workspace at the front of the workspace Python allocates for it (torch's
// caching allocator, on the pass's stream, so it is free again only after the pass's
// work has run) and each GEMM sets it after its stream (cublasSetStream puts the handle
// back on the default pool). Size: cuBLAS's recommendation, 32 MiB from Hopper on,
// 4 MiB before.
//
// Math mode: cuBLAS's default (no TF32), so float32 results match a float32 reference,
// and no reduced-precision reductions: a bf16 GEMM that splits K must add its partial
// sums in float (the compute type), not round each to bf16 (the output type) first.
//
// Types: float and double go through cublas{S,D}gemm(StridedBatched); bfloat16 through
// cublasGemm(StridedBatched)Ex with bf16 A and B, a bf16 or float C and float
// accumulation (CUBLAS_COMPUTE_32F), so C is rounded once. The Ex entry points are
// optional when loading: without them only bfloat16 layers fail.
#include <dlfcn.h>

#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "ddetr/layer_driver.h"
#include "ddetr/layers.h"
#include "layer_ops.cuh"

namespace ddetr {
namespace cuda_detail {
namespace {

// The C ABI of the cuBLAS v2 API (cublas_api.h): handles are pointers to an opaque
// struct, statuses and operations are int-sized enums (0 = CUBLAS_STATUS_SUCCESS,
// CUBLAS_OP_N = 0, CUBLAS_OP_T = 1), strides are long long.
using CublasHandle = void*;
constexpr int kOpN = 0, kOpT = 1;

using CreateFn = int (*)(CublasHandle*);
using DestroyFn = int (*)(CublasHandle);
using SetStreamFn = int (*)(CublasHandle, cudaStream_t);
using SetWorkspaceFn = int (*)(CublasHandle, void*, size_t);
using SetMathModeFn = int (*)(CublasHandle, int);  // cublasMath_t: an int-sized enum (flags)
constexpr int kMathDefault = 0;  // CUBLAS_DEFAULT_MATH
// CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION, a flag or-ed into the mode
constexpr int kMathNoReducedPrecisionReduction = 16;
template <class T>
using GemmFn = int (*)(CublasHandle, int, int, int, int, int, const T*, const T*, int, const T*,
                       int, const T*, T*, int);
template <class T>
using GemmStridedFn = int (*)(CublasHandle, int, int, int, int, int, const T*, const T*, int,
                              long long, const T*, int, long long, const T*, T*, int, long long,
                              int);

// cublasGemmEx / cublasGemmStridedBatchedEx: untyped operands, each followed by its
// cudaDataType_t, then (after C's ldc, stride and the batch count) a cublasComputeType_t
// and a cublasGemmAlgo_t, all int-sized enums; alpha and beta point to float for
// CUBLAS_COMPUTE_32F.
using GemmExFn = int (*)(CublasHandle, int, int, int, int, int, const void*, const void*, int,
                         int, const void*, int, int, const void*, void*, int, int, int, int);
using GemmStridedExFn = int (*)(CublasHandle, int, int, int, int, int, const void*,
                                const void*, int, int, long long, const void*, int, int,
                                long long, const void*, void*, int, int, long long, int, int,
                                int);
constexpr int kDataF32 = 0;       // CUDA_R_32F
constexpr int kDataBf16 = 14;     // CUDA_R_16BF
constexpr int kCompute32F = 68;   // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;  // CUBLAS_GEMM_DEFAULT

struct CublasApi {
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;  // resolved to check the library; handles are kept
  SetStreamFn set_stream = nullptr;
  SetWorkspaceFn set_workspace = nullptr;
  SetMathModeFn set_math_mode = nullptr;
  GemmFn<float> sgemm = nullptr;
  GemmFn<double> dgemm = nullptr;
  GemmStridedFn<float> sgemm_strided = nullptr;
  GemmStridedFn<double> dgemm_strided = nullptr;
  GemmExFn gemm_ex = nullptr;  // optional: bfloat16 only
  GemmStridedExFn gemm_strided_ex = nullptr;
  bool has_bf16() const { return gemm_ex != nullptr && gemm_strided_ex != nullptr; }
};

std::mutex g_api_mutex;
CublasApi g_api;
bool g_api_loaded = false;

struct HandleSlot {
  CublasHandle handle = nullptr;
  std::mutex call_mutex;
};

std::mutex g_handles_mutex;
// Leaked on purpose: no destructor runs at exit (see the handles note above).
std::map<int, std::unique_ptr<HandleSlot>>* g_handles =
    new std::map<int, std::unique_ptr<HandleSlot>>();

template <class F> F resolve_optional(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

template <class F> F resolve(void* lib, const char* name) {
  const F f = resolve_optional<F>(lib, name);
  if (f == nullptr)
    throw std::runtime_error(std::string("cuBLAS library lacks the symbol ") + name);
  return f;
}

constexpr const char* kNoBf16Gemm =
    "ddetr: bfloat16 native layers on CUDA need cublasGemmEx and cublasGemmStridedBatchedEx, "
    "which the loaded cuBLAS library lacks";

void check_status(int status, const char* call) {
  if (status != 0)
    throw std::runtime_error(std::string("ddetr: ") + call + " failed with cuBLAS status " +
                             std::to_string(status));
}

CublasApi loaded_api() {
  std::lock_guard<std::mutex> lock(g_api_mutex);
  if (!g_api_loaded)
    throw std::runtime_error("ddetr: no cuBLAS library is loaded (load_cublas)");
  return g_api;
}

HandleSlot& handle_for(const CublasApi& api, int device) {
  std::lock_guard<std::mutex> lock(g_handles_mutex);
  std::unique_ptr<HandleSlot>& slot = (*g_handles)[device];
  if (!slot) {
    DeviceGuard guard(device);  // the handle belongs to the device current at creation
    auto fresh = std::make_unique<HandleSlot>();
    check_status(api.create(&fresh->handle), "cublasCreate_v2");
    // (a handle whose math mode cannot be set is left unused, not destroyed: see above)
    check_status(api.set_math_mode(fresh->handle, kMathDefault | kMathNoReducedPrecisionReduction),
                 "cublasSetMathMode");
    slot = std::move(fresh);
  }
  return *slot;
}

int as_int(int64_t v, const char* name) {
  if (v < 0 || v > INT_MAX)
    throw std::invalid_argument(std::string("CudaOps::gemm: ") + name + " = " +
                                std::to_string(v) + " does not fit cuBLAS's 32-bit int");
  return int(v);
}

// The int-sized arguments of one GEMM in cuBLAS's column-major terms (see the top:
// B before A, m = N, n = M).
struct CublasDims {
  int op_b, op_a, m, n, k, ldb, lda, ldc, batch;
};

template <class T, class U> CublasDims cublas_dims(const GemmCall<T, U>& g) {
  return {g.tb ? kOpT : kOpN,   g.ta ? kOpT : kOpN,
          as_int(g.N, "N"),     as_int(g.M, "M"),     as_int(g.K, "K"),
          as_int(g.ldb, "ldb"), as_int(g.lda, "lda"), as_int(g.ldc, "ldc"),
          as_int(g.batch, "batch")};
}

// Runs call(handle) with `device` current and its handle bound to `stream` and to the
// pass's workspace (when it has one), under the handle's mutex.
template <class F>
void on_handle(const CublasApi& api, int device, cudaStream_t stream, const BlasWorkspace& ws,
               F&& call) {
  DeviceGuard guard(device);
  HandleSlot& slot = handle_for(api, device);
  std::lock_guard<std::mutex> lock(slot.call_mutex);
  check_status(api.set_stream(slot.handle, stream), "cublasSetStream_v2");
  if (ws.ptr != nullptr)  // after the stream, which resets it
    check_status(api.set_workspace(slot.handle, ws.ptr, ws.bytes), "cublasSetWorkspace_v2");
  call(slot.handle);
}

GemmFn<float> plain_gemm(const CublasApi& api, float) { return api.sgemm; }
GemmFn<double> plain_gemm(const CublasApi& api, double) { return api.dgemm; }
GemmStridedFn<float> strided_gemm(const CublasApi& api, float) { return api.sgemm_strided; }
GemmStridedFn<double> strided_gemm(const CublasApi& api, double) { return api.dgemm_strided; }

// float and double
template <class T>
void run_cublas(int device, cudaStream_t stream, const BlasWorkspace& ws, const GemmCall<T, T>& g) {
  const CublasApi api = loaded_api();
  const CublasDims d = cublas_dims(g);
  const T one = T(1), beta = g.beta;
  on_handle(api, device, stream, ws, [&](CublasHandle h) {
    if (!g.strided) {
      check_status(plain_gemm(api, T())(h, d.op_b, d.op_a, d.m, d.n, d.k, &one, g.B, d.ldb, g.A,
                                        d.lda, &beta, g.C, d.ldc),
                   sizeof(T) == 4 ? "cublasSgemm_v2" : "cublasDgemm_v2");
    } else {
      check_status(strided_gemm(api, T())(h, d.op_b, d.op_a, d.m, d.n, d.k, &one, g.B, d.ldb,
                                          g.sb, g.A, d.lda, g.sa, &beta, g.C, d.ldc, g.sc,
                                          d.batch),
                   sizeof(T) == 4 ? "cublasSgemmStridedBatched" : "cublasDgemmStridedBatched");
    }
  });
}

// bf16 A and B; C in U = bf16 or float
template <class U>
void run_cublas_bf16(int device, cudaStream_t stream, const BlasWorkspace& ws,
                     const GemmCall<bf16, U>& g) {
  const CublasApi api = loaded_api();
  if (!api.has_bf16()) throw std::runtime_error(kNoBf16Gemm);
  const CublasDims d = cublas_dims(g);
  const float one = 1.f, beta = g.beta;
  const int t = kDataBf16, tc = std::is_same<U, bf16>::value ? kDataBf16 : kDataF32;
  on_handle(api, device, stream, ws, [&](CublasHandle h) {
    if (!g.strided) {
      check_status(api.gemm_ex(h, d.op_b, d.op_a, d.m, d.n, d.k, &one, g.B, t, d.ldb, g.A, t,
                               d.lda, &beta, g.C, tc, d.ldc, kCompute32F, kGemmDefault),
                   "cublasGemmEx");
    } else {
      check_status(api.gemm_strided_ex(h, d.op_b, d.op_a, d.m, d.n, d.k, &one, g.B, t, d.ldb,
                                       g.sb, g.A, t, d.lda, g.sa, &beta, g.C, tc, d.ldc, g.sc,
                                       d.batch, kCompute32F, kGemmDefault),
                   "cublasGemmStridedBatchedEx");
    }
  });
}

constexpr char kLayerTypes[] =
    "native layers on CUDA take bfloat16, float32 or float64 (float16 is not supported)";

// A loaded cuBLAS with the GEMMs `dtype` needs.
void require_cublas(DType dtype) {
  if (!cublas_loaded())
    throw std::runtime_error(
        "native layers on CUDA need cuBLAS: no library is loaded (load_cublas)");
  if (dtype == DType::bf16 && !loaded_api().has_bf16()) throw std::runtime_error(kNoBf16Gemm);
}

// cuBLAS's recommended workspace for `device`: 32 MiB from Hopper (sm_90) on, 4 MiB before.
size_t blas_workspace_bytes(int device) {
  int major = 0;
  DDETR_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return size_t(major >= 9 ? 32 : 4) << 20;
}

// What a pass reserves at the front of its workspace for cuBLAS: the workspace and room
// to align it (cuBLAS wants 256 bytes). A multiple of kAlign, so the driver's part
// starts as aligned as the caller's buffer.
constexpr size_t kBlasAlign = 256;
static_assert(kBlasAlign % CudaOps<float>::kAlign == 0,
              "the cuBLAS reserve must keep the driver's part aligned");
size_t blas_reserve_bytes(int device) { return blas_workspace_bytes(device) + kBlasAlign; }

// Runs fn(ops, Tag<T>, driver_workspace, driver_bytes) on the CudaOps of `dtype` for
// `device` and `stream`, with cuBLAS loaded, the device current and the pass's workspace
// split into cuBLAS's part (the front) and the driver's (the rest): what every layer pass
// needs first.
template <class F>
void with_cuda_ops(DType dtype, bool deterministic, int device, uintptr_t stream,
                   void* workspace, size_t workspace_bytes, F&& fn) {
  require_cublas(dtype);
  DeviceGuard guard(device);
  const size_t reserve = blas_reserve_bytes(device);
  if (workspace == nullptr || workspace_bytes < reserve)
    throw std::invalid_argument(
        "layer: the workspace has " + std::to_string(workspace ? workspace_bytes : 0) +
        " bytes, a CUDA pass needs at least " + std::to_string(reserve) +
        " for cuBLAS alone (size it with layer_workspace_bytes)");
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  const uintptr_t aligned = (base + kBlasAlign - 1) / kBlasAlign * kBlasAlign;
  const BlasWorkspace blas{reinterpret_cast<void*>(aligned), blas_workspace_bytes(device)};
  void* rest = static_cast<char*>(workspace) + reserve;
  dispatch_only<float, double, bf16>(dtype, kLayerTypes, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fn(CudaOps<T>{device, as_stream(stream), deterministic, blas}, tag, rest,
       workspace_bytes - reserve);
  });
}

}  // namespace

void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<float, float>& g) {
  run_cublas(device, stream, ws, g);
}
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<double, double>& g) {
  run_cublas(device, stream, ws, g);
}
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<bf16, bf16>& g) {
  run_cublas_bf16(device, stream, ws, g);
}
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<bf16, float>& g) {
  run_cublas_bf16(device, stream, ws, g);
}

}  // namespace cuda_detail

void load_cublas(const char* path) {
  using namespace cuda_detail;
  if (path == nullptr) throw std::invalid_argument("load_cublas: null path");
  std::lock_guard<std::mutex> lock(g_api_mutex);
  if (g_api_loaded) return;  // the first successful load wins
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    throw std::runtime_error(std::string("cannot open cuBLAS library ") + path + ": " +
                             (why ? why : "unknown error"));
  }
  CublasApi api;
  try {
    api.create = resolve<CreateFn>(lib, "cublasCreate_v2");
    api.destroy = resolve<DestroyFn>(lib, "cublasDestroy_v2");
    api.set_stream = resolve<SetStreamFn>(lib, "cublasSetStream_v2");
    api.set_workspace = resolve<SetWorkspaceFn>(lib, "cublasSetWorkspace_v2");
    api.set_math_mode = resolve<SetMathModeFn>(lib, "cublasSetMathMode");
    api.sgemm = resolve<GemmFn<float>>(lib, "cublasSgemm_v2");
    api.dgemm = resolve<GemmFn<double>>(lib, "cublasDgemm_v2");
    api.sgemm_strided = resolve<GemmStridedFn<float>>(lib, "cublasSgemmStridedBatched");
    api.dgemm_strided = resolve<GemmStridedFn<double>>(lib, "cublasDgemmStridedBatched");
    api.gemm_ex = resolve_optional<GemmExFn>(lib, "cublasGemmEx");
    api.gemm_strided_ex = resolve_optional<GemmStridedExFn>(lib, "cublasGemmStridedBatchedEx");
  } catch (...) {
    dlclose(lib);
    throw;
  }
  g_api = api;
  g_api_loaded = true;  // the library stays open for the life of the process
}

bool cublas_loaded() {
  std::lock_guard<std::mutex> lock(cuda_detail::g_api_mutex);
  return cuda_detail::g_api_loaded;
}

// cuBLAS's reserve (see the top of the file), then the driver's workspace.
size_t layer_workspace_bytes_cuda(const LayerShape& s, const LayerOptions& o, bool backward,
                                  int elem_bytes, bool deterministic, int device) {
  cuda_detail::DeviceGuard guard(device);  // the MSDA backward sizes CUB's scratch here
  const size_t blas = cuda_detail::blas_reserve_bytes(device);
  if (elem_bytes == 2)
    return blas + layer_workspace_bytes(CudaOps<bf16>{device, nullptr, deterministic}, s, o,
                                        backward, elem_bytes);
  if (elem_bytes == 4)
    return blas + layer_workspace_bytes(CudaOps<float>{device, nullptr, deterministic}, s, o,
                                        backward, elem_bytes);
  if (elem_bytes == 8)
    return blas + layer_workspace_bytes(CudaOps<double>{device, nullptr, deterministic}, s, o,
                                        backward, elem_bytes);
  throw std::invalid_argument("native layers on CUDA take bfloat16, float32 or float64");
}

void layer_forward_cuda(DType dtype, const LayerShape& s, const LayerOptions& o,
                        const LayerParams<void>& w, const LayerInputs<void>& in, void* out,
                        const LayerSaved<void>& saved, void* workspace,
                        size_t workspace_bytes, bool deterministic, int device,
                        uintptr_t stream) {
  cuda_detail::with_cuda_ops(
      dtype, deterministic, device, stream, workspace, workspace_bytes,
      [&](const auto& ops, auto tag, void* ws, size_t ws_bytes) {
        using T = typename decltype(tag)::type;
        layer_forward<T>(ops, {s, o, typed<T>(w), typed<T>(in), typed<T>(saved)},
                         static_cast<T*>(out), ws, ws_bytes);
      });
}

void layer_backward_cuda(DType dtype, const LayerShape& s, const LayerOptions& o,
                         const LayerParams<void>& w, const LayerInputs<void>& in,
                         const LayerSaved<void>& saved, const void* grad_out,
                         const LayerInputGrads<void>& grad_in,
                         const LayerParamGrads<void>& grad_w, void* workspace,
                         size_t workspace_bytes, bool deterministic, int device,
                         uintptr_t stream) {
  cuda_detail::with_cuda_ops(
      dtype, deterministic, device, stream, workspace, workspace_bytes,
      [&](const auto& ops, auto tag, void* ws, size_t ws_bytes) {
        using T = typename decltype(tag)::type;
        layer_backward<T>(ops, {s, o, typed<T>(w), typed<T>(in), typed<T>(saved)},
                          static_cast<const T*>(grad_out), typed<T>(grad_in), typed<T>(grad_w),
                          ws, ws_bytes);
      });
}

}  // namespace ddetr
