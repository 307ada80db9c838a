// CPU primitives of the native layers (ddetr/layer_ops.h) and the CPU entry points of
// ddetr/layers.h. GEMMs go to OpenBLAS (cpp/blas.cpp), MSDA and dropout to their CPU
// kernels; the rest are row-parallel loops written here.
//
// Threads: an OpenMP team of torch.get_num_threads() (one thread for small work).
// Row-wise ops give each thread whole rows. Column reductions (bias and LayerNorm
// parameter gradients) give each thread whole columns and sum the rows in order in
// double, so their results do not depend on the thread count. The batched GEMMs of the
// decoder's self-attention run one (head) GEMM per thread.
#include "ddetr/blas.h"
#include "ddetr/dropout.h"
#include "ddetr/layer_driver.h"
#include "ddetr/threads.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace ddetr {
namespace {

constexpr int64_t kSerialBelow = int64_t(1) << 15;      // elements of a pass
constexpr int64_t kSerialBelowFlops = int64_t(1) << 22;  // multiply-adds of a GEMM batch
constexpr double kLayerNormEps = 1e-5;

template <class T> constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::f32 : DType::f64;
}

template <class T> struct CpuOps {
  int threads;
  static constexpr size_t kAlign = 64;

  int team(int64_t work) const { return resolve_threads(threads, work, kSerialBelow); }

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
            const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const T* bias, bool relu) const {
    ddetr::gemm(dtype_of<T>(),
                gemm_args(ta, tb, M, N, K, A, lda, B, ldb, double(beta), C, ldc, bias, relu),
                threads);
  }

  void gemm_batched(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    int64_t sa, const T* B, int64_t ldb, int64_t sb, T beta, T* C, int64_t ldc,
                    int64_t sc, int64_t batch) const {
    const int nt = resolve_threads(threads, batch * M * N * K, kSerialBelowFlops);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < batch; ++i)
      ddetr::gemm(dtype_of<T>(),
                  gemm_args(ta, tb, M, N, K, A + i * sa, lda, B + i * sb, ldb, double(beta),
                            C + i * sc, ldc),
                  1);
  }

  void add(int64_t n, const T* a, const T* b, T* out) const {
#pragma omp parallel for simd num_threads(team(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }

  void fill_zero(int64_t n, T* x) const {
#pragma omp parallel for simd num_threads(team(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] = T(0);
  }

  void fill(int64_t n, T value, T* x) const {
#pragma omp parallel for simd num_threads(team(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] = value;
  }

  void copy_rows(int64_t rows, int64_t cols, const T* x, int64_t ldx, T* out,
                 int64_t ldo) const {
#pragma omp parallel for num_threads(team(rows * cols)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) std::copy(x + r * ldx, x + r * ldx + cols, out + r * ldo);
  }

  void mask_rows(int64_t rows, int64_t cols, const uint8_t* mask, T* x) const {
#pragma omp parallel for num_threads(team(rows * cols)) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      if (mask[r]) std::fill(x + r * cols, x + (r + 1) * cols, T(0));
  }

  void dropout(const DropoutArgs& a, const T* x, T* out, bool relu) const {
    dropout_cpu<T>(a, x, out, relu, threads);
  }

  void relu_dropout_backward(const DropoutArgs& a, const T* out, const T* grad_out,
                             T* grad_x) const {
    relu_dropout_backward_cpu<T>(a, out, grad_out, grad_x, threads);
  }

  void add_layernorm(int64_t rows, int64_t C, const T* base, const T* branch, const T* gamma,
                     const T* beta, T* y, T* xhat, T* rstd) const {
#pragma omp parallel for num_threads(team(rows * C)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* yr = y + r * C;
      const T* b0 = base + r * C;
      const T* b1 = branch + r * C;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < C; ++j) {
        yr[j] = b0[j] + b1[j];
        sum += yr[j];
      }
      const T mean = sum / T(C);
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < C; ++j) sq += (yr[j] - mean) * (yr[j] - mean);
      const T rs = T(1) / std::sqrt(sq / T(C) + T(kLayerNormEps));
      T* xr = xhat ? xhat + r * C : nullptr;
      for (int64_t j = 0; j < C; ++j) {
        const T xh = (yr[j] - mean) * rs;
        if (xr) xr[j] = xh;
        yr[j] = xh * gamma[j] + beta[j];
      }
      if (rstd) rstd[r] = rs;
    }
  }

  void layernorm_apply(int64_t rows, int64_t C, const T* xhat, const T* gamma, const T* beta,
                       T* y) const {
#pragma omp parallel for num_threads(team(rows * C)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) y[r * C + j] = xhat[r * C + j] * gamma[j] + beta[j];
    }
  }

  void layernorm_backward(int64_t rows, int64_t C, const T* dy, const T* xhat, const T* rstd,
                          const T* gamma, T* dx) const {
#pragma omp parallel for num_threads(team(rows * C)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* dr = dy + r * C;
      const T* xr = xhat + r * C;
      T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < C; ++j) {
        const T g = dr[j] * gamma[j];
        sg += g;
        sgx += g * xr[j];
      }
      const T mg = sg / T(C), mgx = sgx / T(C), rs = rstd[r];
      T* out = dx + r * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = rs * (dr[j] * gamma[j] - mg - xr[j] * mgx);
    }
  }

  void column_sums(int64_t rows, int64_t cols, const T* x, T* out, bool accumulate) const {
    column_reduce(rows, cols, x, static_cast<const T*>(nullptr), out, accumulate);
  }

  void column_dots(int64_t rows, int64_t cols, const T* x, const T* y, T* out,
                   bool accumulate) const {
    column_reduce(rows, cols, x, y, out, accumulate);
  }

  void sampling_forward(const SamplingArgs& a, const T* raw, const T* ref, T* loc,
                        T* attn) const {
    const int64_t K = a.M * a.L * a.P, LP = a.L * a.P;
#pragma omp parallel for num_threads(team(a.rows * K * 8)) schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* off = raw + r * 3 * K;
      const T* ref_r = ref + r * a.L * a.ref_dim;
      T* loc_r = loc + r * 2 * K;
      for (int64_t m = 0; m < a.M; ++m) {
        softmax(LP, T(1), off + 2 * K + m * LP, attn + r * K + m * LP);
        for (int64_t l = 0; l < a.L; ++l) {
          const T* rl = ref_r + l * a.ref_dim;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t i = 2 * ((m * a.L + l) * a.P + p);
            if (a.ref_dim == 2) {
              loc_r[i] = rl[0] + off[i] / T(a.level_w[l]);
              loc_r[i + 1] = rl[1] + off[i + 1] / T(a.level_h[l]);
            } else {
              loc_r[i] = rl[0] + off[i] / T(a.P) * rl[2] * T(0.5);
              loc_r[i + 1] = rl[1] + off[i + 1] / T(a.P) * rl[3] * T(0.5);
            }
          }
        }
      }
    }
  }

  void sampling_backward(const SamplingArgs& a, const T* raw, const T* ref, const T* attn,
                         const T* grad_loc, const T* grad_attn, T* grad_raw, T* grad_ref) const {
    const int64_t K = a.M * a.L * a.P, LP = a.L * a.P, R = a.L * a.ref_dim;
#pragma omp parallel for num_threads(team(a.rows * K * 8)) schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* off = raw + r * 3 * K;
      const T* ref_r = ref + r * R;
      const T* gl = grad_loc + r * 2 * K;
      T* g_off = grad_raw + r * 3 * K;
      T* g_ref = grad_ref ? grad_ref + r * R : nullptr;
      if (g_ref) std::fill(g_ref, g_ref + R, T(0));
      for (int64_t m = 0; m < a.M; ++m) {
        softmax_backward(LP, T(1), attn + r * K + m * LP, grad_attn + r * K + m * LP,
                         g_off + 2 * K + m * LP);
        for (int64_t l = 0; l < a.L; ++l) {
          const T* rl = ref_r + l * a.ref_dim;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t i = 2 * ((m * a.L + l) * a.P + p);
            if (a.ref_dim == 2) {
              g_off[i] = gl[i] / T(a.level_w[l]);
              g_off[i + 1] = gl[i + 1] / T(a.level_h[l]);
            } else {
              // loc = ref_xy + offset / P * ref_wh * 0.5
              g_off[i] = gl[i] / T(a.P) * rl[2] * T(0.5);
              g_off[i + 1] = gl[i + 1] / T(a.P) * rl[3] * T(0.5);
            }
            if (!g_ref) continue;
            T* gr = g_ref + l * a.ref_dim;
            gr[0] += gl[i];
            gr[1] += gl[i + 1];
            if (a.ref_dim == 4) {
              gr[2] += gl[i] * off[i] / T(a.P) * T(0.5);
              gr[3] += gl[i + 1] * off[i + 1] / T(a.P) * T(0.5);
            }
          }
        }
      }
    }
  }

  void msda_forward(const MsdaShape& s, const T* value, const T* loc, const T* attn,
                    T* out) const {
    msda_forward_cpu<T>(s, value, loc, attn, out, threads);
  }

  size_t msda_backward_workspace_bytes(const MsdaShape&) const { return 0; }

  void msda_backward(const MsdaShape& s, const T* value, const T* loc, const T* attn,
                     const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, void*,
                     size_t) const {
    msda_backward_cpu<T>(s, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                         threads);
  }

  void softmax_rows(int64_t rows, int64_t cols, T scale, T* x) const {
#pragma omp parallel for num_threads(team(rows * cols * 4)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) softmax(cols, scale, x + r * cols, x + r * cols);
  }

  void softmax_rows_backward(int64_t rows, int64_t cols, T scale, const T* p, T* g) const {
#pragma omp parallel for num_threads(team(rows * cols)) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      softmax_backward(cols, scale, p + r * cols, g + r * cols, g + r * cols);
  }

 private:
  // out = softmax(scale * x) over n entries (out may alias x); the max is subtracted
  static void softmax(int64_t n, T scale, const T* x, T* out) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, scale * x[j]);
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = std::exp(scale * x[j] - mx);
      sum += out[j];
    }
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < n; ++j) out[j] *= inv;
  }

  // out = scale * p * (g - sum_j p_j g_j) (out may alias g)
  static void softmax_backward(int64_t n, T scale, const T* p, const T* g, T* out) {
    T dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += p[j] * g[j];
    for (int64_t j = 0; j < n; ++j) out[j] = scale * p[j] * (g[j] - dot);
  }

  // out[j] (+)= sum_r x[r, j] (* y[r, j]); each thread owns a range of columns and sums
  // its rows in order, in double
  void column_reduce(int64_t rows, int64_t cols, const T* x, const T* y, T* out,
                     bool accumulate) const {
    const int nt = std::max<int>(1, std::min<int64_t>(team(rows * cols), (cols + 15) / 16));
#pragma omp parallel num_threads(nt)
    {
      const auto [j0, j1] = thread_slice(cols, 16);
      std::vector<double> acc(size_t(j1 - j0), 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * cols + j0;
        const T* yr = y ? y + r * cols + j0 : nullptr;
        if (yr) {
#pragma omp simd
          for (int64_t j = 0; j < j1 - j0; ++j) acc[j] += double(xr[j]) * double(yr[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < j1 - j0; ++j) acc[j] += double(xr[j]);
        }
      }
      for (int64_t j = j0; j < j1; ++j)
        out[j] = T(accumulate ? double(out[j]) + acc[j - j0] : acc[j - j0]);
    }
  }
};

}  // namespace

