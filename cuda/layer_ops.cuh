// CudaOps<T>: the primitives of ddetr/layer_ops.h on CUDA, which the layer driver
// (ddetr/layer_driver.h) runs the encoder and decoder layers on. Included by
// cuda/layers.cu only, which also holds the cuBLAS loader that `gemm` goes through.
//
// Math: as layer_ops.h states it, in the element type T (float or double); every
// reduction accumulates in T too (float for float, double for double).
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
//
// Layout: matrices row-major; rows contiguous of length C / cols unless a leading
// dimension is given (GEMMs only). raw is (rows, 3K) with K = M*L*P: columns [0, 2K) the
// offsets (M, L, P, 2), [2K, 3K) the logits (M, L, P). loc (rows, M, L, P, 2), attn
// (rows, M, L, P), ref (rows, L, ref_dim). Flat indices are int64 throughout.
//
// Thread mapping (kBlock = 256 threads a block unless stated; every kernel walks its work
// with a grid stride, so no size runs into the grid limit):
//   elementwise (add, mask_rows, layernorm_apply, GEMM epilogue): one thread per element.
//   row kernels (LayerNorm and its backward, softmax_rows and its backward): one warp
//     per row, lane t on columns t, t + 32, ...; the row reductions are xor-shuffle
//     butterflies, which leave the same bits in every lane and add in a fixed order.
//   column_sums / column_dots: one block of 512 threads per tile of 32 bytes of columns
//     (8 floats or 4 doubles: one memory sector of each row), 512 / tile threads per
//     column taking its rows cyclically; the partial sums meet in shared memory and are
//     added pairwise in a fixed tree. Fixed order everywhere: the same bits on every run.
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
#include <utility>

#include "ddetr/dropout.h"
#include "ddetr/layer_ops.h"
#include "ddetr/msda.h"
#include "msda_common.cuh"

namespace ddetr {
namespace cuda_detail {

// ------------------------------------------------------------------ cuBLAS (layers.cu)

// One row-major GEMM, or `batch` of them at strides sa / sb / sc elements:
// C = op(A) op(B) + beta C. Sizes are checked against cuBLAS's int by the callee.
template <class T> struct GemmCall {
  bool ta, tb;
  int64_t M, N, K;
  const T* A;
  int64_t lda, sa;
  const T* B;
  int64_t ldb, sb;
  T beta;
  T* C;
  int64_t ldc, sc, batch;
  bool strided;  // cublas<t>gemmStridedBatched rather than cublas<t>gemm
};

// On `stream` with the handle of `device` (the current device); K >= 1, M, N >= 1.
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<float>& g);
void cublas_gemm(int device, cudaStream_t stream, const GemmCall<double>& g);

// ------------------------------------------------------------------ device helpers

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
template <class T> __device__ __forceinline__ T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <class T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------ elementwise kernels

template <class T> __global__ void add_kernel(int64_t n, const T* a, const T* b, T* out) {
  for (int64_t i = thread_index(); i < n; i += thread_stride()) out[i] = a[i] + b[i];
}

template <class T> __global__ void fill_kernel(int64_t n, T value, T* x) {
  for (int64_t i = thread_index(); i < n; i += thread_stride()) x[i] = value;
}

template <class T>
__global__ void copy_rows_kernel(int64_t rows, int64_t cols, const T* __restrict__ x,
                                 int64_t ldx, T* __restrict__ out, int64_t ldo) {
  const int64_t n = rows * cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t r = i / cols, c = i - r * cols;
    out[r * ldo + c] = x[r * ldx + c];
  }
}

template <class T>
__global__ void mask_rows_kernel(int64_t rows, int64_t cols, const uint8_t* __restrict__ mask,
                                 T* __restrict__ x) {
  const int64_t n = rows * cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride())
    if (mask[i / cols] != 0) x[i] = T(0);
}

