// MSDA backward on CUDA: the per-sample gradients and the fast (atomic) grad_value,
// plus the entry point that picks the fast or the deterministic grad_value path.
//
// Math, for one sample s = (n, q, m, l, p) with attention a, corners k (pixel_k,
// weight_k from bilinear_setup) and g = grad_out[n, q, m, :]:
//   grad_value[n, start_l + pixel_k, m, c] += a * weight_k * g_c
//   dot_k = sum over c of g_c * value[n, start_l + pixel_k, m, c]
//   grad_attn[s], grad_loc[s, 0:2] = bilinear_backward(b, dot, a, H_l, W_l)
// Samples off the map get grad_attn = grad_loc = 0 (written explicitly, so a
// non-finite attention cannot turn the zero into a NaN).
//
// Layout: as the forward (value / grad_value (N, S, M, D), loc / grad_loc
// (N, Lq, M, L, P, 2), attn / grad_attn (N, Lq, M, L, P), grad_out (N, Lq, M, D));
// for a fixed (n, m) consecutive pixels are M * D elements apart and one pixel's
// channels are contiguous. value and grad_out are in T, everything else in Acc<T>.
//
// Thread mapping: one group of `group` lanes per row (n, q, m), lanes over
// channels (msda_common.cuh). A lane caches its g_c, then for each sample adds
// its channels' share of the four dot products; the group reduces them with
// xor shuffles (every lane ends with the totals), and lane 0 of the group
// writes grad_attn and grad_loc. Those two outputs are per sample and owned by
// exactly one group, so they need no atomics in either mode. To keep the full
// warp mask of the shuffles valid, the grid-stride loop is driven by the warp's
// first row (uniform across the warp) and every lane reaches every shuffle;
// rows past the end just carry zeros.
//
// Atomics: only grad_value, and only when kScatter (the fast, non-deterministic
// path): many samples of many queries hit the same value pixel, and which of
// them adds first depends on scheduling. The adds of one corner go to `group`
// consecutive addresses, so they coalesce into few memory transactions. The
// deterministic path (msda_backward_deterministic.cu) runs this kernel with
// kScatter = false and builds grad_value by an ordered per-row reduction.
#include "msda_common.cuh"

namespace ddetr {
namespace cuda_detail {
namespace {

// No __launch_bounds__, for the same reason as the forward kernel: it makes
// ptxas trade spills for occupancy.
template <class T, int CPL, bool kScatter>
__global__ void msda_backward_kernel(const MsdaShape s, const T* __restrict__ value,
                                     const Acc<T>* __restrict__ loc,
                                     const Acc<T>* __restrict__ attn,
                                     const T* __restrict__ grad_out,
                                     Acc<T>* __restrict__ grad_value,
                                     Acc<T>* __restrict__ grad_loc,
                                     Acc<T>* __restrict__ grad_attn, const int group) {
  using A = Acc<T>;
  const int64_t rows = s.N * s.Lq * s.M;
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  const int64_t groups_per_block = kBlock / group;
  const int64_t grid_stride = int64_t(gridDim.x) * groups_per_block;
  const int64_t warp_first = int64_t(blockIdx.x) * groups_per_block +
                             int64_t(threadIdx.x / kWarp) * (kWarp / group);
  const int64_t group_in_warp = (threadIdx.x % kWarp) / group;
  const int64_t chunk = int64_t(group) * CPL;
  const int64_t samples = s.L * s.P;
  const int64_t pixel_stride = s.M * s.D;

  for (int64_t base = warp_first; base < rows; base += grid_stride) {
    const int64_t row = base + group_in_warp;
    const bool active = row < rows;
    const int64_t m = row % s.M;
    const int64_t n = row / (s.Lq * s.M);
    // Offsets (not pointers) so an inactive row never forms an out-of-range pointer.
    const int64_t nm_offset = (n * s.S * s.M + m) * s.D + lane;
    const int64_t go_offset = row * s.D + lane;

    // Upstream gradient of the first chunk, reused by every sample of the row.
    A g[CPL];
#pragma unroll
    for (int j = 0; j < CPL; ++j)
      g[j] = (active && lane + int64_t(j) * group < s.D) ? to_acc(grad_out[go_offset + j * group])
                                                         : A(0);

    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = s.level_h[l], W = s.level_w[l];
      const int64_t level_offset = nm_offset + s.level_start[l] * pixel_stride;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = row * samples + l * s.P + p;  // flat sample index
        Vec2<A> xy{A(0), A(0)};
        A a = A(0);
        if (active) {
          xy = load_xy(loc, i);
          a = attn[i];
        }
        Bilinear<A> b;
        const bool valid = setup_or_clear(active, xy.x, xy.y, H, W, b);

        A dot[4] = {A(0), A(0), A(0), A(0)};
        if (valid) {
          for (int64_t c0 = 0; c0 < s.D; c0 += chunk) {
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
              const int64_t c = c0 + j * group;  // relative to this lane's first channel
              if (lane + c >= s.D) continue;
              const A gc = c0 == 0 ? g[j] : to_acc(grad_out[go_offset + c]);
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                if (b.pixel[k] < 0) continue;
                const int64_t idx = level_offset + b.pixel[k] * pixel_stride + c;
                dot[k] += gc * to_acc(value[idx]);
                if constexpr (kScatter) atomicAdd(grad_value + idx, fold_weight(a, b.weight[k]) * gc);
              }
            }
          }
        }

