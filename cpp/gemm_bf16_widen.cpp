// The portable bfloat16 GEMM (see ddetr/blas.h): OpenBLAS has no bfloat16 GEMM, so
// op(A) and op(B) are widened to float a panel at a time into the caller's scratch and
// multiplied by sgemm; the float sums then take beta * C, bias and ReLU and are rounded
// into C once. gemm_bf16 (cpp/gemm_bf16.cpp) runs this where the CPU lacks AVX512-BF16
// or DDETR_BF16_GEMM=widen asks for it.
//
// Panels: C rows [m0, m0 + Mc) x all of N in float (cf), K in steps of Kc; the A and B
// panels (af, bf) keep their source layouts, transposed ones stay transposed. Threads:
// the widening and finishing loops are OpenMP loops over rows; the GEMMs use the team
// of ddetr::gemm.
#include "ddetr/blas.h"
#include "ddetr/threads.h"

#include <algorithm>

namespace ddetr {
namespace {

// dst (rows, cols), row stride cols = the bfloat16 block src[r0 + r, c0 + c] (row stride ld)
void widen_block(const bf16* src, int64_t ld, int64_t r0, int64_t rows, int64_t c0,
                 int64_t cols, float* dst, int num_threads) {
  const int nt = resolve_threads(num_threads, rows * cols, int64_t(1) << 15);
#pragma omp parallel for num_threads(nt) DDETR_SHARE_ROWS
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* s = src + (r0 + r) * ld + c0;
    float* d = dst + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = to_acc(s[c]);
  }
}

// c[j] = f[j] + beta * c[j] + bias[j], ReLU when relu, rounded to C once
template <class C>
void finish_row(const float* f, int64_t n, float beta, const bf16* bias, bool relu, C* c) {
  for (int64_t j = 0; j < n; ++j) {
    float v = f[j];
    if (beta != 0.f) v += beta * to_acc(c[j]);
    if (bias) v += to_acc(bias[j]);
    if (relu && !(v > 0.f)) v = 0.f;
    c[j] = from_acc<C>(v);
  }
}

}  // namespace

void gemm_bf16_widen(const GemmArgs& g, bool c_float, int num_threads, float* scratch) {
  if (!check_gemm_bf16(g, scratch)) return;
  const int64_t M = g.M, N = g.N, K = g.K;
  const int64_t Kc = std::max<int64_t>(1, std::min(K, kGemmBf16Panel / N));
  const int64_t Mc = std::max<int64_t>(1, std::min(M, kGemmBf16Panel / std::max(N, Kc)));
  float* cf = scratch;
  float* af = scratch + kGemmBf16Panel;
  float* bf = scratch + 2 * kGemmBf16Panel;
  const auto* A = static_cast<const bf16*>(g.A);
  const auto* B = static_cast<const bf16*>(g.B);
  const auto* bias = static_cast<const bf16*>(g.bias);
  const float beta = float(g.beta);
  int64_t b_k0 = -1;  // the K panel of op(B) now in bf
  for (int64_t m0 = 0; m0 < M; m0 += Mc) {
    const int64_t mr = std::min(Mc, M - m0);
    if (K == 0) std::fill(cf, cf + mr * N, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += Kc) {
      const int64_t kr = std::min(Kc, K - k0);
      if (g.trans_a)
        widen_block(A, g.lda, k0, kr, m0, mr, af, num_threads);
      else
        widen_block(A, g.lda, m0, mr, k0, kr, af, num_threads);
      if (b_k0 != k0) {
        if (g.trans_b)
          widen_block(B, g.ldb, 0, N, k0, kr, bf, num_threads);
        else
          widen_block(B, g.ldb, k0, kr, 0, N, bf, num_threads);
        b_k0 = k0;
      }
      gemm(DType::f32,
           gemm_args(g.trans_a, g.trans_b, mr, N, kr, af, g.trans_a ? mr : kr, bf,
                     g.trans_b ? kr : N, k0 == 0 ? 0.0 : 1.0, cf, N),
           num_threads);
    }
    const int nt = resolve_threads(num_threads, mr * N, int64_t(1) << 15);
#pragma omp parallel for num_threads(nt) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < mr; ++r) {
      if (c_float)
        finish_row(cf + r * N, N, beta, bias, g.relu, static_cast<float*>(g.C) + (m0 + r) * g.ldc);
      else
        finish_row(cf + r * N, N, beta, bias, g.relu, static_cast<bf16*>(g.C) + (m0 + r) * g.ldc);
    }
  }
}

}  // namespace ddetr
