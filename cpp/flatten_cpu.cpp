// CPU kernels of multi-scale flattening and of the encoder reference points (the
// math and layouts are in ddetr/flatten.h).
//
// The work is a transpose per (image, level): (C, H*W) feature planes become
// (H*W, C) token rows and back. Threads split work items of (n, level l, a block of
// up to kFlattenCpuBlockTokens = 256 consecutive tokens of l); a block never spans
// two levels. Inside an item the transpose is cache-blocked:
//   forward:  kChannelBlock (8) planes at a time; for each of the item's tokens, one
//             element of each of the 8 planes is gathered into 8 contiguous outputs.
//             The 8 x 256 input elements (8 KiB of float, 8 pages) and the 256
//             output lines stay in L1 and the L1 TLB while the item is swept.
//   backward: token by token, each contiguous row of C gradients is scattered over
//             the C planes; the item's 256 columns of the planes (one line per plane
//             every 16 tokens) are written whole before they leave the cache.
// Both orders were the fastest of the variants measured on an AVX-512 machine (channel
// blocks of 4 to 256, the other side strided, 16-token tiles); either way each byte
// crosses the memory bus once.
//
// Forward: one sweep writes src, pos (+ level_embed) and the mask for every item;
// the valid ratios read only the first row and column of each mask, O(H + W) per
// (n, l), and are done by the same thread team afterwards.
//
// Backward: the same items, transposing back grad_src -> grad_features and
// grad_pos -> grad_pos_embeds; the item also sums its tokens' grad_pos rows in
// double into its own workspace row (no atomics, no shared accumulator). A second
// loop adds the rows of each level in item order, so grad_level_embed depends on
// the shape only, never on the thread count.
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ddetr/threads.h"
#include "ddetr/flatten.h"

namespace ddetr {
namespace {

constexpr int64_t kChannelBlock = 8;  // planes per forward block

// Below this many elements written (about half a millisecond on one core) waking a
// thread team costs more than it saves; on a loaded machine a worker that has to wait
// for a core can cost a whole scheduler slice.
constexpr int64_t kSerialBelowElements = 1 << 20;

// Work items numbered image-major, then level, then block: item = n * per_image +
// first[l] + b. The same numbering indexes the workspace rows of the backward.
struct ItemTable {
  int64_t first[kMaxLevels + 1] = {};
  int64_t per_image = 0;

