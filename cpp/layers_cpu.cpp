// CPU primitives of the native layers (ddetr/layer_ops.h) and the CPU entry points of
// ddetr/layers.h. GEMMs go to OpenBLAS (cpp/blas.cpp), MSDA and dropout to their CPU
// kernels; the rest are row-parallel loops written here.
//
// bfloat16: storage only; every primitive computes in float, and GEMMs go to gemm_bf16
// (cpp/gemm_bf16.cpp: AVX512-BF16 dot products accumulating in float, or, on CPUs
// without them, OpenBLAS's sgemm on panels widened from bf16).
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
#include <exception>
#include <limits>
#include <type_traits>
#include <vector>

namespace ddetr {
namespace {

constexpr int64_t kSerialBelow = int64_t(1) << 15;      // elements of a pass
constexpr int64_t kSerialBelowFlops = int64_t(1) << 22;  // multiply-adds of a GEMM batch
constexpr double kLayerNormEps = 1e-5;

template <class T> constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::f32 : DType::f64;
}

// Elements are read into A = Acc<T> and rounded back to T once (for float and double
// both conversions are the identity, so those loops compile as before).
template <class T> struct CpuOps {
  using A = Acc<T>;
  int threads;
  float* gemm_scratch = nullptr;  // bf16 only: kGemmBf16ScratchFloats floats
  static constexpr size_t kAlign = 64;
  static constexpr int64_t kBlockRows = kLayerBlockRows;
  // The forward runs its blocks side by side when there are this many per thread.
  static constexpr int64_t kBlocksPerThread = 4;

  int team(int64_t work) const { return resolve_threads(threads, work, kSerialBelow); }

  // float and double: a thread per block when the blocks are many (an 800x1333 image
  // has 11, enough for 2 threads); bf16 keeps whole-team blocks (its GEMM scratch is
  // 12 MB a thread).
  int block_slots(int64_t count) const {
    if (std::is_same<T, bf16>::value) return 1;
    const int nt = std::max(1, resolve_threads(threads, 1, 0));
    return count >= kBlocksPerThread * nt ? nt : 1;
  }

  // Each thread takes whole blocks (dynamically) and runs them on one-thread ops: one
  // parallel region for all the blocks instead of one per primitive per block, so a
  // thread that waits for its core (another process holds it) holds the others up once,
  // not at every primitive. Measured on 2 cores of a Zen 5 at 800x1333 (11 blocks):
  // the encoder layer's forward 176 -> 152 ms idle, 359 -> 220 ms beside a busy
  // process. Every primitive gives the same bits at any thread count, so the output
  // does too. With one slot the blocks run in order on the whole team.
  template <class Fn> void run_blocks(int64_t count, Fn&& fn) const {
    const int nt = block_slots(count);
    if (nt <= 1) {
      for (int64_t i = 0; i < count; ++i) fn(i, 0, *this);
      return;
    }
    std::exception_ptr error;
#pragma omp parallel num_threads(nt)
    {
      CpuOps one = *this;
      one.threads = 1;
      const int slot = thread_index();
#pragma omp for DDETR_SHARE_ITEMS
      for (int64_t i = 0; i < count; ++i) {
        try {
          fn(i, slot, one);
        } catch (...) {
#pragma omp critical(ddetr_run_blocks)
          if (!error) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
  }

  template <class U>
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
            const T* b, int64_t ldb, A beta, U* c, int64_t ldc, const T* bias, bool relu) const {
    const GemmArgs g = gemm_args(ta, tb, M, N, K, a, lda, b, ldb, double(beta), c, ldc, bias,
                                 relu);
    if constexpr (std::is_same<T, bf16>::value)
      gemm_bf16(g, std::is_same<U, float>::value, threads, gemm_scratch);
    else
      ddetr::gemm(dtype_of<T>(), g, threads);
  }

  // bf16: one GEMM after another, each on the whole team (they share the scratch)
  template <class U>
  void gemm_batched(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                    int64_t sa, const T* b, int64_t ldb, int64_t sb, A beta, U* c, int64_t ldc,
                    int64_t sc, int64_t batch) const {
    if constexpr (std::is_same<T, bf16>::value) {
      for (int64_t i = 0; i < batch; ++i)
        gemm(ta, tb, M, N, K, a + i * sa, lda, b + i * sb, ldb, beta, c + i * sc, ldc,
             static_cast<const T*>(nullptr), false);
    } else {
      const int nt = resolve_threads(threads, batch * M * N * K, kSerialBelowFlops);
#pragma omp parallel for num_threads(nt) DDETR_SHARE_ITEMS
      for (int64_t i = 0; i < batch; ++i)
        ddetr::gemm(dtype_of<T>(),
                    gemm_args(ta, tb, M, N, K, a + i * sa, lda, b + i * sb, ldb, double(beta),
                              c + i * sc, ldc),
                    1);
    }
  }

  template <class U> void add(int64_t n, const U* a, const U* b, U* out) const {
#pragma omp parallel for simd num_threads(team(n)) DDETR_SHARE_ELEMENTS
    for (int64_t i = 0; i < n; ++i) out[i] = from_acc<U>(to_acc(a[i]) + to_acc(b[i]));
  }

  template <class U> void fill_zero(int64_t n, U* x) const {
    const U zero = from_acc<U>(Acc<U>(0));
#pragma omp parallel for simd num_threads(team(n)) DDETR_SHARE_ELEMENTS
    for (int64_t i = 0; i < n; ++i) x[i] = zero;
  }

  void fill(int64_t n, A value, T* x) const {
    const T v = from_acc<T>(value);
#pragma omp parallel for simd num_threads(team(n)) DDETR_SHARE_ELEMENTS
    for (int64_t i = 0; i < n; ++i) x[i] = v;
  }

  template <class U>
  void copy_rows(int64_t rows, int64_t cols, const U* x, int64_t ldx, U* out,
                 int64_t ldo) const {
#pragma omp parallel for num_threads(team(rows * cols)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r) std::copy(x + r * ldx, x + r * ldx + cols, out + r * ldo);
  }

  template <class U>
  void mask_rows(int64_t rows, int64_t cols, const uint8_t* mask, U* x) const {
    const U zero = from_acc<U>(Acc<U>(0));
#pragma omp parallel for num_threads(team(rows * cols)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r)
      if (mask[r]) std::fill(x + r * cols, x + (r + 1) * cols, zero);
  }

  void to_storage(int64_t n, const A* x, T* out) const {
#pragma omp parallel for simd num_threads(team(n)) DDETR_SHARE_ELEMENTS
    for (int64_t i = 0; i < n; ++i) out[i] = from_acc<T>(x[i]);
  }

  template <class U> void dropout(const DropoutArgs& a, const U* x, U* out, bool relu) const {
    dropout_cpu<U>(a, x, out, relu, threads);
  }

  void relu_dropout_backward(const DropoutArgs& a, const T* out, const T* grad_out,
                             T* grad_x) const {
    relu_dropout_backward_cpu<T>(a, out, grad_out, grad_x, threads);
  }

  // y may alias base or branch: both are read in full before y is written
  void add_layernorm(int64_t rows, int64_t C, const T* base, const T* branch, const T* gamma,
                     const T* beta, T* y, T* xhat, T* rstd) const {
#pragma omp parallel for num_threads(team(rows * C)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r) {
      const T* b0 = base + r * C;
      const T* b1 = branch + r * C;
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < C; ++j) sum += to_acc(b0[j]) + to_acc(b1[j]);
      const A mean = sum / A(C);
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < C; ++j) {
        const A x = to_acc(b0[j]) + to_acc(b1[j]) - mean;
        sq += x * x;
      }
      const A rs = A(1) / std::sqrt(sq / A(C) + A(kLayerNormEps));
      T* yr = y + r * C;
      T* xr = xhat ? xhat + r * C : nullptr;
      for (int64_t j = 0; j < C; ++j) {
        const A xh = (to_acc(b0[j]) + to_acc(b1[j]) - mean) * rs;
        if (xr) xr[j] = from_acc<T>(xh);
        yr[j] = from_acc<T>(xh * to_acc(gamma[j]) + to_acc(beta[j]));
      }
      if (rstd) rstd[r] = from_acc<T>(rs);
    }
  }