        // Reached by all 32 lanes (no early exit above), as the full mask requires.
        for (int offset = group >> 1; offset > 0; offset >>= 1) {
#pragma unroll
          for (int k = 0; k < 4; ++k) dot[k] += __shfl_xor_sync(0xffffffffu, dot[k], offset);
        }

        if (active && lane == 0) {
          SampleGrad<A> sg{A(0), A(0), A(0)};
          if (valid) sg = bilinear_backward(b, dot, a, H, W);
          grad_attn[i] = sg.attn;
          store_xy(grad_loc, i, Vec2<A>{sg.x, sg.y});
        }
      }
    }
  }
}

// grad_loc and grad_attn always; grad_value too (atomically) unless it is null.
template <class T>
void launch_sample_gradients(const MsdaShape& shape, const T* value, const Acc<T>* loc,
                             const Acc<T>* attn, const T* grad_out, Acc<T>* grad_value,
                             Acc<T>* grad_loc, Acc<T>* grad_attn, cudaStream_t stream) {
  const int64_t rows = shape.N * shape.Lq * shape.M;
  const ChannelSplit split = split_channels(shape.D);
  const unsigned blocks = grid_blocks(rows, kBlock / split.group);
  dispatch_cpl(split.cpl, [&](auto cpl) {
    constexpr int CPL = decltype(cpl)::value;
    if (grad_value != nullptr) {
      msda_backward_kernel<T, CPL, true><<<blocks, kBlock, 0, stream>>>(
          shape, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, split.group);
    } else {
      msda_backward_kernel<T, CPL, false><<<blocks, kBlock, 0, stream>>>(
          shape, value, loc, attn, grad_out, nullptr, grad_loc, grad_attn, split.group);
    }
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace
}  // namespace cuda_detail

size_t msda_backward_workspace_bytes_cuda(const MsdaShape& shape, bool deterministic,
                                          int device) {
  if (!deterministic) return 0;
  cuda_detail::DeviceGuard guard(device);  // CUB sizes its temp storage for this device
  return cuda_detail::deterministic_workspace_bytes(shape);
}

void msda_backward_cuda(DType dtype, const MsdaShape& shape, const void* value,
                        const void* loc, const void* attn, const void* grad_out,
                        void* grad_value, void* grad_loc, void* grad_attn, void* workspace,
                        size_t workspace_bytes, bool deterministic, int device,
                        uintptr_t stream) {
  using namespace cuda_detail;
  // With no query rows there is no sample: grad_loc / grad_attn are empty and
  // grad_value stays as the caller zeroed it.
  if (shape.N * shape.Lq * shape.M == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);

  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    const T* v = static_cast<const T*>(value);
    const A* l = static_cast<const A*>(loc);
    const A* a = static_cast<const A*>(attn);
    const T* go = static_cast<const T*>(grad_out);
    A* gv = static_cast<A*>(grad_value);
    A* gl = static_cast<A*>(grad_loc);
    A* ga = static_cast<A*>(grad_attn);
    if (deterministic) {
      // First, so that a too-small workspace throws before anything is launched.
      deterministic_grad_value<T>(shape, l, a, go, gv, workspace, workspace_bytes, st);
      launch_sample_gradients<T>(shape, v, l, a, go, nullptr, gl, ga, st);
    } else {
      launch_sample_gradients<T>(shape, v, l, a, go, gv, gl, ga, st);
    }
  });
}

}  // namespace ddetr
