// MSDA forward on CUDA.
//
// Math: out[n, q, m, c] = sum over l < L, p < P of
//         attn[n, q, m, l, p] * sum over corners k of weight_k * value[n, start_l + pixel_k, m, c]
// with pixel_k / weight_k from bilinear_setup (ddetr/bilinear.h: align_corners=False,
// zero padding, corners off the map skipped).
//
// Layout: value (N, S, M, D), loc (N, Lq, M, L, P, 2), attn (N, Lq, M, L, P),
// out (N, Lq, M, D), all contiguous. value and out are in the storage type T,
// loc and attn in Acc<T> (msda.h: a bf16 location would be off by a fraction
// of a pixel). For a fixed (n, m), consecutive pixels of
// value are M * D elements apart; the D channels of one pixel are contiguous.
//
// Thread mapping: one group of `group` lanes per output row (n, q, m), lanes over
// channels (see msda_common.cuh); groups walk the N * Lq * M rows with a grid
// stride. Every lane of a group runs the same bilinear_setup on the same loc
// (a broadcast load), in lockstep, so the setup costs one warp instruction
// stream per sample rather than one per channel. Each lane accumulates its
// channels in Acc<T> registers and writes them once: no atomics, no memset.
#include "msda_common.cuh"

namespace ddetr {
namespace cuda_detail {
namespace {

// No __launch_bounds__: with it ptxas squeezes registers for occupancy and
// spills the 64-bit index math; without it nothing spills (checked with -Xptxas -v).
template <class T, int CPL>
__global__ void msda_forward_kernel(const MsdaShape s, const T* __restrict__ value,
                                    const Acc<T>* __restrict__ loc,
                                    const Acc<T>* __restrict__ attn, T* __restrict__ out,
                                    const int group) {
  using A = Acc<T>;
  const int64_t rows = s.N * s.Lq * s.M;
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  const int64_t groups_per_block = kBlock / group;
  const int64_t grid_stride = int64_t(gridDim.x) * groups_per_block;
  const int64_t chunk = int64_t(group) * CPL;
  const int64_t samples = s.L * s.P;
  const int64_t pixel_stride = s.M * s.D;

  for (int64_t row = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / group; row < rows;
       row += grid_stride) {
    const int64_t m = row % s.M;
    const int64_t n = row / (s.Lq * s.M);
    const T* value_nm = value + (n * s.S * s.M + m) * s.D;
    const A* loc_row = loc + row * samples * 2;
    const A* attn_row = attn + row * samples;
    T* out_row = out + row * s.D;

    for (int64_t c0 = 0; c0 < s.D; c0 += chunk) {
      const int64_t c_lane = c0 + lane;
      A acc[CPL];
#pragma unroll
      for (int j = 0; j < CPL; ++j) acc[j] = A(0);

      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = s.level_h[l], W = s.level_w[l];
        const T* value_l = value_nm + s.level_start[l] * pixel_stride + c_lane;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t i = l * s.P + p;
          const Vec2<A> xy = load_xy(loc_row, i);
          Bilinear<A> b;
          if (!bilinear_setup(xy.x, xy.y, H, W, b)) continue;
          const A a = attn_row[i];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.pixel[k] < 0) continue;
            // attn folded into the corner weight once, so each channel costs one FMA.
            const A wk = fold_weight(a, b.weight[k]);
            const T* v = value_l + b.pixel[k] * pixel_stride;
#pragma unroll
            for (int j = 0; j < CPL; ++j)
              if (c_lane + int64_t(j) * group < s.D) acc[j] += wk * to_acc(v[j * group]);
          }
        }
      }

#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int64_t c = c_lane + int64_t(j) * group;
        if (c < s.D) out_row[c] = from_acc<T>(acc[j]);
      }
    }
  }
}

}  // namespace
}  // namespace cuda_detail

void msda_forward_cuda(DType dtype, const MsdaShape& shape, const void* value, const void* loc,
                       const void* attn, void* out, int device, uintptr_t stream) {
  using namespace cuda_detail;
  const int64_t rows = shape.N * shape.Lq * shape.M;
  if (rows == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const ChannelSplit split = split_channels(shape.D);
  const unsigned blocks = grid_blocks(rows, kBlock / split.group);

  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    dispatch_cpl(split.cpl, [&](auto cpl) {
      msda_forward_kernel<T, decltype(cpl)::value><<<blocks, kBlock, 0, st>>>(
          shape, static_cast<const T*>(value), static_cast<const A*>(loc),
          static_cast<const A*>(attn), static_cast<T*>(out), split.group);
      DDETR_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace ddetr
