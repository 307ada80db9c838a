// CudaOps<T>: the primitives of ddetr/layer_ops.h on CUDA, which the layer driver
// (ddetr/layer_driver.h) runs the encoder and decoder layers on. Included by
// cuda/layers.cu only, which also holds the cuBLAS loader that `gemm` goes through.
//
// Types: T (float, double or bf16) is the storage type of activations, weights and their
// gradients; A = Acc<T> (float for float and bf16, double for double) is what every
// kernel computes in. Each element is read into A (to_acc), and each result is rounded
// once to the type of its buffer (from_acc); for float and double both are the identity.
// The reference points, MSDA's sampling locations and weights, their gradients and the
// gradients of the sampled maps are A buffers; a few primitives also take U = T or A
// (the GEMM's C and the column sums for bf16's parameter-gradient accumulators, the
// softmax's input for bf16's attention scores). Every reduction accumulates in A.
//
// Math: as layer_ops.h states it.
//   LayerNorm     x = base + branch, mean, var = mean((x - mean)^2) (two passes),
//                 rstd = 1 / sqrt(var + 1e-5), xhat = (x - mean) rstd, y = xhat gamma + beta
//   LN backward   g = dy gamma, dx = rstd (g - mean(g) - xhat mean(g xhat))
//   softmax       p = exp(s x - max(s x)) / sum, backward g <- s p (g - sum p g)
//   sampling      loc = ref + offset / (W_l, H_l)               (ref_dim 2)
//                     = ref_xy + offset / P * ref_wh * 0.5      (ref_dim 4)
//                 attn = softmax over the L*P logits of one (row, head)
//   its backward  d offset = d loc / (W_l, H_l)  or  d loc * ref_wh * 0.5 / P,
//                 d ref_xy = sum over (m, p) of d loc, d ref_wh = sum of d loc * offset / P * 0.5,
//                 d logit = attn (d attn - sum attn d attn)
//   GEMM          cuBLAS (bf16 through cublasGemmEx, accumulating in float), then the
//                 bias / ReLU epilogue. For bf16 the bias goes into C first (C = beta C +
//                 bias: exact for beta = 0, the only beta the layers give with a bias) and
//                 cuBLAS adds the product to it (beta = 1), so C is rounded to bf16 once,
//                 not after the product and again after the bias. ReLU commutes with
//                 rounding, so applying it afterwards loses nothing.
//
// Layout: matrices row-major; rows contiguous of length C / cols unless a leading
// dimension is given (GEMMs only). raw is (rows, 3K) with K = M*L*P: columns [0, 2K) the
// offsets (M, L, P, 2), [2K, 3K) the logits (M, L, P). loc (rows, M, L, P, 2), attn
// (rows, M, L, P), ref (rows, L, ref_dim): A. Flat indices are int64 throughout.
//
// Thread mapping (kBlock = 256 threads a block unless stated; every kernel walks its work
// with a grid stride, so no size runs into the grid limit):
//   elementwise (add, mask_rows, to_storage, layernorm_apply, GEMM epilogue): one thread
//     per element.
//   row kernels (LayerNorm and its backward, softmax_rows and its backward): one warp
//     per row, lane t on columns t, t + 32, ...; the row reductions are xor-shuffle
//     butterflies, which leave the same bits in every lane and add in a fixed order.
//   column_sums / column_dots: one block of 512 threads per tile of 32 bytes of columns
//     (16 bf16s, 8 floats or 4 doubles: one memory sector of each row), 512 / tile
//     threads per column taking its rows cyclically; the partial sums meet in shared
//     memory and are added pairwise in a fixed tree. Fixed order everywhere: the same bits
//     on every run.
//   sampling: one thread per sample (row, m, l, p) for loc / d offset, one thread per
//     (row, m) for the softmax over L*P and its backward, one thread per (row, l) for
//     grad_ref, summing over (m, p) in order.
// Atomics: none here. The only ones a layer pass can run are inside the fast
// (deterministic = false) MSDA backward, cuda/msda_backward.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "ddetr/dropout.h"
#include "ddetr/layer_ops.h"
#include "ddetr/msda.h"
#include "msda_common.cuh"

