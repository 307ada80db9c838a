// Dense GEMMs on the CPU through OpenBLAS, loaded at run time.
//
// The library is the one the scipy-openblas32 wheel ships (a run-time dependency of
// ddetr; Python passes its path to load_blas). It is opened with dlopen and its
// prefixed CBLAS entry points looked up by name, so building ddetr needs no BLAS
// headers or libraries, and a missing or broken library only disables this path
// (Python then uses torch's matmul).
//
// gemm computes, row-major, C[M, N] = op(A) op(B) + beta * C with op(X) = X or X^T,
// then the optional bias / ReLU epilogue of GemmArgs:
// A is (M, K) (or (K, M) transposed), B is (K, N) (or (N, K) transposed); leading
// dimensions are row strides in elements. Sizes must fit OpenBLAS's 32-bit ints.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "ddetr/core.h"

namespace ddetr {

// Opens `path` and resolves the GEMM and thread-count symbols; throws
// std::runtime_error naming what is missing. Loading again replaces nothing once a
// library is in place (the first successful load wins).
void load_blas(const std::string& path);
bool blas_loaded();
// The kernels OpenBLAS chose when it loaded, by its own name ("SkylakeX", "Haswell",
// ...; the environment variable OPENBLAS_CORETYPE overrides its choice); "" before a
// load or when the library cannot say.
std::string blas_core();

struct GemmArgs {
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  double beta = 0.0;
  void* C = nullptr;
  int64_t ldc = 0;
  // epilogue, applied to each block of rows of C while it is still in cache:
  // C[m, n] = act(C[m, n] + bias[n]) (bias may be null; act is ReLU or nothing)
  const void* bias = nullptr;
  bool relu = false;
};

inline GemmArgs gemm_args(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                          const void* A, int64_t lda, const void* B, int64_t ldb, double beta,
                          void* C, int64_t ldc, const void* bias = nullptr, bool relu = false) {
  GemmArgs g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.beta = beta;
  g.C = C;
  g.ldc = ldc;
  g.bias = bias;
  g.relu = relu;
  return g;
}

// dtype f32 or f64; `num_threads` as torch.get_num_threads() (0: OpenMP's default).
void gemm(DType dtype, const GemmArgs& g, int num_threads);

// The argument checks every GEMM entry point shares: throws std::invalid_argument on a
// negative size, a leading dimension shorter than its row or a null operand; false when
// C is empty (nothing to do).
bool check_gemm_args(const GemmArgs& g);

// The same GEMM on bfloat16 A, B and bias, products summed in float over all of K, each
// element of C (bf16, or float when c_float) rounded once, after beta * C, bias and ReLU.
// `scratch` holds at least kGemmBf16ScratchFloats floats (64-byte aligned). Sizes are
// not limited to 32 bits, except on the widening path (OpenBLAS's ints).
//
// Implementations (Bf16GemmKernel):
// * amx (cpp/gemm_bf16.cpp): the packs of avx512 with the pairs padded to whole tiles,
//   32 x 32 micro-tiles of AMX TDPBF16PS (the same per-pair products and flushing as
//   VDPBF16PS), the avx512 epilogue. Chosen where the CPU has AMX-BF16 and AVX512-BF16
//   and the operating system grants the tile state. Its result does not depend on the
//   thread count.
// * amx_emulated: the amx kernel with the tile instructions done in plain C++ (slow):
//   tests its packing, blocking and epilogue on any CPU with AVX512-BF16. Never chosen
//   unless named.
// * avx512 (cpp/gemm_bf16.cpp): packs op(A) and op(B) into bf16 pairs in the scratch
//   (at most 3 MB of it) and multiplies with AVX512-BF16 dot products (VDPBF16PS: two
//   bf16 products added into a float lane; denormal inputs read as zero, denormal
//   results flushed to zero). Its result does not depend on the thread count. It needs
//   no BLAS library. Chosen when the CPU has AVX512-BF16 but no AMX.
// * widen (cpp/gemm_bf16_widen.cpp): widens op(A) and op(B) to float a panel at a time
//   (three panels of kGemmBf16Panel floats) and calls OpenBLAS's sgemm (which has no
//   bfloat16 GEMM); needs the BLAS library loaded when K > 0.
// `automatic` is the first of amx, avx512 and widen this CPU runs, unless the
// environment variable DDETR_BF16_GEMM (read once per process: amx, amx_emulated, avx512
// or widen; another value is an error) names one. The paths differ in the order of their float
// sums, so their results may differ in the last bit. Asking for a kernel the CPU cannot
// run throws std::runtime_error.
enum class Bf16GemmKernel { automatic, avx512, widen, amx, amx_emulated };
// The kernels' names as the bindings and DDETR_BF16_GEMM spell them ("auto", "amx",
// "amx_emulated", "avx512", "widen"), and the kernel of a name (none for another).
const char* bf16_kernel_name(Bf16GemmKernel kernel);
std::optional<Bf16GemmKernel> bf16_kernel_named(const std::string& name);
constexpr int64_t kGemmBf16Panel = int64_t(1) << 20;  // floats per panel (4 MB)
constexpr int64_t kGemmBf16ScratchFloats = 3 * kGemmBf16Panel;
constexpr size_t kGemmBf16ScratchBytes = size_t(kGemmBf16ScratchFloats) * sizeof(float);
void gemm_bf16(const GemmArgs& g, bool c_float, int num_threads, float* scratch,
               Bf16GemmKernel kernel = Bf16GemmKernel::automatic);
// Whether `kernel` gives the AVX512-BF16 kernel's result (within float rounding) on a
// small GEMM with a tail in every size, both A layouts, beta and bias. `automatic`
// checks amx this way once before choosing it (the AMX kernel's tests run on CPUs with
// AMX only); on a disagreement it prints a line to stderr and chooses avx512. Needs
// AVX512-BF16 (std::runtime_error otherwise).
bool gemm_bf16_agrees(Bf16GemmKernel kernel);
// What `automatic` runs (CPU and DDETR_BF16_GEMM), and whether avx512 / amx can run.
Bf16GemmKernel gemm_bf16_default_kernel();
bool gemm_bf16_avx512_supported();
bool gemm_bf16_amx_supported();

// The widening path itself, and the checks both paths share (check_gemm_args and a
// non-null scratch).
void gemm_bf16_widen(const GemmArgs& g, bool c_float, int num_threads, float* scratch);
bool check_gemm_bf16(const GemmArgs& g, const float* scratch);

}  // namespace ddetr