// After cuBLAS (or instead of it when K = 0, where C = beta C): + bias[n], then ReLU.
// ReLU sends NaN to 0, as the CPU epilogue (cpp/blas.cpp) does.
template <class T>
__global__ void gemm_epilogue_kernel(int64_t M, int64_t N, int64_t batch, T* C, int64_t ldc,
                                     int64_t sc, bool k_zero, T beta,
                                     const T* __restrict__ bias, bool relu) {
  const int64_t per = M * N, n_all = per * batch;
  for (int64_t i = thread_index(); i < n_all; i += thread_stride()) {
    const int64_t b = i / per, mn = i - b * per, m = mn / N, n = mn - m * N;
    T* c = C + b * sc + m * ldc + n;
    // beta = 0 must not read C (it may be uninitialised), as in BLAS
    T v = k_zero ? (beta == T(0) ? T(0) : beta * *c) : *c;
    if (bias != nullptr) v += bias[n];
    if (relu && !(v > T(0))) v = T(0);
    *c = v;
  }
}

template <class T>
__global__ void layernorm_apply_kernel(int64_t rows, int64_t C, const T* __restrict__ xhat,
                                       const T* __restrict__ gamma, const T* __restrict__ beta,
                                       T* __restrict__ y) {
  const int64_t n = rows * C;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t c = i % C;
    y[i] = xhat[i] * gamma[c] + beta[c];
  }
}

// ------------------------------------------------------------------ row kernels (warp per row)

// y may alias base or branch: every pass reads element c in the lane that later writes
// it, and the last pass reads it before writing, so no __restrict__ on those three.
template <class T>
__global__ void add_layernorm_kernel(int64_t rows, int64_t C, const T* base, const T* branch,
                                     const T* __restrict__ gamma, const T* __restrict__ beta,
                                     T* y, T* __restrict__ xhat, T* __restrict__ rstd) {
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* b0 = base + r * C;
    const T* b1 = branch + r * C;
    T sum = T(0);
    for (int64_t c = lane; c < C; c += kWarp) sum += b0[c] + b1[c];
    const T mean = warp_sum(sum) / T(C);
    T sq = T(0);
    for (int64_t c = lane; c < C; c += kWarp) {
      const T d = (b0[c] + b1[c]) - mean;
      sq += d * d;
    }
    const T rs = T(1) / sqrt_t(warp_sum(sq) / T(C) + T(1e-5));
    T* yr = y + r * C;
    T* hr = xhat ? xhat + r * C : nullptr;
    for (int64_t c = lane; c < C; c += kWarp) {
      const T h = ((b0[c] + b1[c]) - mean) * rs;
      if (hr) hr[c] = h;
      yr[c] = h * gamma[c] + beta[c];
    }
    if (rstd && lane == 0) rstd[r] = rs;
  }
}

// dx may alias dy (same argument as above).
template <class T>
__global__ void layernorm_backward_kernel(int64_t rows, int64_t C, const T* dy,
                                          const T* __restrict__ xhat,
                                          const T* __restrict__ rstd,
                                          const T* __restrict__ gamma, T* dx) {
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* dyr = dy + r * C;
    const T* hr = xhat + r * C;
    T sg = T(0), sgh = T(0);
    for (int64_t c = lane; c < C; c += kWarp) {
      const T g = dyr[c] * gamma[c];
      sg += g;
      sgh += g * hr[c];
    }
    const T mean_g = warp_sum(sg) / T(C);
    const T mean_gh = warp_sum(sgh) / T(C);
    const T rs = rstd[r];
    T* dxr = dx + r * C;
    for (int64_t c = lane; c < C; c += kWarp)
      dxr[c] = rs * ((dyr[c] * gamma[c] - mean_g) - hr[c] * mean_gh);
  }
}

// In place; the second pass keeps exp(.) in x so the third only divides.
template <class T>
__global__ void softmax_rows_kernel(int64_t rows, int64_t cols, T scale, T* __restrict__ x) {
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    T* xr = x + r * cols;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t c = lane; c < cols; c += kWarp) mx = max_nan(mx, scale * xr[c]);
    mx = warp_max(mx);
    T sum = T(0);
    for (int64_t c = lane; c < cols; c += kWarp) {
      const T e = exp_t(scale * xr[c] - mx);
      xr[c] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    for (int64_t c = lane; c < cols; c += kWarp) xr[c] = xr[c] / sum;
  }
}