namespace ddetr {
namespace cuda_detail {

// ------------------------------------------------------------------ cuBLAS (layers.cu)

// One row-major GEMM, or `batch` of them at strides sa / sb / sc elements:
// C = op(A) op(B) + beta C, A and B in T, C in U (T or Acc<T>). Sizes are checked against
// cuBLAS's int by the callee.
template <class T, class U> struct GemmCall {
  bool ta, tb;
  int64_t M, N, K;
  const T* A;
  int64_t lda, sa;
  const T* B;
  int64_t ldb, sb;
  Acc<T> beta;
  U* C;
  int64_t ldc, sc, batch;
  bool strided;  // the strided-batched cuBLAS call rather than the plain one
};

// On `stream` with the handle of `device` (the current device); K >= 1, M, N >= 1.
// bf16 throws std::runtime_error when the loaded cuBLAS lacks cublasGemmEx.
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<float, float>& g);
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<double, double>& g);
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<bf16, bf16>& g);
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<bf16, float>& g);

// ------------------------------------------------------------------ device helpers

// U is an element type CudaOps<T> takes for its templated members: T or Acc<T>.
template <class T, class U>
constexpr bool kElementOf = std::is_same<U, T>::value || std::is_same<U, Acc<T>>::value;

template <class T> DDETR_HD T zero() { return from_acc<T>(Acc<T>(0)); }

__device__ __forceinline__ int64_t thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() { return int64_t(gridDim.x) * blockDim.x; }
// The warp kernels run kBlock-thread blocks, a multiple of the warp size, so a warp's
// lanes share one row and every lane takes part in the shuffles.
__device__ __forceinline__ int64_t warp_index() { return thread_index() / kWarp; }
__device__ __forceinline__ int64_t warp_stride() { return thread_stride() / kWarp; }
__device__ __forceinline__ int lane_index() { return int(threadIdx.x) & (kWarp - 1); }

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }
__device__ __forceinline__ float sqrt_t(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_t(double x) { return sqrt(x); }

// max that lets a NaN win, so a NaN row gives NaN in every lane (as torch's softmax),
// rather than a lane-dependent answer.
template <class A> __device__ __forceinline__ A max_nan(A a, A b) {
  return (b > a || b != b) ? b : a;
}

template <class A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------ elementwise kernels

template <class U> __global__ void add_kernel(int64_t n, const U* a, const U* b, U* out) {
  for (int64_t i = thread_index(); i < n; i += thread_stride())
    out[i] = from_acc<U>(to_acc(a[i]) + to_acc(b[i]));
}

template <class T> __global__ void fill_kernel(int64_t n, T value, T* x) {
  for (int64_t i = thread_index(); i < n; i += thread_stride()) x[i] = value;
}

template <class T>
__global__ void to_storage_kernel(int64_t n, const Acc<T>* __restrict__ x, T* __restrict__ out) {
  for (int64_t i = thread_index(); i < n; i += thread_stride()) out[i] = from_acc<T>(x[i]);
}

template <class U>
__global__ void copy_rows_kernel(int64_t rows, int64_t cols, const U* __restrict__ x,
                                 int64_t ldx, U* __restrict__ out, int64_t ldo) {
  const int64_t n = rows * cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t r = i / cols, c = i - r * cols;
    out[r * ldo + c] = x[r * ldx + c];
  }
}

template <class U>
__global__ void mask_rows_kernel(int64_t rows, int64_t cols, const uint8_t* __restrict__ mask,
                                 U* __restrict__ x) {
  const int64_t n = rows * cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride())
    if (mask[i / cols] != 0) x[i] = zero<U>();
}

// C = (scale_c ? beta C : C) + bias[n], then ReLU. After cuBLAS (scale_c false), instead
// of it when K = 0 (scale_c true: C = beta C), or before a bf16 cuBLAS call (scale_c
// true, no ReLU: C = beta C + bias, to which cuBLAS then adds the product).
// ReLU sends NaN to 0, as the CPU epilogue (cpp/blas.cpp) does.
template <class T, class U>
__global__ void gemm_epilogue_kernel(int64_t M, int64_t N, int64_t batch, U* C, int64_t ldc,
                                     int64_t sc, bool scale_c, Acc<T> beta,
                                     const T* __restrict__ bias, bool relu) {
  using A = Acc<T>;
  const int64_t per = M * N, n_all = per * batch;
  for (int64_t i = thread_index(); i < n_all; i += thread_stride()) {
    const int64_t b = i / per, mn = i - b * per, m = mn / N, n = mn - m * N;
    U* c = C + b * sc + m * ldc + n;
    // beta = 0 must not read C (it may be uninitialised), as in BLAS
    A v = scale_c ? (beta == A(0) ? A(0) : beta * to_acc(*c)) : to_acc(*c);
    if (bias != nullptr) v += to_acc(bias[n]);
    if (relu && !(v > A(0))) v = A(0);
    *c = from_acc<U>(v);
  }
}

