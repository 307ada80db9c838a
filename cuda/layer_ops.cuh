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
#include "common.cuh"
#include "layer_kernels.cuh"

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

// cuBLAS's workspace for the GEMMs of one layer pass: a 256-byte aligned piece of the
// pass's workspace (layers.cu explains why each pass brings its own). Null: the
// handle's default pool.
struct BlasWorkspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// On `stream` with the handle of `device` (the current device) and workspace `ws`;
// K >= 1, M, N >= 1. bf16 throws std::runtime_error when the loaded cuBLAS lacks
// cublasGemmEx.
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<float, float>& g);
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<double, double>& g);
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<bf16, bf16>& g);
void cublas_gemm(int device, cudaStream_t stream, const BlasWorkspace& ws,
                 const GemmCall<bf16, float>& g);

// ------------------------------------------------------------------ host helpers

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
  cuda_detail::BlasWorkspace blas;  // the pass's cuBLAS workspace (layers.cu)
  static constexpr size_t kAlign = 256;
  // A whole 800x1333 image (22,223 tokens) in one block: blocks of 2048 rows cost 11
  // launches of every per-row kernel and GEMMs too small to fill the GPU (measured on an
  // H200: the native encoder layer at 0.6x the PyTorch path's speed). The workspace
  // grows to about 10 KB per row (a few hundred MB), small beside the GPU's memory.
  static constexpr int64_t kBlockRows = 32768;

  // one stream: the blocks run one after another, each on the whole GPU
  int block_slots(int64_t) const { return 1; }
  template <class Fn> void run_blocks(int64_t count, Fn&& fn) const {
    for (int64_t i = 0; i < count; ++i) fn(i, 0, *this);
  }

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

  // The deterministic launcher's sort and row offsets (its corner entries, not the value
  // map: both paths add straight into grad_value, see msda_backward).
  size_t msda_backward_workspace_bytes(const MsdaShape& s) const {
    return deterministic ? msda_backward_workspace_bytes_cuda(s, true, device) : 0;
  }

  // grad_value (+)= this call's share, as msda.h's contract says (the caller zeroes it
  // once; the driver calls this once per block of query rows). `out` (when not null)
  // gets the forward's output: here a separate forward launch.
  // Fast path: float atomics add into grad_value. Deterministic path: every element
  // gets grad_value + (this block's contributions summed from 0 in increasing corner
  // entry id), one read-add-write by the one lane that owns it
  // (msda_backward_deterministic.cu); the driver runs the blocks in a fixed order, so
  // an element's final value is ((0 + block_0) + block_1) + ... in that order: the same
  // bits on every run, and the same bits as adding a per-block scratch copy would give,
  // without writing and re-reading a whole value map per block.
  void msda_backward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn,
                     const T* grad_out, Acc<T>* grad_value, Acc<T>* grad_loc,
                     Acc<T>* grad_attn, void* workspace, size_t workspace_bytes,
                     T* out) const {
    if (out) msda_forward(s, value, loc, attn, out);
    // No sample: grad_loc / grad_attn are empty and grad_value gets nothing.
    if (s.N * s.Lq * s.M * s.L * s.P == 0) return;
    msda_backward_cuda(cuda_detail::dtype_of<T>(), s, value, loc, attn, grad_out, grad_value,
                       grad_loc, grad_attn, deterministic ? workspace : nullptr,
                       deterministic ? workspace_bytes : 0, deterministic, device,
                       reinterpret_cast<uintptr_t>(stream));
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
    if (g.K > 0) cublas_gemm(device, stream, blas, g);
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
