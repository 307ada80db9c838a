// The float32 / float64 GEMM of ddetr/blas.h on OpenBLAS, loaded with dlopen.
//
// Math: C = op(A) op(B) + beta * C through cblas_{s,d}gemm (row-major), then the
// epilogue C[m, n] = act(C[m, n] + bias[n]) on each chunk of rows while it is in cache.
//
// Layout: row-major, leading dimensions in elements; a chunk of C's rows [r0, r0 + rows)
// is the GEMM of op(A)'s rows [r0, r0 + rows) (A's rows, or A's columns when transposed)
// with all of op(B).
//
// Threads: OpenBLAS itself runs on one thread; an OpenMP team (torch's thread count, one
// thread for small GEMMs) shares fixed chunks of C's rows, one sgemm / dgemm call per
// chunk. The chunks depend on M alone (chunk_rows), so results do not depend on the
// thread count; nothing is reduced across threads.
#include "ddetr/blas.h"
#include "ddetr/threads.h"

#include <dlfcn.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <climits>
#include <mutex>
#include <string>
#include <stdexcept>
#include <utility>

namespace ddetr {
namespace {

// Below this many multiply-adds a GEMM stays on the calling thread.
constexpr int64_t kSerialBelowFlops = int64_t(1) << 22;

// Rows of C per GEMM call: at most kEpilogueRows (so the bias / ReLU epilogue reads them
// from cache, and enough for OpenBLAS's own blocking), fewer for small M so that up to
// kChunksWanted threads find work, but at least kMinChunkRows (each call packs op(B)
// again); whole multiples of 16 rows. The chunks depend on M
// alone, never on the thread count: OpenBLAS computes a row through different kernels
// depending on where it falls in a call (edge tiles, small-matrix paths), so rows split
// differently at another thread count gave other roundings.
constexpr int64_t kEpilogueRows = 256;
constexpr int64_t kChunksWanted = 8, kMinChunkRows = 64;

int64_t chunk_rows(int64_t M) {
  const int64_t rows = ((M + kChunksWanted - 1) / kChunksWanted + 15) / 16 * 16;
  return std::min(std::max(rows, kMinChunkRows), kEpilogueRows);
}

// CBLAS enums (cblas.h): row-major order, no transpose, transpose.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                       int, float, float*, int);
using Dgemm = void (*)(int, int, int, int, int, int, double, const double*, int, const double*,
                       int, double, double*, int);
using SetThreads = void (*)(int);
using GetThreads = int (*)();

struct Blas {
  Sgemm sgemm = nullptr;
  Dgemm dgemm = nullptr;
  SetThreads set_threads = nullptr;
  GetThreads get_threads = nullptr;
};

Blas g_blas;
std::mutex g_load_mutex;
bool g_loaded = false;
std::string g_core;  // OpenBLAS's name for the kernels it chose ("" if it cannot say)

template <class F> F symbol(void* handle, const char* name) {
  void* p = dlsym(handle, name);
  if (!p) throw std::runtime_error(std::string("BLAS library lacks the symbol ") + name);
  return reinterpret_cast<F>(p);
}

template <class T>
void epilogue(T* c, int rows, int n, int ldc, const T* bias, bool relu) {
  if (!bias && !relu) return;
  for (int r = 0; r < rows; ++r) {
    T* row = c + int64_t(r) * ldc;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      T v = bias ? row[j] + bias[j] : row[j];
      row[j] = relu && !(v > T(0)) ? T(0) : v;
    }
  }
}

int as_blas_int(int64_t v, const char* name) {
  if (v < 0 || v > INT_MAX)
    throw std::invalid_argument(std::string("gemm: ") + name + " = " + std::to_string(v) +
                                " does not fit OpenBLAS's 32-bit int");
  return int(v);
}

// Throws on sizes OpenBLAS cannot take or a missing library, then as check_gemm_args.
bool check_gemm(const GemmArgs& g) {
  if (!blas_loaded()) throw std::runtime_error("gemm: no BLAS library is loaded");
  const std::pair<int64_t, const char*> sizes[] = {{g.M, "M"},     {g.N, "N"},     {g.K, "K"},
                                                   {g.lda, "lda"}, {g.ldb, "ldb"}, {g.ldc, "ldc"}};
  for (const auto& [v, name] : sizes) as_blas_int(v, name);
  return check_gemm_args(g);
}

}  // namespace