template <class T>
__global__ void layernorm_apply_kernel(int64_t rows, int64_t C, const T* __restrict__ xhat,
                                       const T* __restrict__ gamma, const T* __restrict__ beta,
                                       T* __restrict__ y) {
  const int64_t n = rows * C;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t c = i % C;
    y[i] = from_acc<T>(to_acc(xhat[i]) * to_acc(gamma[c]) + to_acc(beta[c]));
  }
}

// ------------------------------------------------------------------ row kernels (warp per row)

// y may alias base or branch: every pass reads element c in the lane that later writes
// it, and the last pass reads it before writing, so no __restrict__ on those three.
template <class T>
__global__ void add_layernorm_kernel(int64_t rows, int64_t C, const T* base, const T* branch,
                                     const T* __restrict__ gamma, const T* __restrict__ beta,
                                     T* y, T* __restrict__ xhat, T* __restrict__ rstd) {
  using A = Acc<T>;
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* b0 = base + r * C;
    const T* b1 = branch + r * C;
    A sum = A(0);
    for (int64_t c = lane; c < C; c += kWarp) sum += to_acc(b0[c]) + to_acc(b1[c]);
    const A mean = warp_sum(sum) / A(C);
    A sq = A(0);
    for (int64_t c = lane; c < C; c += kWarp) {
      const A d = (to_acc(b0[c]) + to_acc(b1[c])) - mean;
      sq += d * d;
    }
    const A rs = A(1) / sqrt_t(warp_sum(sq) / A(C) + A(1e-5));
    T* yr = y + r * C;
    T* hr = xhat ? xhat + r * C : nullptr;
    for (int64_t c = lane; c < C; c += kWarp) {
      const A h = ((to_acc(b0[c]) + to_acc(b1[c])) - mean) * rs;
      if (hr) hr[c] = from_acc<T>(h);
      yr[c] = from_acc<T>(h * to_acc(gamma[c]) + to_acc(beta[c]));
    }
    if (rstd && lane == 0) rstd[r] = from_acc<T>(rs);
  }
}

// dx may alias dy (same argument as above).
template <class T>
__global__ void layernorm_backward_kernel(int64_t rows, int64_t C, const T* dy,
                                          const T* __restrict__ xhat,
                                          const T* __restrict__ rstd,
                                          const T* __restrict__ gamma, T* dx) {
  using A = Acc<T>;
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* dyr = dy + r * C;
    const T* hr = xhat + r * C;
    A sg = A(0), sgh = A(0);
    for (int64_t c = lane; c < C; c += kWarp) {
      const A g = to_acc(dyr[c]) * to_acc(gamma[c]);
      sg += g;
      sgh += g * to_acc(hr[c]);
    }
    const A mean_g = warp_sum(sg) / A(C);
    const A mean_gh = warp_sum(sgh) / A(C);
    const A rs = to_acc(rstd[r]);
    T* dxr = dx + r * C;
    for (int64_t c = lane; c < C; c += kWarp)
      dxr[c] = from_acc<T>(rs * ((to_acc(dyr[c]) * to_acc(gamma[c]) - mean_g) -
                                 to_acc(hr[c]) * mean_gh));
  }
}

// out may alias x (when U is T): each lane reads x[c] before it writes out[c]. The last
// pass recomputes exp(.) from x rather than keeping it between passes, so the
// probability is rounded to T once.
template <class T, class U>
__global__ void softmax_rows_kernel(int64_t rows, int64_t cols, Acc<T> scale, const U* x,
                                    T* out) {
  using A = Acc<T>;
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const U* xr = x + r * cols;
    T* yr = out + r * cols;
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t c = lane; c < cols; c += kWarp) mx = max_nan(mx, scale * to_acc(xr[c]));
    mx = warp_max(mx);
    A sum = A(0);
    for (int64_t c = lane; c < cols; c += kWarp) sum += exp_t(scale * to_acc(xr[c]) - mx);
    sum = warp_sum(sum);
    for (int64_t c = lane; c < cols; c += kWarp)
      yr[c] = from_acc<T>(exp_t(scale * to_acc(xr[c]) - mx) / sum);
  }
}

// out may alias g (when U is T), by the same argument; not p.
template <class T, class U>
__global__ void softmax_rows_backward_kernel(int64_t rows, int64_t cols, Acc<T> scale,
                                             const T* __restrict__ p, const U* g, T* out) {
  using A = Acc<T>;
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* pr = p + r * cols;
    const U* gr = g + r * cols;
    T* yr = out + r * cols;
    A dot = A(0);
    for (int64_t c = lane; c < cols; c += kWarp) dot += to_acc(pr[c]) * to_acc(gr[c]);
    dot = warp_sum(dot);
    for (int64_t c = lane; c < cols; c += kWarp)
      yr[c] = from_acc<T>(scale * to_acc(pr[c]) * (to_acc(gr[c]) - dot));
  }
}