  explicit ItemTable(const FlattenShape& s) {
    for (int64_t l = 0; l < s.L; ++l)
      first[l + 1] = first[l] + (s.level_h[l] * s.level_w[l] + kFlattenCpuBlockTokens - 1) /
                                    kFlattenCpuBlockTokens;
    per_image = first[s.L];
  }
};

struct Item {
  int64_t n, l;
  int64_t t0, t1;  // tokens [t0, t1) of level l
};

Item item_at(const FlattenShape& s, const ItemTable& items, int64_t id) {
  Item it{id / items.per_image, 0, 0, 0};
  const int64_t b = id % items.per_image;
  while (items.first[it.l + 1] <= b) ++it.l;
  it.t0 = (b - items.first[it.l]) * kFlattenCpuBlockTokens;
  it.t1 = std::min(it.t0 + kFlattenCpuBlockTokens, s.level_h[it.l] * s.level_w[it.l]);
  return it;
}

// tokens[t * C + c] = planes[c * hw + t] (+ embed[c]) for t < count, c < channels (CB
// when not 0): a block of channels of every token of an item. The inner loop gathers
// one element from each of CB planes and stores them contiguously.
template <class T, int CB>
void planes_to_tokens(const T* planes, int64_t hw, int64_t C, int64_t count, int64_t channels,
                      const T* embed, T* tokens) {
  const int64_t cb = CB ? CB : channels;
  for (int64_t t = 0; t < count; ++t) {
    const T* in = planes + t;
    T* out = tokens + t * C;
    if (embed) {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) out[c] = from_acc<T>(to_acc(in[c * hw]) + to_acc(embed[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) out[c] = in[c * hw];
    }
  }
}

// One item's tokens [t0, t1) of (C, hw) planes into rows of C, kChannelBlock
// channels at a time (see the file comment).
template <class T>
void item_to_tokens(const T* planes, int64_t hw, int64_t C, int64_t t0, int64_t t1,
                    const T* embed, T* tokens) {
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const T* in = planes + c0 * hw + t0;
    const T* e = embed ? embed + c0 : nullptr;
    T* out = tokens + t0 * C + c0;
    if (c0 + kChannelBlock <= C)
      planes_to_tokens<T, kChannelBlock>(in, hw, C, t1 - t0, kChannelBlock, e, out);
    else
      planes_to_tokens<T, 0>(in, hw, C, t1 - t0, C - c0, e, out);
  }
}

// planes[c * hw + t] = tokens[t * C + c] for t in [t0, t1) and every c: the inverse,
// reading each token row contiguously and scattering it over the C planes.
template <class T>
void tokens_to_planes(const T* tokens, int64_t C, int64_t t0, int64_t t1, int64_t hw,
                      T* planes) {
  for (int64_t t = t0; t < t1; ++t) {
    const T* in = tokens + t * C;
    T* out = planes + t;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c * hw] = in[c];
  }
}

template <class T>
void forward_item(const FlattenShape& s, const FlattenForwardArgs& a, const Item& it) {
  const int64_t hw = s.level_h[it.l] * s.level_w[it.l];
  const int64_t plane_offset = it.n * s.C * hw;  // features_l[n, 0, 0]
  const int64_t row = it.n * s.S + s.level_start[it.l];  // src[n, start_l, :]
  const T* feature = static_cast<const T*>(a.features[it.l]) + plane_offset;
  const T* pos_embed = static_cast<const T*>(a.pos_embeds[it.l]) + plane_offset;
  const T* embed = a.level_embed ? static_cast<const T*>(a.level_embed) + it.l * s.C : nullptr;
  T* src = static_cast<T*>(a.src) + row * s.C;
  T* pos = static_cast<T*>(a.pos) + row * s.C;
  item_to_tokens(feature, hw, s.C, it.t0, it.t1, static_cast<const T*>(nullptr), src);
  item_to_tokens(pos_embed, hw, s.C, it.t0, it.t1, embed, pos);
  uint8_t* mask = a.mask + row;
  const uint8_t* in = a.masks[it.l];
  for (int64_t t = it.t0; t < it.t1; ++t) mask[t] = in ? uint8_t(in[it.n * hw + t] != 0) : 0;
}

// Valid ratios of image n, level l: unpadded entries of the first column and row.
template <class A>
void valid_ratio(const FlattenShape& s, const FlattenForwardArgs& a, int64_t n, int64_t l,
                 A* out) {
  const int64_t H = s.level_h[l], W = s.level_w[l];
  int64_t valid_h = H, valid_w = W;
  if (const uint8_t* m = a.masks[l]) {
    m += n * H * W;
    valid_h = valid_w = 0;
    for (int64_t h = 0; h < H; ++h) valid_h += m[h * W] == 0;
    for (int64_t w = 0; w < W; ++w) valid_w += m[w] == 0;
  }
  // A fully padded row / column counts one valid pixel: ratios stay > 0 (flatten.h).
  out[0] = A(std::max<int64_t>(valid_w, 1)) / A(W);
  out[1] = A(std::max<int64_t>(valid_h, 1)) / A(H);
}

template <class T>
void backward_item(const FlattenShape& s, const FlattenBackwardArgs& a, const Item& it,
                   double* partial) {
  const int64_t hw = s.level_h[it.l] * s.level_w[it.l];
  const int64_t plane_offset = it.n * s.C * hw;
  const int64_t row = it.n * s.S + s.level_start[it.l];
  // Either upstream gradient may be null when nothing that reads it was asked for.
  const T* grad_src = a.grad_src ? static_cast<const T*>(a.grad_src) + row * s.C : nullptr;
  const T* grad_pos = a.grad_pos ? static_cast<const T*>(a.grad_pos) + row * s.C : nullptr;
  T* grad_feature = static_cast<T*>(a.grad_features[it.l]);
  T* grad_pos_embed = static_cast<T*>(a.grad_pos_embeds[it.l]);
  if (grad_feature) tokens_to_planes(grad_src, s.C, it.t0, it.t1, hw, grad_feature + plane_offset);
  if (grad_pos_embed)
    tokens_to_planes(grad_pos, s.C, it.t0, it.t1, hw, grad_pos_embed + plane_offset);
  if (!partial) return;
  std::fill(partial, partial + s.C, 0.0);
  for (int64_t t = it.t0; t < it.t1; ++t) {
    const T* g = grad_pos + t * s.C;
#pragma omp simd
    for (int64_t c = 0; c < s.C; ++c) partial[c] += double(to_acc(g[c]));
  }
}

}  // namespace

