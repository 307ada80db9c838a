// int8 GEMM on the CPU (cpp/gemm_int8.cpp): a linear layer whose weights are int8 per
// output channel and whose activations are quantised to int8 per row on the fly.
//
//   C[m, n] = act(float(sum_k Aq[m, k] Wq[n, k]) * (a_scale[m] * w_scale[n]) + bias[n])
//
// The sum is exact in int32 (|Aq|, |Wq| <= 128 and K <= kInt8MaxK, so it cannot
// overflow); the float part is one rounding of a_scale * w_scale, then one fused
// multiply-add, then ReLU as max(0, x) (NaN stays NaN). Every kernel computes each
// element this way, so they agree bit for bit, and so do all thread counts.
//
// A is either float32, quantised here per row (dynamic per-token quantisation):
//   a_scale[m] = max_k |A[m, k]| / 127,  Aq[m, k] = rne(clamp(A[m, k] / a_scale[m], +-127))
// (rne: round to nearest, ties to even; a row of zeros, or one whose scale underflows to
// zero, gets Aq = 0 and scale 0; a row holding NaN or inf gets Aq = 0 and scale NaN, so
// its outputs are NaN) or already int8, with its scales given.
//
// W (N, K) int8 is packed once (gemm_int8_pack) into the layout of one kernel; the
// packed buffer starts with a header that records the kernel, N and K, and every GEMM
// checks it against the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ddetr {

// automatic: amx where the CPU has AMX-INT8 (and AVX512-VNNI, and the OS grants the
// tiles), else avx512_vnni where it has AVX512-VNNI, else avx2 where it has AVX2, else
// scalar. scalar is the portable spec: it reads the avx512_vnni layout with plain C++, so
// a machine without VNNI still checks that layout. amx_emulated is the amx kernel with
// its tile instructions done in C++ (ddetr/amx_tiles.h; slow, never chosen by
// automatic): it checks the amx layout and tails on any CPU with AVX512-VNNI.
enum class Int8GemmKernel : int32_t {
  automatic = 0,
  scalar = 1,
  avx2 = 2,
  avx512_vnni = 3,
  amx = 4,
  amx_emulated = 5
};

constexpr int64_t kInt8MaxK = int64_t(1) << 16;  // 128 * 128 * 2^16 * 2 < 2^31

Int8GemmKernel int8_kernel_from_name(const std::string& name);  // throws on an unknown name
std::string int8_kernel_name(Int8GemmKernel kernel);
bool gemm_int8_supported(Int8GemmKernel kernel);  // automatic and scalar: always
Int8GemmKernel gemm_int8_resolve(Int8GemmKernel kernel);  // automatic -> the CPU's best
// Whether `kernel` gives the scalar kernel's bits on a small GEMM with a tail in every
// size. automatic checks amx this way once before choosing it (the AMX kernel's tests run
// on CPUs with AMX only); on a disagreement it prints a line to stderr and goes on down
// the list.
bool gemm_int8_agrees(Int8GemmKernel kernel);

// Bytes of W (N, K) packed for `kernel` (automatic resolved), header included.
size_t gemm_int8_packed_bytes(Int8GemmKernel kernel, int64_t N, int64_t K);

// Packs W (N, K) int8, rows ldw apart, for `kernel` into `packed` (packed_bytes long,
// at least gemm_int8_packed_bytes). Throws std::invalid_argument on bad sizes, a null
// pointer or a short buffer, std::runtime_error for a kernel this CPU cannot run.
void gemm_int8_pack(Int8GemmKernel kernel, const int8_t* W, int64_t N, int64_t K, int64_t ldw,
                    void* packed, size_t packed_bytes, int num_threads);

// The kernel a packed buffer was packed for (after checking its header).
Int8GemmKernel gemm_int8_packed_kernel(const void* packed, size_t packed_bytes);

struct Int8GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const float* A = nullptr;      // float32 (M, K), rows lda apart; or
  const int8_t* A_q = nullptr;   // int8 (M, K), rows lda apart, with
  const float* a_scale = nullptr;  // its (M,) scales (exactly one of A, A_q)
  int64_t lda = 0;
  const void* packed = nullptr;  // gemm_int8_pack's output for N, K
  size_t packed_bytes = 0;
  const float* w_scale = nullptr;  // (N,)
  const float* bias = nullptr;     // (N,) or null
  bool relu = false;
  float* C = nullptr;  // float32 (M, N), rows ldc apart
  int64_t ldc = 0;
};

// C = the formula above; `num_threads` as torch.get_num_threads() (0: OpenMP's default).
// Throws std::invalid_argument naming the field that does not fit.
void gemm_int8(const Int8GemmArgs& g, int num_threads);

// The per-row quantisation of A alone: q (rows, cols) int8 rows ldq apart, scale (rows,).
void quantize_rows_int8(const float* x, int64_t rows, int64_t cols, int64_t ldx, int8_t* q,
                        int64_t ldq, float* scale, int num_threads);

}  // namespace ddetr