// ------------------------------------------------------------------ column reductions

template <class T> struct ColumnTile {
  static constexpr int kThreads = 512;
  static constexpr int kCols = 32 / int(sizeof(T));   // one 32-byte sector of a row
  static constexpr int kGroups = kThreads / kCols;    // threads per column, a power of two
};

// out[j] (+)= sum_r x[r, j] (kDot: x[r, j] * y[r, j]); x, y in T, out in U (T or
// Acc<T>). Thread (g, t) of a block sums rows g, g + kGroups, ... of column
// tile * kCols + t; the kGroups partials of a column are then added pairwise in shared
// memory (g += g + half, half = kGroups / 2, ..., 1).
template <class T, class U, bool kDot>
__global__ void __launch_bounds__(ColumnTile<T>::kThreads)
    column_reduce_kernel(int64_t rows, int64_t cols, const T* __restrict__ x,
                         const T* __restrict__ y, U* __restrict__ out, bool accumulate) {
  using A = Acc<T>;
  constexpr int kCols = ColumnTile<T>::kCols, kGroups = ColumnTile<T>::kGroups;
  __shared__ A partial[kGroups][kCols];
  const int t = int(threadIdx.x) % kCols, g = int(threadIdx.x) / kCols;
  const int64_t tiles = (cols + kCols - 1) / kCols;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t j = tile * kCols + t;
    A acc = A(0);
    if (j < cols) {
#pragma unroll 4
      for (int64_t r = g; r < rows; r += kGroups) {
        const int64_t i = r * cols + j;
        if constexpr (kDot) acc += to_acc(x[i]) * to_acc(y[i]);
        else acc += to_acc(x[i]);
      }
    }
    partial[g][t] = acc;
    __syncthreads();
    for (int half = kGroups / 2; half > 0; half /= 2) {
      if (g < half) partial[g][t] += partial[g + half][t];
      __syncthreads();
    }
    if (g == 0 && j < cols)
      out[j] = from_acc<U>(accumulate ? to_acc(out[j]) + partial[0][t] : partial[0][t]);
    __syncthreads();  // partial is refilled by the next tile
  }
}

// ------------------------------------------------------------------ sampling kernels

// Sample i = (row, k) with k = (m L + l) P + p: its offset pair is raw[row, 2k .. 2k+1],
// its location loc[2i .. 2i+1], its level l = (k / P) % L.
template <class T>
__global__ void sampling_loc_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                    const Acc<T>* __restrict__ ref, Acc<T>* __restrict__ loc) {
  using A = Acc<T>;
  const int64_t K = a.M * a.L * a.P, n = a.rows * K;
  const A P = A(a.P);
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t row = i / K, k = i - row * K, l = (k / a.P) % a.L;
    const A ox = to_acc(raw[row * 3 * K + 2 * k]), oy = to_acc(raw[row * 3 * K + 2 * k + 1]);
    const A* rf = ref + (row * a.L + l) * a.ref_dim;
    if (a.ref_dim == 2) {
      loc[2 * i] = rf[0] + ox / A(a.level_w[l]);
      loc[2 * i + 1] = rf[1] + oy / A(a.level_h[l]);
    } else {
      loc[2 * i] = rf[0] + ox / P * rf[2] * A(0.5);
      loc[2 * i + 1] = rf[1] + oy / P * rf[3] * A(0.5);
    }
  }
}

// Head j = (row, m): logits raw[row, 2K + m LP ...], weights attn[j LP ...].
template <class T>
__global__ void sampling_softmax_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                        Acc<T>* __restrict__ attn) {
  using A = Acc<T>;
  const int64_t LP = a.L * a.P, K = a.M * LP, heads = a.rows * a.M;
  for (int64_t j = thread_index(); j < heads; j += thread_stride()) {
    const int64_t row = j / a.M, m = j - row * a.M;
    const T* logit = raw + row * 3 * K + 2 * K + m * LP;
    A* w = attn + j * LP;
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t i = 0; i < LP; ++i) mx = max_nan(mx, to_acc(logit[i]));
    A sum = A(0);
    for (int64_t i = 0; i < LP; ++i) {
      const A e = exp_t(to_acc(logit[i]) - mx);
      w[i] = e;
      sum += e;
    }
    for (int64_t i = 0; i < LP; ++i) w[i] = w[i] / sum;
  }
}

