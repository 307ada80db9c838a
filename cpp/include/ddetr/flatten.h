// The native contract of multi-scale flattening and of the encoder's reference points.
//
// Flattening turns L feature maps into the one token sequence the encoder reads.
// Per level l (H_l x W_l pixels, tokens t = h * W_l + w, start_l = sum of the
// earlier H_k * W_k, S = the total):
//   src[n, start_l + t, c]  = features_l[n, c, t]
//   pos[n, start_l + t, c]  = pos_embeds_l[n, c, t] + level_embed[l, c]  (a copy without it)
//   mask[n, start_l + t]    = masks_l[n, t] != 0                         (false without masks)
//   valid_ratios[n, l, 0]   = max(valid_W, 1) / W_l,  valid_W = #w with !masks_l[n, 0, w]
//   valid_ratios[n, l, 1]   = max(valid_H, 1) / H_l,  valid_H = #h with !masks_l[n, h, 0]
// The official code divides the plain counts; a level whose first row or column is
// all padding then gets ratio 0 and its reference points become inf * 0 = NaN. The
// clamp to one valid row / column is the only departure, and only in that case.
//
// Backward, for upstream gradients grad_src and grad_pos (N, S, C):
//   grad_features_l[n, c, t]  = grad_src[n, start_l + t, c]
//   grad_pos_embeds_l[n, c, t] = grad_pos[n, start_l + t, c]
//   grad_level_embed[l, c]    = sum over n and t < H_l * W_l of grad_pos[n, start_l + t, c]
// The sum is accumulated in double, in an order fixed by the shape alone (never by
// the thread count or the scheduler): partial sums per block of tokens go to a
// caller-provided workspace, then one pass adds them up block by block.
//
// Encoder reference points (N, S, L, 2): token t of level l, at row i and column j,
// sits at ((j + 0.5) / (valid_ratios[n, l, 0] * W_l), (i + 0.5) / (valid_ratios[n, l, 1] * H_l))
// and is repeated for every level k, scaled by valid_ratios[n, k, :].
//
// Layouts: every tensor contiguous, row-major. Storage type T (float, double, bf16;
// __half on CUDA) for features, pos_embeds, level_embed, src, pos and their
// gradients; masks and mask are bytes (0 = valid); valid_ratios and the reference
// points are Acc<T> (float, or double for double).
//
// The native code never allocates tensor memory: the caller hands it every buffer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ddetr/core.h"

namespace ddetr {

// Sizes and the level table. Build it with make_flatten_shape, which derives S and
// the level starts from the level sizes and checks everything.
struct FlattenShape {
  int64_t N = 0, C = 0, S = 0, L = 0;
  int64_t level_h[kMaxLevels] = {};
  int64_t level_w[kMaxLevels] = {};
  int64_t level_start[kMaxLevels] = {};
};

// Throws std::invalid_argument for N or C < 0, L outside [1, kMaxLevels] or a level
// with H or W < 1.
FlattenShape make_flatten_shape(int64_t N, int64_t C, int64_t L, const int64_t* level_h,
                                const int64_t* level_w);

// Per-level inputs are one pointer per level. Elements are T unless noted.
struct FlattenForwardArgs {
  const void* features[kMaxLevels] = {};    // (N, C, H_l, W_l)
  const void* pos_embeds[kMaxLevels] = {};  // (N, C, H_l, W_l)
  const uint8_t* masks[kMaxLevels] = {};    // (N, H_l, W_l); all null: no padding anywhere
  const void* level_embed = nullptr;        // (L, C), or null: pos is the flattened pos_embeds
  void* src = nullptr;                      // (N, S, C)
  void* pos = nullptr;                      // (N, S, C)
  uint8_t* mask = nullptr;                  // (N, S), written as 0 / 1
  void* valid_ratios = nullptr;             // (N, L, 2) Acc<T>
};

// A null output is not computed: all grad_features null, all grad_pos_embeds null,
// or grad_level_embed null.
struct FlattenBackwardArgs {
  const void* grad_src = nullptr;              // (N, S, C); needed for grad_features
  const void* grad_pos = nullptr;              // (N, S, C); needed for the other two
  void* grad_features[kMaxLevels] = {};        // (N, C, H_l, W_l)
  void* grad_pos_embeds[kMaxLevels] = {};      // (N, C, H_l, W_l)
  void* grad_level_embed = nullptr;            // (L, C)
  void* workspace = nullptr;                   // flatten_backward_workspace_bytes
  size_t workspace_bytes = 0;
};

template <class T>
void flatten_forward_cpu(const FlattenShape& shape, const FlattenForwardArgs& args,
                         int num_threads);

template <class T>
void flatten_backward_cpu(const FlattenShape& shape, const FlattenBackwardArgs& args,
                          int num_threads);

// A = float or double. valid_ratios (N, L, 2), out (N, S, L, 2).
template <class A>
void encoder_reference_points_cpu(const FlattenShape& shape, const A* valid_ratios, A* out,
                                  int num_threads);

// Tokens per partial sum of grad_level_embed: a CPU work item, a CUDA tile.
constexpr int64_t kFlattenCpuBlockTokens = 256;
constexpr int64_t kFlattenCudaTileTokens = 32;

// Blocks of `block` tokens per image, no block spanning two levels.
int64_t flatten_token_blocks(const FlattenShape& shape, int64_t block);

// Scratch the backward needs for grad_level_embed (0 when it is not asked for):
// one double per channel per block of tokens per image, the blocks being those of
// the CPU kernels (cuda = false) or of the CUDA kernels (cuda = true).
size_t flatten_backward_workspace_bytes(const FlattenShape& shape, bool with_level_embed,
                                        bool cuda);

// CUDA launchers (cuda/flatten.cu): on `stream` (a cudaStream_t as an integer), with
// `device` current; they throw std::runtime_error on CUDA errors. For the reference
// points `dtype` is f32 or f64, the type of valid_ratios and out.
void flatten_forward_cuda(DType dtype, const FlattenShape& shape, const FlattenForwardArgs& args,
                          int device, uintptr_t stream);

void flatten_backward_cuda(DType dtype, const FlattenShape& shape,
                           const FlattenBackwardArgs& args, int device, uintptr_t stream);

void encoder_reference_points_cuda(DType dtype, const FlattenShape& shape,
                                   const void* valid_ratios, void* out, int device,
                                   uintptr_t stream);

}  // namespace ddetr