  void layernorm_apply(int64_t rows, int64_t C, const T* xhat, const T* gamma, const T* beta,
                       T* y) const {
#pragma omp parallel for num_threads(team(rows * C)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        y[r * C + j] = from_acc<T>(to_acc(xhat[r * C + j]) * to_acc(gamma[j]) + to_acc(beta[j]));
    }
  }

  void layernorm_backward(int64_t rows, int64_t C, const T* dy, const T* xhat, const T* rstd,
                          const T* gamma, T* dx) const {
#pragma omp parallel for num_threads(team(rows * C)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r) {
      const T* dr = dy + r * C;
      const T* xr = xhat + r * C;
      A sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < C; ++j) {
        const A g = to_acc(dr[j]) * to_acc(gamma[j]);
        sg += g;
        sgx += g * to_acc(xr[j]);
      }
      const A mg = sg / A(C), mgx = sgx / A(C), rs = to_acc(rstd[r]);
      T* out = dx + r * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        out[j] = from_acc<T>(rs * (to_acc(dr[j]) * to_acc(gamma[j]) - mg - to_acc(xr[j]) * mgx));
    }
  }

  template <class U>
  void column_sums(int64_t rows, int64_t cols, const T* x, U* out, bool accumulate) const {
    column_reduce(rows, cols, x, static_cast<const T*>(nullptr), out, accumulate);
  }

  template <class U>
  void column_dots(int64_t rows, int64_t cols, const T* x, const T* y, U* out,
                   bool accumulate) const {
    column_reduce(rows, cols, x, y, out, accumulate);
  }

  void sampling_forward(const SamplingArgs& a, const T* raw, const A* ref, A* loc,
                        A* attn) const {
    const int64_t K = a.M * a.L * a.P, LP = a.L * a.P;
#pragma omp parallel for num_threads(team(a.rows * K * 8)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* off = raw + r * 3 * K;
      const A* ref_r = ref + r * a.L * a.ref_dim;
      A* loc_r = loc + r * 2 * K;
      for (int64_t m = 0; m < a.M; ++m) {
        softmax(LP, A(1), off + 2 * K + m * LP, attn + r * K + m * LP);
        for (int64_t l = 0; l < a.L; ++l) {
          const A* rl = ref_r + l * a.ref_dim;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t i = 2 * ((m * a.L + l) * a.P + p);
            const A ox = to_acc(off[i]), oy = to_acc(off[i + 1]);
            if (a.ref_dim == 2) {
              loc_r[i] = to_acc(rl[0]) + ox / A(a.level_w[l]);
              loc_r[i + 1] = to_acc(rl[1]) + oy / A(a.level_h[l]);
            } else {
              loc_r[i] = to_acc(rl[0]) + ox / A(a.P) * to_acc(rl[2]) * A(0.5);
              loc_r[i + 1] = to_acc(rl[1]) + oy / A(a.P) * to_acc(rl[3]) * A(0.5);
            }
          }
        }
      }
    }
  }

  void sampling_backward(const SamplingArgs& a, const T* raw, const A* ref, const A* attn,
                         const A* grad_loc, const A* grad_attn, T* grad_raw, A* grad_ref) const {
    const int64_t K = a.M * a.L * a.P, LP = a.L * a.P, R = a.L * a.ref_dim;
#pragma omp parallel for num_threads(team(a.rows * K * 8)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* off = raw + r * 3 * K;
      const A* ref_r = ref + r * R;
      const A* gl = grad_loc + r * 2 * K;
      T* g_off = grad_raw + r * 3 * K;
      A g_ref[kMaxLevels * 4] = {};  // summed over (m, p)
      for (int64_t m = 0; m < a.M; ++m) {
        softmax_backward(LP, A(1), attn + r * K + m * LP, grad_attn + r * K + m * LP,
                         g_off + 2 * K + m * LP);
        for (int64_t l = 0; l < a.L; ++l) {
          const A* rl = ref_r + l * a.ref_dim;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t i = 2 * ((m * a.L + l) * a.P + p);
            if (a.ref_dim == 2) {
              g_off[i] = from_acc<T>(gl[i] / A(a.level_w[l]));
              g_off[i + 1] = from_acc<T>(gl[i + 1] / A(a.level_h[l]));
            } else {
              // loc = ref_xy + offset / P * ref_wh * 0.5
              g_off[i] = from_acc<T>(gl[i] / A(a.P) * to_acc(rl[2]) * A(0.5));
              g_off[i + 1] = from_acc<T>(gl[i + 1] / A(a.P) * to_acc(rl[3]) * A(0.5));
            }
            A* gr = g_ref + l * a.ref_dim;
            gr[0] += gl[i];
            gr[1] += gl[i + 1];
            if (a.ref_dim == 4) {
              gr[2] += gl[i] * to_acc(off[i]) / A(a.P) * A(0.5);
              gr[3] += gl[i + 1] * to_acc(off[i + 1]) / A(a.P) * A(0.5);
            }
          }
        }
      }
      if (grad_ref)
        std::copy(g_ref, g_ref + R, grad_ref + r * R);
    }
  }

  void msda_forward(const MsdaShape& s, const T* value, const A* loc, const A* attn,
                    T* out) const {
    msda_forward_cpu<T>(s, value, loc, attn, out, threads);
  }

  size_t msda_backward_workspace_bytes(const MsdaShape&) const { return 0; }

  void msda_backward(const MsdaShape& s, const T* value, const A* loc, const A* attn,
                     const T* grad_out, A* grad_value, A* grad_loc, A* grad_attn, void*,
                     size_t, T* out) const {
    msda_backward_cpu<T>(s, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                         threads, out);
  }

  template <class U> void softmax_rows(int64_t rows, int64_t cols, A scale, const U* x,
                                       T* out) const {
#pragma omp parallel for num_threads(team(rows * cols * 4)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r) softmax(cols, scale, x + r * cols, out + r * cols);
  }

  template <class U>
  void softmax_rows_backward(int64_t rows, int64_t cols, A scale, const T* p, const U* g,
                             T* out) const {
#pragma omp parallel for num_threads(team(rows * cols)) DDETR_SHARE_ROWS
    for (int64_t r = 0; r < rows; ++r)
      softmax_backward(cols, scale, p + r * cols, g + r * cols, out + r * cols);
  }

 private:
  // out = softmax(scale * x) over n entries (out may alias x); the max is subtracted.
  // An out in A keeps the exponentials between the passes; a bf16 out gets them computed
  // again instead, so it is rounded once. Masked entries (-inf, as DINO's denoising mask
  // makes two thirds of them) are 0 without calling exp: the same value, exp(-inf) = 0.
  template <class In, class Out> static void softmax(int64_t n, A scale, const In* x, Out* out) {
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, scale * to_acc(x[j]));
    const auto e = [&](int64_t j) {
      const A v = scale * to_acc(x[j]);
      return v == -std::numeric_limits<A>::infinity() ? A(0) : A(std::exp(v - mx));
    };
    A sum = 0;
    if constexpr (std::is_same<Out, A>::value) {
      for (int64_t j = 0; j < n; ++j) {
        out[j] = e(j);
        sum += out[j];
      }
      const A inv = A(1) / sum;
      for (int64_t j = 0; j < n; ++j) out[j] *= inv;
    } else {
      for (int64_t j = 0; j < n; ++j) sum += e(j);
      const A inv = A(1) / sum;
      for (int64_t j = 0; j < n; ++j) out[j] = from_acc<Out>(e(j) * inv);
    }
  }

  // out = scale * p * (g - sum_j p_j g_j) (out may alias g)
  template <class P, class G, class Out>
  static void softmax_backward(int64_t n, A scale, const P* p, const G* g, Out* out) {
    A dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += to_acc(p[j]) * to_acc(g[j]);
    for (int64_t j = 0; j < n; ++j)
      out[j] = from_acc<Out>(scale * to_acc(p[j]) * (to_acc(g[j]) - dot));
  }

  // out[j] (+)= sum_r x[r, j] (* y[r, j]); each thread owns a range of columns and sums
  // its rows in order, in double
  template <class U>
  void column_reduce(int64_t rows, int64_t cols, const T* x, const T* y, U* out,
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
          for (int64_t j = 0; j < j1 - j0; ++j)
            acc[j] += double(to_acc(xr[j])) * double(to_acc(yr[j]));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < j1 - j0; ++j) acc[j] += double(to_acc(xr[j]));
        }
      }
      for (int64_t j = j0; j < j1; ++j)
        out[j] = from_acc<U>(
            Acc<U>(accumulate ? double(to_acc(out[j])) + acc[j - j0] : acc[j - j0]));
    }
  }
};

}  // namespace