// The offset columns of grad_raw (same sample indexing as sampling_loc_kernel).
template <class T>
__global__ void sampling_grad_offset_kernel(const SamplingArgs a,
                                            const Acc<T>* __restrict__ ref,
                                            const Acc<T>* __restrict__ grad_loc,
                                            T* __restrict__ grad_raw) {
  using A = Acc<T>;
  const int64_t K = a.M * a.L * a.P, n = a.rows * K;
  const A P = A(a.P);
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t row = i / K, k = i - row * K, l = (k / a.P) % a.L;
    const A gx = grad_loc[2 * i], gy = grad_loc[2 * i + 1];
    T* gr = grad_raw + row * 3 * K + 2 * k;
    if (a.ref_dim == 2) {
      gr[0] = from_acc<T>(gx / A(a.level_w[l]));
      gr[1] = from_acc<T>(gy / A(a.level_h[l]));
    } else {
      const A* rf = ref + (row * a.L + l) * a.ref_dim;
      gr[0] = from_acc<T>(gx * rf[2] * A(0.5) / P);
      gr[1] = from_acc<T>(gy * rf[3] * A(0.5) / P);
    }
  }
}

// The logit columns of grad_raw: the softmax backward of one (row, m).
template <class T>
__global__ void sampling_grad_logit_kernel(const SamplingArgs a,
                                           const Acc<T>* __restrict__ attn,
                                           const Acc<T>* __restrict__ grad_attn,
                                           T* __restrict__ grad_raw) {
  using A = Acc<T>;
  const int64_t LP = a.L * a.P, K = a.M * LP, heads = a.rows * a.M;
  for (int64_t j = thread_index(); j < heads; j += thread_stride()) {
    const int64_t row = j / a.M, m = j - row * a.M;
    const A* w = attn + j * LP;
    const A* gw = grad_attn + j * LP;
    A dot = A(0);
    for (int64_t i = 0; i < LP; ++i) dot += w[i] * gw[i];
    T* gl = grad_raw + row * 3 * K + 2 * K + m * LP;
    for (int64_t i = 0; i < LP; ++i) gl[i] = from_acc<T>(w[i] * (gw[i] - dot));
  }
}

// grad_ref[row, l, :] over (m, p) in order; one thread per (row, l), no atomics.
template <class T>
__global__ void sampling_grad_ref_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                         const Acc<T>* __restrict__ grad_loc,
                                         Acc<T>* __restrict__ grad_ref) {
  using A = Acc<T>;
  const int64_t K = a.M * a.L * a.P, n = a.rows * a.L;
  const A P = A(a.P);
  const bool box = a.ref_dim == 4;
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    const int64_t row = j / a.L, l = j - row * a.L;
    A sx = A(0), sy = A(0), sw = A(0), sh = A(0);
    for (int64_t m = 0; m < a.M; ++m) {
      for (int64_t p = 0; p < a.P; ++p) {
        const int64_t k = (m * a.L + l) * a.P + p, i = row * K + k;
        const A gx = grad_loc[2 * i], gy = grad_loc[2 * i + 1];
        sx += gx;
        sy += gy;
        if (box) {
          sw += gx * to_acc(raw[row * 3 * K + 2 * k]) / P * A(0.5);
          sh += gy * to_acc(raw[row * 3 * K + 2 * k + 1]) / P * A(0.5);
        }
      }
    }
    A* gr = grad_ref + j * a.ref_dim;
    gr[0] = sx;
    gr[1] = sy;
    if (box) {
      gr[2] = sw;
      gr[3] = sh;
    }
  }
}

// ------------------------------------------------------------------ host helpers

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }

inline size_t align_bytes(size_t bytes, size_t align) {
  return (bytes + align - 1) / align * align;
}

// Launches `kernel` for `work` items at `per_block` items a block of `threads` threads
// (nothing when there is no work); the kernels' grid-stride loops cover the rest.
template <class... Params, class... Args>
void launch_with(cudaStream_t stream, int threads, int64_t work, int64_t per_block,
                 void (*kernel)(Params...), Args&&... args) {
  if (work <= 0) return;
  kernel<<<grid_blocks(work, per_block), threads, 0, stream>>>(std::forward<Args>(args)...);
  DDETR_CUDA_CHECK_LAUNCH();
}

template <class... Params, class... Args>
void launch(cudaStream_t stream, int64_t work, int64_t per_block, void (*kernel)(Params...),
            Args&&... args) {
  launch_with(stream, kBlock, work, per_block, kernel, std::forward<Args>(args)...);
}

inline void check_sizes(bool ok, const char* op) {
  if (!ok) throw std::invalid_argument(std::string("CudaOps::") + op + ": negative size");
}