template <class T>
__global__ void softmax_rows_backward_kernel(int64_t rows, int64_t cols, T scale,
                                             const T* __restrict__ p, T* __restrict__ g) {
  const int lane = lane_index();
  for (int64_t r = warp_index(); r < rows; r += warp_stride()) {
    const T* pr = p + r * cols;
    T* gr = g + r * cols;
    T dot = T(0);
    for (int64_t c = lane; c < cols; c += kWarp) dot += pr[c] * gr[c];
    dot = warp_sum(dot);
    for (int64_t c = lane; c < cols; c += kWarp) gr[c] = scale * pr[c] * (gr[c] - dot);
  }
}

// ------------------------------------------------------------------ column reductions

template <class T> struct ColumnTile {
  static constexpr int kThreads = 512;
  static constexpr int kCols = 32 / int(sizeof(T));   // one 32-byte sector of a row
  static constexpr int kGroups = kThreads / kCols;    // threads per column, a power of two
};

// out[j] (+)= sum_r x[r, j] (kDot: x[r, j] * y[r, j]). Thread (g, t) of a block sums
// rows g, g + kGroups, ... of column tile * kCols + t; the kGroups partials of a column
// are then added pairwise in shared memory (g += g + half, half = kGroups / 2, ..., 1).
template <class T, bool kDot>
__global__ void __launch_bounds__(ColumnTile<T>::kThreads)
    column_reduce_kernel(int64_t rows, int64_t cols, const T* __restrict__ x,
                         const T* __restrict__ y, T* __restrict__ out, bool accumulate) {
  constexpr int kCols = ColumnTile<T>::kCols, kGroups = ColumnTile<T>::kGroups;
  __shared__ T partial[kGroups][kCols];
  const int t = int(threadIdx.x) % kCols, g = int(threadIdx.x) / kCols;
  const int64_t tiles = (cols + kCols - 1) / kCols;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t j = tile * kCols + t;
    T acc = T(0);
    if (j < cols) {
#pragma unroll 4
      for (int64_t r = g; r < rows; r += kGroups) {
        const int64_t i = r * cols + j;
        if constexpr (kDot) acc += x[i] * y[i];
        else acc += x[i];
      }
    }
    partial[g][t] = acc;
    __syncthreads();
    for (int half = kGroups / 2; half > 0; half /= 2) {
      if (g < half) partial[g][t] += partial[g + half][t];
      __syncthreads();
    }
    if (g == 0 && j < cols) out[j] = accumulate ? out[j] + partial[0][t] : partial[0][t];
    __syncthreads();  // partial is refilled by the next tile
  }
}

// ------------------------------------------------------------------ sampling kernels

// Sample i = (row, k) with k = (m L + l) P + p: its offset pair is raw[row, 2k .. 2k+1],
// its location loc[2i .. 2i+1], its level l = (k / P) % L.
template <class T>
__global__ void sampling_loc_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                    const T* __restrict__ ref, T* __restrict__ loc) {
  const int64_t K = a.M * a.L * a.P, n = a.rows * K;
  const T P = T(a.P);
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t row = i / K, k = i - row * K, l = (k / a.P) % a.L;
    const T ox = raw[row * 3 * K + 2 * k], oy = raw[row * 3 * K + 2 * k + 1];
    const T* rf = ref + (row * a.L + l) * a.ref_dim;
    if (a.ref_dim == 2) {
      loc[2 * i] = rf[0] + ox / T(a.level_w[l]);
      loc[2 * i + 1] = rf[1] + oy / T(a.level_h[l]);
    } else {
      loc[2 * i] = rf[0] + ox / P * rf[2] * T(0.5);
      loc[2 * i + 1] = rf[1] + oy / P * rf[3] * T(0.5);
    }
  }
}