size_t layer_workspace_bytes_cpu(const LayerShape& s, const LayerOptions& o, bool backward,
                                 int elem_bytes) {
  return layer_workspace_bytes(CpuOps<float>{0}, s, o, backward, elem_bytes);
}

template <class T>
void layer_forward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                       const LayerInputs<T>& in, T* out, const LayerSaved<T>& saved,
                       void* workspace, size_t workspace_bytes, int num_threads) {
  layer_forward(CpuOps<T>{num_threads}, s, o, w, in, out, saved, workspace, workspace_bytes);
}

template <class T>
void layer_backward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                        const LayerInputs<T>& in, const LayerSaved<T>& saved,
                        const T* grad_out, const LayerInputGrads<T>& grad_in,
                        const LayerParamGrads<T>& grad_w, void* workspace,
                        size_t workspace_bytes, int num_threads) {
  layer_backward(CpuOps<T>{num_threads}, s, o, w, in, saved, grad_out, grad_in, grad_w,
                 workspace, workspace_bytes);
}

#define DDETR_INSTANTIATE_LAYERS(T)                                                           \
  template void layer_forward_cpu<T>(const LayerShape&, const LayerOptions&,                   \
                                     const LayerParams<T>&, const LayerInputs<T>&, T*,         \
                                     const LayerSaved<T>&, void*, size_t, int);                \
  template void layer_backward_cpu<T>(const LayerShape&, const LayerOptions&,                  \
                                      const LayerParams<T>&, const LayerInputs<T>&,            \
                                      const LayerSaved<T>&, const T*,                          \
                                      const LayerInputGrads<T>&, const LayerParamGrads<T>&,    \
                                      void*, size_t, int);
DDETR_INSTANTIATE_LAYERS(float)
DDETR_INSTANTIATE_LAYERS(double)
#undef DDETR_INSTANTIATE_LAYERS

}  // namespace ddetr