inline void check_sampling(const SamplingArgs& a) {
  if (a.rows < 0 || a.M < 0 || a.L < 0 || a.P < 0 || a.L > kMaxLevels)
    throw std::invalid_argument("CudaOps sampling: sizes out of range");
  if (a.ref_dim != 2 && a.ref_dim != 4)
    throw std::invalid_argument("CudaOps sampling: ref_dim must be 2 or 4, got " +
                                std::to_string(a.ref_dim));
}

}  // namespace cuda_detail

// ------------------------------------------------------------------ the Ops class

// Every call enqueues on `stream`; the caller holds a DeviceGuard for `device`.
template <class T> struct CudaOps {
  int device = 0;
  cudaStream_t stream = nullptr;
  bool deterministic = false;
  static constexpr size_t kAlign = 256;

  // C in U: T, or Acc<T> (the parameter-gradient accumulators, bf16's attention scores)
  template <class U>
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
            const T* B, int64_t ldb, Acc<T> beta, U* C, int64_t ldc, const T* bias,
            bool relu) const {
    run_gemm<U>({ta, tb, M, N, K, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, false}, bias,
                relu);
  }

  template <class U>
  void gemm_batched(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    int64_t sa, const T* B, int64_t ldb, int64_t sb, Acc<T> beta, U* C,
                    int64_t ldc, int64_t sc, int64_t batch) const {
    run_gemm<U>({ta, tb, M, N, K, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch, true},
                nullptr, false);
  }

  template <class U> void add(int64_t n, const U* a, const U* b, U* out) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::add takes T or Acc<T>");
    cuda_detail::check_sizes(n >= 0, "add");
    cuda_detail::launch(stream, n, cuda_detail::kBlock, cuda_detail::add_kernel<U>, n, a, b, out);
  }

  template <class U> void fill_zero(int64_t n, U* x) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::fill_zero takes T or Acc<T>");
    cuda_detail::check_sizes(n >= 0, "fill_zero");
    if (n > 0) DDETR_CUDA_CHECK(cudaMemsetAsync(x, 0, size_t(n) * sizeof(U), stream));
  }

  void fill(int64_t n, Acc<T> value, T* x) const {
    cuda_detail::check_sizes(n >= 0, "fill");
    cuda_detail::launch(stream, n, cuda_detail::kBlock, cuda_detail::fill_kernel<T>, n,
                        from_acc<T>(value), x);
  }

  template <class U>
  void copy_rows(int64_t rows, int64_t cols, const U* x, int64_t ldx, U* out,
                 int64_t ldo) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::copy_rows takes T or Acc<T>");
    cuda_detail::check_sizes(rows >= 0 && cols >= 0 && ldx >= cols && ldo >= cols, "copy_rows");
    cuda_detail::launch(stream, rows * cols, cuda_detail::kBlock,
                        cuda_detail::copy_rows_kernel<U>, rows, cols, x, ldx, out, ldo);
  }

  template <class U> void mask_rows(int64_t rows, int64_t cols, const uint8_t* mask, U* x) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::mask_rows takes T or Acc<T>");
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "mask_rows");
    if (mask == nullptr) return;  // no padding
    cuda_detail::launch(stream, rows * cols, cuda_detail::kBlock,
                        cuda_detail::mask_rows_kernel<U>, rows, cols, mask, x);
  }

  void to_storage(int64_t n, const Acc<T>* x, T* out) const {
    cuda_detail::check_sizes(n >= 0, "to_storage");
    cuda_detail::launch(stream, n, cuda_detail::kBlock, cuda_detail::to_storage_kernel<T>, n, x,
                        out);
  }

  template <class U> void dropout(const DropoutArgs& a, const U* x, U* out, bool relu) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::dropout takes T or Acc<T>");
    dropout_cuda(cuda_detail::dtype_of<U>(), a, x, out, relu, device,
                 reinterpret_cast<uintptr_t>(stream));
  }

  void relu_dropout_backward(const DropoutArgs& a, const T* out, const T* grad_out,
                             T* grad_x) const {
    relu_dropout_backward_cuda(cuda_detail::dtype_of<T>(), a, out, grad_out, grad_x, device,
                               reinterpret_cast<uintptr_t>(stream));
  }

  void add_layernorm(int64_t rows, int64_t C, const T* base, const T* branch, const T* gamma,
                     const T* beta, T* y, T* xhat, T* rstd) const {
    cuda_detail::check_sizes(rows >= 0 && C >= 0, "add_layernorm");
    if (C == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::add_layernorm_kernel<T>, rows, C, base, branch, gamma, beta,
                        y, xhat, rstd);
  }

  void layernorm_apply(int64_t rows, int64_t C, const T* xhat, const T* gamma, const T* beta,
                       T* y) const {
    cuda_detail::check_sizes(rows >= 0 && C >= 0, "layernorm_apply");
    cuda_detail::launch(stream, rows * C, cuda_detail::kBlock,
                        cuda_detail::layernorm_apply_kernel<T>, rows, C, xhat, gamma, beta, y);
  }

  void layernorm_backward(int64_t rows, int64_t C, const T* dy, const T* xhat, const T* rstd,
                          const T* gamma, T* dx) const {
    cuda_detail::check_sizes(rows >= 0 && C >= 0, "layernorm_backward");
    if (C == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::layernorm_backward_kernel<T>, rows, C, dy, xhat, rstd,
                        gamma, dx);
  }

  template <class U>
  void column_sums(int64_t rows, int64_t cols, const T* x, U* out, bool accumulate) const {
    column_reduce<false>(rows, cols, x, nullptr, out, accumulate);
  }

  template <class U>
  void column_dots(int64_t rows, int64_t cols, const T* x, const T* y, U* out,
                   bool accumulate) const {
    column_reduce<true>(rows, cols, x, y, out, accumulate);
  }

  void sampling_forward(const SamplingArgs& a, const T* raw, const Acc<T>* ref, Acc<T>* loc,
                        Acc<T>* attn) const {
    using namespace cuda_detail;
    check_sampling(a);
    const int64_t K = a.M * a.L * a.P;
    launch(stream, a.rows * K, kBlock, sampling_loc_kernel<T>, a, raw, ref, loc);
    launch(stream, a.rows * a.M, kBlock, sampling_softmax_kernel<T>, a, raw, attn);
  }

  void sampling_backward(const SamplingArgs& a, const T* raw, const Acc<T>* ref,
                         const Acc<T>* attn, const Acc<T>* grad_loc, const Acc<T>* grad_attn,
                         T* grad_raw, Acc<T>* grad_ref) const {
    using namespace cuda_detail;
    check_sampling(a);
    const int64_t K = a.M * a.L * a.P;
    launch(stream, a.rows * K, kBlock, sampling_grad_offset_kernel<T>, a, ref, grad_loc,
           grad_raw);
    launch(stream, a.rows * a.M, kBlock, sampling_grad_logit_kernel<T>, a, attn, grad_attn,
           grad_raw);
    if (grad_ref != nullptr)
      launch(stream, a.rows * a.L, kBlock, sampling_grad_ref_kernel<T>, a, raw, grad_loc,
             grad_ref);
  }

  void msda_forward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn,
                    T* out) const {
    msda_forward_cuda(cuda_detail::dtype_of<T>(), s, value, loc, attn, out, device,
                      reinterpret_cast<uintptr_t>(stream));
  }

  // Deterministic: the launcher overwrites every row of grad_value, so it writes into a
  // scratch grad_value carved from here, which is then added into the caller's. Layout:
  // up to kAlign - 1 bytes to align the base, the scratch grad_value (N*S*M*D of Acc<T>,
  // rounded up to kAlign), then the launcher's own workspace.
  size_t msda_backward_workspace_bytes(const MsdaShape& s) const {
    if (!deterministic) return 0;
    const size_t launcher = msda_backward_workspace_bytes_cuda(s, true, device);
    return (kAlign - 1) + scratch_grad_value_bytes(s) +
           cuda_detail::align_bytes(launcher, kAlign);
  }

  void msda_backward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn,
                     const T* grad_out, Acc<T>* grad_value, Acc<T>* grad_loc,
                     Acc<T>* grad_attn, void* workspace, size_t workspace_bytes) const {
    const uintptr_t st = reinterpret_cast<uintptr_t>(stream);
    constexpr DType dt = cuda_detail::dtype_of<T>();
    // No sample: grad_loc / grad_attn are empty and grad_value gets nothing (the
    // deterministic launcher would leave the scratch unwritten).
    if (s.N * s.Lq * s.M * s.L * s.P == 0) return;
    if (!deterministic) {  // atomics add straight into grad_value
      msda_backward_cuda(dt, s, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                         nullptr, 0, false, device, st);
      return;
    }
    const size_t need = msda_backward_workspace_bytes(s);
    if (workspace == nullptr || workspace_bytes < need)
      throw std::invalid_argument("CudaOps::msda_backward: the workspace has " +
                                  std::to_string(workspace ? workspace_bytes : 0) +
                                  " bytes, the deterministic backward needs " +
                                  std::to_string(need));
    const uintptr_t raw = reinterpret_cast<uintptr_t>(workspace);
    const uintptr_t aligned = (raw + kAlign - 1) / kAlign * kAlign;
    Acc<T>* scratch = reinterpret_cast<Acc<T>*>(aligned);
    const size_t used = size_t(aligned - raw) + scratch_grad_value_bytes(s);
    msda_backward_cuda(dt, s, value, loc, attn, grad_out, scratch, grad_loc, grad_attn,
                       reinterpret_cast<char*>(workspace) + used, workspace_bytes - used, true,
                       device, st);
    add(s.N * s.S * s.M * s.D, grad_value, scratch, grad_value);
  }

  // x, g in U (T or Acc<T>); out may alias x (g) when U is T
  template <class U>
  void softmax_rows(int64_t rows, int64_t cols, Acc<T> scale, const U* x, T* out) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::softmax_rows takes T or Acc<T>");
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "softmax_rows");
    if (cols == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::softmax_rows_kernel<T, U>, rows, cols, scale, x, out);
  }

  template <class U>
  void softmax_rows_backward(int64_t rows, int64_t cols, Acc<T> scale, const T* p, const U* g,
                             T* out) const {
    static_assert(cuda_detail::kElementOf<T, U>,
                  "CudaOps<T>::softmax_rows_backward takes T or Acc<T>");
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "softmax_rows_backward");
    if (cols == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::softmax_rows_backward_kernel<T, U>, rows, cols, scale, p, g,
                        out);
  }

 private:
  // A bf16 C gets its bias before cuBLAS (see the top of the file).
  template <class U> static constexpr bool kBiasFirst = !std::is_same<U, Acc<T>>::value;

  static size_t scratch_grad_value_bytes(const MsdaShape& s) {
    return cuda_detail::align_bytes(size_t(s.N * s.S * s.M * s.D) * sizeof(Acc<T>), kAlign);
  }

  // Row-major leading dimensions must cover a stored row: lda >= (ta ? M : K),
  // ldb >= (tb ? K : N), ldc >= N (what cuBLAS checks on the transposed problem).
  template <class U>
  void run_gemm(cuda_detail::GemmCall<T, U> g, const T* bias, bool relu) const {
    using namespace cuda_detail;
    static_assert(kElementOf<T, U>, "CudaOps<T>::gemm writes T or Acc<T>");
    if (g.M < 0 || g.N < 0 || g.K < 0 || g.batch < 0)
      throw std::invalid_argument("CudaOps::gemm: negative size");
    if (g.lda < (g.ta ? g.M : g.K) || g.ldb < (g.tb ? g.K : g.N) || g.ldc < g.N)
      throw std::invalid_argument("CudaOps::gemm: a leading dimension is smaller than its row");
    if (g.M == 0 || g.N == 0 || g.batch == 0) return;
    if (g.C == nullptr || (g.K > 0 && (g.A == nullptr || g.B == nullptr)))
      throw std::invalid_argument("CudaOps::gemm: null operand");
    const int64_t n = g.M * g.N * g.batch;
    if (kBiasFirst<U> && g.K > 0 && bias != nullptr) {  // C = beta C + bias, then C += A B
      launch(stream, n, kBlock, gemm_epilogue_kernel<T, U>, g.M, g.N, g.batch, g.C, g.ldc, g.sc,
             true, g.beta, bias, false);
      g.beta = Acc<T>(1);
      bias = nullptr;
    }
    if (g.K > 0) cublas_gemm(device, stream, g);
    if (g.K == 0 || bias != nullptr || relu)
      launch(stream, n, kBlock, gemm_epilogue_kernel<T, U>, g.M, g.N, g.batch, g.C, g.ldc, g.sc,
             g.K == 0, g.beta, bias, relu);
  }

  template <bool kDot, class U>
  void column_reduce(int64_t rows, int64_t cols, const T* x, const T* y, U* out,
                     bool accumulate) const {
    static_assert(cuda_detail::kElementOf<T, U>, "CudaOps<T>::column_* write T or Acc<T>");
    using Tile = cuda_detail::ColumnTile<T>;
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, kDot ? "column_dots" : "column_sums");
    if (cols == 0) return;
    const int64_t tiles = (cols + Tile::kCols - 1) / Tile::kCols;
    // rows == 0 still runs: out = 0 (or stays) as the empty sum says
    cuda_detail::launch_with(stream, Tile::kThreads, tiles, 1,
                             cuda_detail::column_reduce_kernel<T, U, kDot>, rows, cols, x, y,
                             out, accumulate);
  }
};

}  // namespace ddetr