// Head j = (row, m): logits raw[row, 2K + m LP ...], weights attn[j LP ...].
template <class T>
__global__ void sampling_softmax_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                        T* __restrict__ attn) {
  const int64_t LP = a.L * a.P, K = a.M * LP, heads = a.rows * a.M;
  for (int64_t j = thread_index(); j < heads; j += thread_stride()) {
    const int64_t row = j / a.M, m = j - row * a.M;
    const T* logit = raw + row * 3 * K + 2 * K + m * LP;
    T* w = attn + j * LP;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < LP; ++i) mx = max_nan(mx, logit[i]);
    T sum = T(0);
    for (int64_t i = 0; i < LP; ++i) {
      const T e = exp_t(logit[i] - mx);
      w[i] = e;
      sum += e;
    }
    for (int64_t i = 0; i < LP; ++i) w[i] = w[i] / sum;
  }
}

// The offset columns of grad_raw (same sample indexing as sampling_loc_kernel).
template <class T>
__global__ void sampling_grad_offset_kernel(const SamplingArgs a, const T* __restrict__ ref,
                                            const T* __restrict__ grad_loc,
                                            T* __restrict__ grad_raw) {
  const int64_t K = a.M * a.L * a.P, n = a.rows * K;
  const T P = T(a.P);
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t row = i / K, k = i - row * K, l = (k / a.P) % a.L;
    const T gx = grad_loc[2 * i], gy = grad_loc[2 * i + 1];
    T* gr = grad_raw + row * 3 * K + 2 * k;
    if (a.ref_dim == 2) {
      gr[0] = gx / T(a.level_w[l]);
      gr[1] = gy / T(a.level_h[l]);
    } else {
      const T* rf = ref + (row * a.L + l) * a.ref_dim;
      gr[0] = gx * rf[2] * T(0.5) / P;
      gr[1] = gy * rf[3] * T(0.5) / P;
    }
  }
}

// The logit columns of grad_raw: the softmax backward of one (row, m).
template <class T>
__global__ void sampling_grad_logit_kernel(const SamplingArgs a, const T* __restrict__ attn,
                                           const T* __restrict__ grad_attn,
                                           T* __restrict__ grad_raw) {
  const int64_t LP = a.L * a.P, K = a.M * LP, heads = a.rows * a.M;
  for (int64_t j = thread_index(); j < heads; j += thread_stride()) {
    const int64_t row = j / a.M, m = j - row * a.M;
    const T* w = attn + j * LP;
    const T* gw = grad_attn + j * LP;
    T dot = T(0);
    for (int64_t i = 0; i < LP; ++i) dot += w[i] * gw[i];
    T* gl = grad_raw + row * 3 * K + 2 * K + m * LP;
    for (int64_t i = 0; i < LP; ++i) gl[i] = w[i] * (gw[i] - dot);
  }
}

