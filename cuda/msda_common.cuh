// What the CUDA MSDA kernels (msda_forward.cu, msda_backward.cu,
// msda_backward_deterministic.cu) share beyond cuda/common.cuh: the channel split
// and its dispatch, location pairs, the lane-uniform bilinear setup of the backward
// kernels and the deterministic path's entry points. No kernels live here.
//
// Thread mapping shared by all row kernels (forward, fast backward, deterministic
// reduce): a "group" of `group` consecutive lanes (a power of two dividing 32)
// owns one output row of D channels; lane t of the group handles channels
// t, t + group, ..., so each corner load of a group is one coalesced run of
// `group` elements. Each lane keeps CPL (channels per lane, a template constant
// so the accumulators stay in registers) channels at a time; a D wider than
// group * CPL is walked in chunks of that width.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "ddetr/bilinear.h"
#include "ddetr/msda.h"

namespace ddetr {
namespace cuda_detail {

// How a row of D channels is spread over a group of lanes.
struct ChannelSplit {
  int group;  // lanes per row: a power of two in [1, 32]
  int cpl;    // channels per lane per chunk: 1, 2, 4 or 8
};

// Small D gets small groups so a warp still has 32 busy lanes (several rows per
// warp); up to 256 channels fit one chunk, so the per-sample setup is done once.
inline ChannelSplit split_channels(int64_t D) {
  int group = 1;
  while (group < kWarp && group < D) group *= 2;
  const int64_t per_lane = (D + group - 1) / group;
  const int cpl = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
  return ChannelSplit{group, cpl};
}

// Calls `f` with std::integral_constant<int, CPL> for the runtime value `cpl`.
template <class F> void dispatch_cpl(int cpl, F&& f) {
  switch (cpl) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
  }
  throw std::logic_error("ddetr: unsupported channels-per-lane " + std::to_string(cpl));
}

// A location pair (x, y) or its gradient. Two scalar accesses, not one float2 /
// double2: a contiguous view of a caller's tensor may start at an odd element,
// and the pair shares one cache line anyway.
template <class A> struct Vec2 {
  A x, y;
};

template <class A>
__device__ __forceinline__ Vec2<A> load_xy(const A* __restrict__ loc, int64_t i) {
  return Vec2<A>{loc[2 * i], loc[2 * i + 1]};
}

template <class A>
__device__ __forceinline__ void store_xy(A* __restrict__ loc, int64_t i, Vec2<A> v) {
  loc[2 * i] = v.x;
  loc[2 * i + 1] = v.y;
}

// The backward kernels keep every lane on the same path up to the warp
// shuffles, including lanes whose row is past the end: those must not read loc
// but still need a Bilinear that says "nothing here". Clearing on a miss as well
// keeps the kernels correct whatever bilinear_setup leaves in `b` then.
template <class A>
__device__ __forceinline__ bool setup_or_clear(bool active, A x, A y, int64_t H, int64_t W,
                                               Bilinear<A>& b) {
  if (active && bilinear_setup(x, y, H, W, b)) return true;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    b.pixel[k] = -1;
    b.weight[k] = A(0);
  }
  b.ly = A(0);
  b.lx = A(0);
  return false;
}

// grad_value of the deterministic path (cuda/msda_backward_deterministic.cu): adds
// each element's share into grad_value in a fixed order, without floating-point atomics.
// Explicitly instantiated there for float, double, __half and bf16.
template <class T>
void deterministic_grad_value(const MsdaShape& shape, const Acc<T>* loc, const Acc<T>* attn,
                              const T* grad_out, Acc<T>* grad_value, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// Workspace of deterministic_grad_value on the current device (0 when there is
// nothing to do). Throws std::invalid_argument when the problem overflows the
// 32-bit sort keys and ids.
size_t deterministic_workspace_bytes(const MsdaShape& shape);

}  // namespace cuda_detail
}  // namespace ddetr