bool check_gemm_args(const GemmArgs& g) {
  if (g.M < 0 || g.N < 0 || g.K < 0) throw std::invalid_argument("gemm: negative size");
  // row-major leading dimensions: at least the stored row length
  if (g.lda < (g.trans_a ? g.M : g.K) || g.ldb < (g.trans_b ? g.K : g.N) || g.ldc < g.N)
    throw std::invalid_argument("gemm: a leading dimension is smaller than its row");
  if (g.M == 0 || g.N == 0) return false;
  if ((!g.A || !g.B) && g.K > 0) throw std::invalid_argument("gemm: null operand");
  if (!g.C) throw std::invalid_argument("gemm: null operand");
  return true;
}

void load_blas(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  if (g_loaded) return;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) throw std::runtime_error("cannot open BLAS library " + path + ": " + dlerror());
  Blas b;
  b.sgemm = symbol<Sgemm>(handle, "scipy_cblas_sgemm");
  b.dgemm = symbol<Dgemm>(handle, "scipy_cblas_dgemm");
  b.set_threads = symbol<SetThreads>(handle, "scipy_openblas_set_num_threads");
  b.get_threads = symbol<GetThreads>(handle, "scipy_openblas_get_num_threads");
  using CoreName = const char* (*)();
  if (auto core = reinterpret_cast<CoreName>(dlsym(handle, "scipy_openblas_get_corename")))
    g_core = core();
  g_blas = b;
  g_loaded = true;  // the handle stays open for the life of the process
}

bool blas_loaded() {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  return g_loaded;
}

std::string blas_core() {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  return g_core;
}

void gemm(DType dtype, const GemmArgs& g, int num_threads) {
  if (!check_gemm(g)) return;
  if (dtype != DType::f32 && dtype != DType::f64)
    throw std::invalid_argument("gemm: float32 or float64 only");
  const int M = int(g.M), N = int(g.N), K = int(g.K);
  const int lda = int(g.lda), ldb = int(g.ldb), ldc = int(g.ldc);
  // OpenBLAS itself runs on one thread: its own pool spin-waits between calls and
  // fights the OpenMP teams of torch and of ddetr's kernels for the cores. Threads
  // here are an OpenMP team sharing fixed chunks of C's rows (rows of op(A)), which
  // needs no reduction.
  if (g_blas.get_threads() != 1) g_blas.set_threads(1);
  const int threads = resolve_threads(num_threads, int64_t(M) * N * K, kSerialBelowFlops);
  const int64_t elem = dtype == DType::f32 ? 4 : 8;
  const int ta = g.trans_a ? kTrans : kNoTrans, tb = g.trans_b ? kTrans : kNoTrans;
  const int64_t chunk = chunk_rows(M), chunks = (M + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) DDETR_SHARE_ITEMS
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t r0 = i * chunk;
    const int rows = int(std::min<int64_t>(M - r0, chunk));
    // row m of op(A): row m of A, or column m of A when transposed
    const auto* a = static_cast<const char*>(g.A) + (g.trans_a ? r0 : r0 * lda) * elem;
    auto* c = static_cast<char*>(g.C) + r0 * ldc * elem;
    if (dtype == DType::f32) {
      g_blas.sgemm(kRowMajor, ta, tb, rows, N, K, 1.0f, reinterpret_cast<const float*>(a),
                   lda, static_cast<const float*>(g.B), ldb, float(g.beta),
                   reinterpret_cast<float*>(c), ldc);
      epilogue(reinterpret_cast<float*>(c), rows, N, ldc,
               static_cast<const float*>(g.bias), g.relu);
    } else {
      g_blas.dgemm(kRowMajor, ta, tb, rows, N, K, 1.0, reinterpret_cast<const double*>(a),
                   lda, static_cast<const double*>(g.B), ldb, g.beta,
                   reinterpret_cast<double*>(c), ldc);
      epilogue(reinterpret_cast<double*>(c), rows, N, ldc,
               static_cast<const double*>(g.bias), g.relu);
    }
  }
}

}  // namespace ddetr
