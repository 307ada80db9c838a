// CUDA dropout kernels (the math and the random stream are in ddetr/dropout.h; the
// masks equal the CPU kernels' for the same seed and offset).
//
// Thread mapping: one thread per Philox block of 4 consecutive elements (one call of
// the generator gives all four words), grid-stride loop. relu_dropout_backward has no
// randomness: one thread per element.
#include "common.cuh"
#include "ddetr/dropout.h"

namespace ddetr {
namespace cuda_detail {
namespace {

template <class T>
__global__ void dropout_kernel(DropoutArgs a, KeepRule rule, const T* x, T* out, bool relu) {
  const int64_t blocks = (a.n + 3) / 4;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = philox4x32_10(uint64_t(b), a.offset, a.seed);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = 4 * b + w;
      if (i >= a.n) break;
      using A = Acc<T>;
      const A v = to_acc(x[i]);
      const bool keep = !rule.drop_all && r.w[w] >= rule.threshold && (!relu || v > A(0));
      out[i] = from_acc<T>(keep ? v * A(rule.scale) : A(0));
    }
  }
}

template <class T>
__global__ void relu_dropout_backward_kernel(int64_t n, float scale, const T* out,
                                             const T* grad_out, T* grad_x) {
  using A = Acc<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool pass = to_acc(out[i]) > A(0);
    grad_x[i] = from_acc<T>(pass ? to_acc(grad_out[i]) * A(scale) : A(0));
  }
}

}  // namespace
}  // namespace cuda_detail

void dropout_cuda(DType dtype, const DropoutArgs& a, const void* x, void* out, bool relu,
                  int device, uintptr_t stream) {
  using namespace cuda_detail;
  validate_dropout(a);
  if (a.n == 0) return;
  DeviceGuard guard(device);
  const KeepRule rule = keep_rule(a.p);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dropout_kernel<T><<<grid_blocks((a.n + 3) / 4, kBlock), kBlock, 0, as_stream(stream)>>>(
        a, rule, static_cast<const T*>(x), static_cast<T*>(out), relu);
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

void relu_dropout_backward_cuda(DType dtype, const DropoutArgs& a, const void* out,
                                const void* grad_out, void* grad_x, int device,
                                uintptr_t stream) {
  using namespace cuda_detail;
  validate_dropout(a);
  if (a.n == 0) return;
  DeviceGuard guard(device);
  const float scale = keep_rule(a.p).scale;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    relu_dropout_backward_kernel<T><<<grid_blocks(a.n, kBlock), kBlock, 0, as_stream(stream)>>>(
        a.n, scale, static_cast<const T*>(out), static_cast<const T*>(grad_out),
        static_cast<T*>(grad_x));
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace ddetr