// bf16 passes take the GEMM scratch (ddetr/blas.h, kGemmBf16ScratchBytes) from the front
// of their workspace.

size_t layer_workspace_bytes_cpu(const LayerShape& s, const LayerOptions& o, bool backward,
                                 int elem_bytes, int num_threads) {
  if (elem_bytes == 2)
    return layer_workspace_bytes(CpuOps<bf16>{num_threads}, s, o, backward, elem_bytes) +
           kGemmBf16ScratchBytes;
  if (elem_bytes == 8)
    return layer_workspace_bytes(CpuOps<double>{num_threads}, s, o, backward, elem_bytes);
  return layer_workspace_bytes(CpuOps<float>{num_threads}, s, o, backward, elem_bytes);
}

namespace {

// The ops of a pass, and the workspace left to the driver.
template <class T> CpuOps<T> cpu_ops(int num_threads, void*& workspace, size_t& bytes) {
  CpuOps<T> ops{num_threads};
  if constexpr (std::is_same<T, bf16>::value) {
    if (bytes < kGemmBf16ScratchBytes)
      throw std::invalid_argument("workspace: too small for the bfloat16 GEMM scratch");
    ops.gemm_scratch = static_cast<float*>(workspace);
    workspace = static_cast<char*>(workspace) + kGemmBf16ScratchBytes;
    bytes -= kGemmBf16ScratchBytes;
  }
  return ops;
}

}  // namespace

template <class T>
void layer_forward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                       const LayerInputs<T>& in, T* out, const LayerSaved<T>& saved,
                       void* workspace, size_t workspace_bytes, int num_threads) {
  const CpuOps<T> ops = cpu_ops<T>(num_threads, workspace, workspace_bytes);
  layer_forward(ops, {s, o, w, in, saved}, out, workspace, workspace_bytes);
}

template <class T>
void layer_backward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                        const LayerInputs<T>& in, const LayerSaved<T>& saved,
                        const T* grad_out, const LayerInputGrads<T>& grad_in,
                        const LayerParamGrads<T>& grad_w, void* workspace,
                        size_t workspace_bytes, int num_threads) {
  const CpuOps<T> ops = cpu_ops<T>(num_threads, workspace, workspace_bytes);
  layer_backward(ops, {s, o, w, in, saved}, grad_out, grad_in, grad_w, workspace,
                 workspace_bytes);
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
DDETR_INSTANTIATE_LAYERS(bf16)
#undef DDETR_INSTANTIATE_LAYERS

}  // namespace ddetr