// grad_ref[row, l, :] over (m, p) in order; one thread per (row, l), no atomics.
template <class T>
__global__ void sampling_grad_ref_kernel(const SamplingArgs a, const T* __restrict__ raw,
                                         const T* __restrict__ grad_loc,
                                         T* __restrict__ grad_ref) {
  const int64_t K = a.M * a.L * a.P, n = a.rows * a.L;
  const T P = T(a.P);
  const bool box = a.ref_dim == 4;
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    const int64_t row = j / a.L, l = j - row * a.L;
    T sx = T(0), sy = T(0), sw = T(0), sh = T(0);
    for (int64_t m = 0; m < a.M; ++m) {
      for (int64_t p = 0; p < a.P; ++p) {
        const int64_t k = (m * a.L + l) * a.P + p, i = row * K + k;
        const T gx = grad_loc[2 * i], gy = grad_loc[2 * i + 1];
        sx += gx;
        sy += gy;
        if (box) {
          sw += gx * raw[row * 3 * K + 2 * k] / P * T(0.5);
          sh += gy * raw[row * 3 * K + 2 * k + 1] / P * T(0.5);
        }
      }
    }
    T* gr = grad_ref + j * a.ref_dim;
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

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
            const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const T* bias,
            bool relu) const {
    run_gemm({ta, tb, M, N, K, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, false}, bias, relu);
  }

  void gemm_batched(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    int64_t sa, const T* B, int64_t ldb, int64_t sb, T beta, T* C, int64_t ldc,
                    int64_t sc, int64_t batch) const {
    run_gemm({ta, tb, M, N, K, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch, true}, nullptr,
             false);
  }

  void add(int64_t n, const T* a, const T* b, T* out) const {
    cuda_detail::check_sizes(n >= 0, "add");
    cuda_detail::launch(stream, n, cuda_detail::kBlock, cuda_detail::add_kernel<T>, n, a, b, out);
  }

  void fill_zero(int64_t n, T* x) const {
    cuda_detail::check_sizes(n >= 0, "fill_zero");
    if (n > 0) DDETR_CUDA_CHECK(cudaMemsetAsync(x, 0, size_t(n) * sizeof(T), stream));
  }

  void fill(int64_t n, T value, T* x) const {
    cuda_detail::check_sizes(n >= 0, "fill");
    cuda_detail::launch(stream, n, cuda_detail::kBlock, cuda_detail::fill_kernel<T>, n, value, x);
  }

  void copy_rows(int64_t rows, int64_t cols, const T* x, int64_t ldx, T* out,
                 int64_t ldo) const {
    cuda_detail::check_sizes(rows >= 0 && cols >= 0 && ldx >= cols && ldo >= cols, "copy_rows");
    cuda_detail::launch(stream, rows * cols, cuda_detail::kBlock,
                        cuda_detail::copy_rows_kernel<T>, rows, cols, x, ldx, out, ldo);
  }

  void mask_rows(int64_t rows, int64_t cols, const uint8_t* mask, T* x) const {
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "mask_rows");
    if (mask == nullptr) return;  // no padding
    cuda_detail::launch(stream, rows * cols, cuda_detail::kBlock,
                        cuda_detail::mask_rows_kernel<T>, rows, cols, mask, x);
  }

  void dropout(const DropoutArgs& a, const T* x, T* out, bool relu) const {
    dropout_cuda(cuda_detail::dtype_of<T>(), a, x, out, relu, device,
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

  void column_sums(int64_t rows, int64_t cols, const T* x, T* out, bool accumulate) const {
    column_reduce<false>(rows, cols, x, nullptr, out, accumulate);
  }

  void column_dots(int64_t rows, int64_t cols, const T* x, const T* y, T* out,
                   bool accumulate) const {
    column_reduce<true>(rows, cols, x, y, out, accumulate);
  }

  void sampling_forward(const SamplingArgs& a, const T* raw, const T* ref, T* loc,
                        T* attn) const {
    using namespace cuda_detail;
    check_sampling(a);
    const int64_t K = a.M * a.L * a.P;
    launch(stream, a.rows * K, kBlock, sampling_loc_kernel<T>, a, raw, ref, loc);
    launch(stream, a.rows * a.M, kBlock, sampling_softmax_kernel<T>, a, raw, attn);
  }

  void sampling_backward(const SamplingArgs& a, const T* raw, const T* ref, const T* attn,
                         const T* grad_loc, const T* grad_attn, T* grad_raw,
                         T* grad_ref) const {
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

  void msda_forward(const MsdaShape& s, const T* value, const T* loc, const T* attn,
                    T* out) const {
    msda_forward_cuda(cuda_detail::dtype_of<T>(), s, value, loc, attn, out, device,
                      reinterpret_cast<uintptr_t>(stream));
  }

  // Deterministic: the launcher overwrites every row of grad_value, so it writes into a
  // scratch grad_value carved from here, which is then added into the caller's. Layout:
  // up to kAlign - 1 bytes to align the base, the scratch grad_value (N*S*M*D of T,
  // rounded up to kAlign), then the launcher's own workspace.
  size_t msda_backward_workspace_bytes(const MsdaShape& s) const {
    if (!deterministic) return 0;
    const size_t launcher = msda_backward_workspace_bytes_cuda(s, true, device);
    return (kAlign - 1) + scratch_grad_value_bytes(s) +
           cuda_detail::align_bytes(launcher, kAlign);
  }

  void msda_backward(const MsdaShape& s, const T* value, const T* loc, const T* attn,
                     const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn,
                     void* workspace, size_t workspace_bytes) const {
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
    T* scratch = reinterpret_cast<T*>(aligned);
    const size_t used = size_t(aligned - raw) + scratch_grad_value_bytes(s);
    msda_backward_cuda(dt, s, value, loc, attn, grad_out, scratch, grad_loc, grad_attn,
                       reinterpret_cast<char*>(workspace) + used, workspace_bytes - used, true,
                       device, st);
    add(s.N * s.S * s.M * s.D, grad_value, scratch, grad_value);
  }

  void softmax_rows(int64_t rows, int64_t cols, T scale, T* x) const {
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "softmax_rows");
    if (cols == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::softmax_rows_kernel<T>, rows, cols, scale, x);
  }

  void softmax_rows_backward(int64_t rows, int64_t cols, T scale, const T* p, T* g) const {
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, "softmax_rows_backward");
    if (cols == 0) return;
    cuda_detail::launch(stream, rows, cuda_detail::kBlock / cuda_detail::kWarp,
                        cuda_detail::softmax_rows_backward_kernel<T>, rows, cols, scale, p, g);
  }

 private:
  static size_t scratch_grad_value_bytes(const MsdaShape& s) {
    return cuda_detail::align_bytes(size_t(s.N * s.S * s.M * s.D) * sizeof(T), kAlign);
  }

  // Row-major leading dimensions must cover a stored row: lda >= (ta ? M : K),
  // ldb >= (tb ? K : N), ldc >= N (what cuBLAS checks on the transposed problem).
  void run_gemm(const cuda_detail::GemmCall<T>& g, const T* bias, bool relu) const {
    if (g.M < 0 || g.N < 0 || g.K < 0 || g.batch < 0)
      throw std::invalid_argument("CudaOps::gemm: negative size");
    if (g.lda < (g.ta ? g.M : g.K) || g.ldb < (g.tb ? g.K : g.N) || g.ldc < g.N)
      throw std::invalid_argument("CudaOps::gemm: a leading dimension is smaller than its row");
    if (g.M == 0 || g.N == 0 || g.batch == 0) return;
    if (g.C == nullptr || (g.K > 0 && (g.A == nullptr || g.B == nullptr)))
      throw std::invalid_argument("CudaOps::gemm: null operand");
    if (g.K > 0) cuda_detail::cublas_gemm(device, stream, g);
    if (g.K == 0 || bias != nullptr || relu)
      cuda_detail::launch(stream, g.M * g.N * g.batch, cuda_detail::kBlock,
                          cuda_detail::gemm_epilogue_kernel<T>, g.M, g.N, g.batch, g.C, g.ldc,
                          g.sc, g.K == 0, g.beta, bias, relu);
  }

  template <bool kDot>
  void column_reduce(int64_t rows, int64_t cols, const T* x, const T* y, T* out,
                     bool accumulate) const {
    cuda_detail::check_sizes(rows >= 0 && cols >= 0, kDot ? "column_dots" : "column_sums");
    if (cols == 0) return;
    const int64_t tiles = (cols + cuda_detail::ColumnTile<T>::kCols - 1) /
                          cuda_detail::ColumnTile<T>::kCols;
    // rows == 0 still runs: out = 0 (or stays) as the empty sum says
    cuda_detail::launch_with(stream, cuda_detail::ColumnTile<T>::kThreads, tiles, 1,
                             cuda_detail::column_reduce_kernel<T, kDot>, rows, cols, x, y, out,
                             accumulate);
  }
};

}  // namespace ddetr