template <class T>
void flatten_forward_cpu(const FlattenShape& s, const FlattenForwardArgs& a, int num_threads) {
  using A = Acc<T>;
  const ItemTable items(s);
  const int64_t total = s.N * items.per_image;
  const int threads = resolve_threads(num_threads, 2 * s.N * s.S * s.C,
                                      kSerialBelowElements);
  A* ratios = static_cast<A*>(a.valid_ratios);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for DDETR_SHARE_ROWS nowait
    for (int64_t id = 0; id < total; ++id) forward_item<T>(s, a, item_at(s, items, id));
#pragma omp for DDETR_SHARE_ROWS
    for (int64_t nl = 0; nl < s.N * s.L; ++nl)
      valid_ratio(s, a, nl / s.L, nl % s.L, ratios + 2 * nl);
  }
}

template <class T>
void flatten_backward_cpu(const FlattenShape& s, const FlattenBackwardArgs& a, int num_threads) {
  const ItemTable items(s);
  const int64_t total = s.N * items.per_image;
  const int threads = resolve_threads(num_threads, 2 * s.N * s.S * s.C,
                                      kSerialBelowElements);
  double* partials = a.grad_level_embed ? static_cast<double*>(a.workspace) : nullptr;
  T* grad_embed = static_cast<T*>(a.grad_level_embed);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for DDETR_SHARE_ROWS
    for (int64_t id = 0; id < total; ++id)
      backward_item<T>(s, a, item_at(s, items, id), partials ? partials + id * s.C : nullptr);
    if (grad_embed) {
      // Each (l, c) adds its level's rows image by image, block by block: a fixed order.
#pragma omp for DDETR_SHARE_ROWS
      for (int64_t lc = 0; lc < s.L * s.C; ++lc) {
        const int64_t l = lc / s.C, c = lc % s.C;
        double sum = 0.0;
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t b = items.first[l]; b < items.first[l + 1]; ++b)
            sum += partials[(n * items.per_image + b) * s.C + c];
        grad_embed[lc] = from_acc<T>(Acc<T>(sum));
      }
    }
  }
}

template <class A>
void encoder_reference_points_cpu(const FlattenShape& s, const A* valid_ratios, A* out,
                                  int num_threads) {
  const int threads = resolve_threads(num_threads, s.N * s.S * s.L * 2,
                                      kSerialBelowElements);
  // Rows of every (n, l): out[n, start_l + i * W_l + j, k, :].
  int64_t rows_per_image = 0;
  for (int64_t l = 0; l < s.L; ++l) rows_per_image += s.level_h[l];
#pragma omp parallel for num_threads(threads) DDETR_SHARE_ROWS
  for (int64_t nr = 0; nr < s.N * rows_per_image; ++nr) {
    const int64_t n = nr / rows_per_image;
    int64_t i = nr % rows_per_image, l = 0;
    while (i >= s.level_h[l]) i -= s.level_h[l++];
    const int64_t H = s.level_h[l], W = s.level_w[l];
    const A* ratios = valid_ratios + n * s.L * 2;  // (L, 2) of image n
    // Same operations and rounding order as the official PyTorch code.
    const A y = (A(i) + A(0.5)) / (ratios[2 * l + 1] * A(H));
    const A x_scale = ratios[2 * l] * A(W);
    A* o = out + ((n * s.S + s.level_start[l] + i * W) * s.L) * 2;
    for (int64_t j = 0; j < W; ++j) {
      const A x = (A(j) + A(0.5)) / x_scale;
      for (int64_t k = 0; k < s.L; ++k, o += 2) {
        o[0] = x * ratios[2 * k];
        o[1] = y * ratios[2 * k + 1];
      }
    }
  }
}

template void flatten_forward_cpu<float>(const FlattenShape&, const FlattenForwardArgs&, int);
template void flatten_forward_cpu<double>(const FlattenShape&, const FlattenForwardArgs&, int);
template void flatten_forward_cpu<bf16>(const FlattenShape&, const FlattenForwardArgs&, int);
template void flatten_backward_cpu<float>(const FlattenShape&, const FlattenBackwardArgs&, int);
template void flatten_backward_cpu<double>(const FlattenShape&, const FlattenBackwardArgs&, int);
template void flatten_backward_cpu<bf16>(const FlattenShape&, const FlattenBackwardArgs&, int);
template void encoder_reference_points_cpu<float>(const FlattenShape&, const float*, float*, int);
template void encoder_reference_points_cpu<double>(const FlattenShape&, const double*, double*,
                                                   int);

}  // namespace ddetr
