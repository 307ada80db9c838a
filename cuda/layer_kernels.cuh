// The device kernels behind CudaOps<T> (cuda/layer_ops.cuh, which documents their math,
// types and thread mapping). Included by layer_ops.cuh only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "ddetr/layer_ops.h"

namespace ddetr {
namespace cuda_detail {

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

}  // namespace cuda_detail
}  // namespace ddetr
