// Multi-scale flattening and the encoder reference points on CUDA (math and
// layouts in ddetr/flatten.h; the CPU kernels in cpp/flatten_cpu.cpp are the
// readable spec of these).
//
// Flattening is a transpose per (image, level): (C, H*W) planes <-> (H*W, C) token
// rows. Both directions go through shared memory in tiles of 32 tokens x 32
// channels, one tile per block of 32 x 8 threads, so that global reads and writes
// are both coalesced:
//   forward:  lane x reads token t0 + x of channel rows c0 + y, y + 8, ... (a run of
//             32 tokens of one plane), then writes channel c0 + x of token rows
//             t0 + y, ... (a run of 32 channels of one token row);
//   backward: the mirror image (runs of channels in, runs of tokens out).
// The tile row is padded to 33 elements so the transposed read of a column hits
// 32 different banks (float; 2-byte types share words pairwise, double needs two
// wavefronts anyway). Blocks walk the tiles with a grid stride; a tile never spans
// two levels, so the last tile of a level may be partial (bounds checks).
//
// Tile numbering: tile b = ((n * tiles_per_image) + token_tile) * channel_tiles +
// channel_tile, token tiles numbered level by level (TileTable).
//
// Besides the transposes, the forward's tiles of channel block 0 write the mask of
// their 32 tokens, and the first tile of each (n, l) counts the valid rows and
// columns of its mask: a block-wide count with integer atomics in shared memory
// (integer addition commutes, so the count is exact and deterministic). The
// backward's tiles sum their 32 tokens of grad_pos per channel in double, in a
// fixed order, into one workspace row per token tile; a second small kernel adds
// each level's rows in tile order. No floating-point atomics anywhere: results
// are bitwise reproducible.
#include "common.cuh"
#include "ddetr/flatten.h"

namespace ddetr {
namespace cuda_detail {
namespace {

constexpr int kTileDim = 32;  // tokens and channels per tile
constexpr int kTileRows = 8;  // blockDim.y: each thread moves 4 elements per tensor
static_assert(kTileDim == kFlattenCudaTileTokens, "the workspace layout assumes this tile");

struct TileTable {
  int64_t first[kMaxLevels + 1];  // first token tile of each level within an image
  int64_t per_image;              // token tiles per image
  int64_t channel_tiles;          // at least 1, so C = 0 still writes masks and ratios
};

TileTable make_tiles(const FlattenShape& s) {
  TileTable t{};
  for (int64_t l = 0; l < s.L; ++l)
    t.first[l + 1] = t.first[l] + (s.level_h[l] * s.level_w[l] + kTileDim - 1) / kTileDim;
  t.per_image = t.first[s.L];
  t.channel_tiles = s.C > 0 ? (s.C + kTileDim - 1) / kTileDim : 1;
  return t;
}

struct Tile {
  int64_t n, l;
  int64_t token_tile;  // within the image, over all levels
  int64_t t0, c0;      // first token (within level l) and first channel
  int64_t hw;          // tokens of level l
};

__device__ __forceinline__ Tile tile_at(const FlattenShape& s, const TileTable& tiles,
                                        int64_t b) {
  Tile t;
  const int64_t rest = b / tiles.channel_tiles;
  t.c0 = (b % tiles.channel_tiles) * kTileDim;
  t.token_tile = rest % tiles.per_image;
  t.n = rest / tiles.per_image;
  t.l = 0;
  while (tiles.first[t.l + 1] <= t.token_tile) ++t.l;
  t.t0 = (t.token_tile - tiles.first[t.l]) * kTileDim;
  t.hw = s.level_h[t.l] * s.level_w[t.l];
  return t;
}

// Two padded kTileDim x kTileDim tiles of T in static shared memory, sized for the
// widest T (double); raw bytes because __half need not be trivially constructible.
template <class T> using TileRow = T[kTileDim + 1];
constexpr int kTileBytes = kTileDim * (kTileDim + 1) * int(sizeof(double));

// Valid ratios of (n, l), by the whole block (every thread must call it).
template <class A>
__device__ void block_valid_ratio(const FlattenShape& s, const FlattenForwardArgs& a,
                                  const Tile& t, int* counts, A* ratios) {
  const int tid = threadIdx.y * kTileDim + threadIdx.x;
  const int64_t H = s.level_h[t.l], W = s.level_w[t.l];
  const uint8_t* m = a.masks[t.l];
  if (tid == 0) counts[0] = counts[1] = 0;
  __syncthreads();
  if (m) {
    m += t.n * t.hw;
    int rows = 0, cols = 0;
    for (int64_t h = tid; h < H; h += kTileDim * kTileRows) rows += m[h * W] == 0;
    for (int64_t w = tid; w < W; w += kTileDim * kTileRows) cols += m[w] == 0;
    if (rows) atomicAdd(&counts[0], rows);
    if (cols) atomicAdd(&counts[1], cols);
  }
  __syncthreads();
  if (tid == 0) {
    const int64_t valid_h = m ? counts[0] : H, valid_w = m ? counts[1] : W;
    // A fully padded row / column counts one valid pixel: ratios stay > 0 (flatten.h).
    A* r = ratios + 2 * (t.n * s.L + t.l);
    r[0] = A(valid_w > 1 ? valid_w : 1) / A(W);
    r[1] = A(valid_h > 1 ? valid_h : 1) / A(H);
  }
}

template <class T>
__global__ void __launch_bounds__(kTileDim * kTileRows)
    flatten_forward_kernel(const FlattenShape s, const FlattenForwardArgs a,
                           const TileTable tiles) {
  using A = Acc<T>;
  __shared__ __align__(16) unsigned char smem[2 * kTileBytes];
  __shared__ int counts[2];
  TileRow<T>* feat = reinterpret_cast<TileRow<T>*>(smem);
  TileRow<T>* pemb = reinterpret_cast<TileRow<T>*>(smem + kTileBytes);
  const int x = threadIdx.x, y = threadIdx.y;
  const T* level_embed = static_cast<const T*>(a.level_embed);
  T* src = static_cast<T*>(a.src);
  T* pos = static_cast<T*>(a.pos);
  const int64_t total = s.N * tiles.per_image * tiles.channel_tiles;

  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    const Tile t = tile_at(s, tiles, b);
    const int64_t plane = t.n * s.C * t.hw;  // features_l[n, 0, 0]
    const T* feature = static_cast<const T*>(a.features[t.l]) + plane;
    const T* pos_embed = static_cast<const T*>(a.pos_embeds[t.l]) + plane;

    // In: runs of 32 tokens of one channel plane.
    const int64_t t_in = t.t0 + x;
    for (int r = y; r < kTileDim; r += kTileRows) {
      const int64_t c = t.c0 + r;
      if (c < s.C && t_in < t.hw) {
        feat[r][x] = feature[c * t.hw + t_in];
        pemb[r][x] = pos_embed[c * t.hw + t_in];
      }
    }
    __syncthreads();

    // Out: runs of 32 channels of one token row.
    const int64_t c_out = t.c0 + x;
    const int64_t row0 = t.n * s.S + s.level_start[t.l];  // src[n, start_l, :]
    const A embed = level_embed && c_out < s.C ? to_acc(level_embed[t.l * s.C + c_out]) : A(0);
    for (int r = y; r < kTileDim; r += kTileRows) {
      const int64_t tok = t.t0 + r;
      if (tok < t.hw && c_out < s.C) {
        const int64_t o = (row0 + tok) * s.C + c_out;
        src[o] = feat[x][r];
        // Without level_embed a plain copy: adding 0 would turn -0 into +0.
        pos[o] = level_embed ? from_acc<T>(to_acc(pemb[x][r]) + embed) : pemb[x][r];
      }
    }

    if (t.c0 == 0) {  // uniform over the block
      if (y == 0 && t_in < t.hw) {
        const uint8_t* m = a.masks[t.l];
        a.mask[row0 + t_in] = m ? uint8_t(m[t.n * t.hw + t_in] != 0) : uint8_t(0);
      }
      if (t.t0 == 0) block_valid_ratio(s, a, t, counts, static_cast<A*>(a.valid_ratios));
    }
    __syncthreads();  // the next tile reuses the shared tiles and counts
  }
}

template <class T>
__global__ void __launch_bounds__(kTileDim * kTileRows)
    flatten_backward_kernel(const FlattenShape s, const FlattenBackwardArgs a,
                            const TileTable tiles) {
  __shared__ __align__(16) unsigned char smem[2 * kTileBytes];
  __shared__ double partial[kTileRows][kTileDim];
  TileRow<T>* gsrc = reinterpret_cast<TileRow<T>*>(smem);
  TileRow<T>* gpos = reinterpret_cast<TileRow<T>*>(smem + kTileBytes);
  const int x = threadIdx.x, y = threadIdx.y;
  const bool want_feature = a.grad_features[0] != nullptr;
  const bool want_pos = a.grad_pos_embeds[0] != nullptr;
  const bool want_embed = a.grad_level_embed != nullptr;
  const T* grad_src = static_cast<const T*>(a.grad_src);
  const T* grad_pos = static_cast<const T*>(a.grad_pos);
  double* workspace = static_cast<double*>(a.workspace);
  const int64_t total = s.N * tiles.per_image * tiles.channel_tiles;

  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    const Tile t = tile_at(s, tiles, b);
    const int64_t row0 = t.n * s.S + s.level_start[t.l];

    // In: runs of 32 channels of one token row; this thread's share of the
    // level_embed sum is its channel over tokens y, y + 8, y + 16, y + 24, in order.
    const int64_t c_in = t.c0 + x;
    double sum = 0.0;
    for (int r = y; r < kTileDim; r += kTileRows) {
      const int64_t tok = t.t0 + r;
      if (tok < t.hw && c_in < s.C) {
        const int64_t o = (row0 + tok) * s.C + c_in;
        if (want_feature) gsrc[r][x] = grad_src[o];
        if (want_pos || want_embed) {
          const T g = grad_pos[o];
          gpos[r][x] = g;
          sum += double(to_acc(g));
        }
      }
    }
    if (want_embed) partial[y][x] = sum;
    __syncthreads();

    // Out: runs of 32 tokens of one channel plane.
    const int64_t t_out = t.t0 + x;
    const int64_t plane = t.n * s.C * t.hw;
    for (int r = y; r < kTileDim; r += kTileRows) {
      const int64_t c = t.c0 + r;
      if (c < s.C && t_out < t.hw) {
        const int64_t o = plane + c * t.hw + t_out;
        if (want_feature) static_cast<T*>(a.grad_features[t.l])[o] = gsrc[x][r];
        if (want_pos) static_cast<T*>(a.grad_pos_embeds[t.l])[o] = gpos[x][r];
      }
    }
    if (want_embed && y == 0 && c_in < s.C) {
      double tile_sum = 0.0;
#pragma unroll
      for (int k = 0; k < kTileRows; ++k) tile_sum += partial[k][x];
      workspace[(t.n * tiles.per_image + t.token_tile) * s.C + c_in] = tile_sum;
    }
    __syncthreads();  // the next tile reuses the shared tiles and partials
  }
}

// grad_level_embed[l, c]: the level's workspace rows, image by image, tile by tile.
// One thread per (l, c): consecutive threads read consecutive channels.
template <class T>
__global__ void level_embed_sum_kernel(const FlattenShape s, const TileTable tiles,
                                       const double* __restrict__ workspace,
                                       T* __restrict__ grad_level_embed) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t lc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; lc < s.L * s.C;
       lc += stride) {
    const int64_t l = lc / s.C, c = lc % s.C;
    double sum = 0.0;
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t b = tiles.first[l]; b < tiles.first[l + 1]; ++b)
        sum += workspace[(n * tiles.per_image + b) * s.C + c];
    grad_level_embed[lc] = from_acc<T>(Acc<T>(sum));
  }
}

// One thread per output pair (n, token, level k): consecutive threads write
// consecutive pairs. Same operations and rounding as the official PyTorch code
// (IEEE division: this file is not built with fast math).
template <class A>
__global__ void reference_points_kernel(const FlattenShape s, const A* __restrict__ ratios,
                                        A* __restrict__ out) {
  const int64_t total = s.N * s.S * s.L;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t k = idx % s.L, token = idx / s.L % s.S, n = idx / (s.L * s.S);
    int64_t l = 0;
    while (l + 1 < s.L && s.level_start[l + 1] <= token) ++l;
    const int64_t H = s.level_h[l], W = s.level_w[l];
    const int64_t i = (token - s.level_start[l]) / W, j = (token - s.level_start[l]) % W;
    const A* r = ratios + n * s.L * 2;
    const A px = (A(j) + A(0.5)) / (r[2 * l] * A(W));
    const A py = (A(i) + A(0.5)) / (r[2 * l + 1] * A(H));
    out[2 * idx] = px * r[2 * k];
    out[2 * idx + 1] = py * r[2 * k + 1];
  }
}

}  // namespace
}  // namespace cuda_detail

void flatten_forward_cuda(DType dtype, const FlattenShape& shape, const FlattenForwardArgs& args,
                          int device, uintptr_t stream) {
  using namespace cuda_detail;
  const TileTable tiles = make_tiles(shape);
  const int64_t total = shape.N * tiles.per_image * tiles.channel_tiles;
  if (total == 0) return;
  DeviceGuard guard(device);
  const dim3 block(kTileDim, kTileRows);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    flatten_forward_kernel<T><<<grid_blocks(total, 1), block, 0, as_stream(stream)>>>(
        shape, args, tiles);
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

void flatten_backward_cuda(DType dtype, const FlattenShape& shape,
                           const FlattenBackwardArgs& args, int device, uintptr_t stream) {
  using namespace cuda_detail;
  const TileTable tiles = make_tiles(shape);
  const int64_t total = shape.N * tiles.per_image * tiles.channel_tiles;
  const bool embed = args.grad_level_embed != nullptr && shape.L * shape.C > 0;
  // With N = 0 there are no tiles, but grad_level_embed must still be written (zeros).
  const bool tiles_needed =
      total > 0 && (args.grad_features[0] || args.grad_pos_embeds[0] || embed);
  if (!tiles_needed && !embed) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (tiles_needed) {
      flatten_backward_kernel<T><<<grid_blocks(total, 1), dim3(kTileDim, kTileRows), 0, st>>>(
          shape, args, tiles);
      DDETR_CUDA_CHECK_LAUNCH();
    }
    if (embed) {
      level_embed_sum_kernel<T><<<grid_blocks(shape.L * shape.C, kBlock), kBlock, 0, st>>>(
          shape, tiles, static_cast<const double*>(args.workspace),
          static_cast<T*>(args.grad_level_embed));
      DDETR_CUDA_CHECK_LAUNCH();
    }
  });
}

void encoder_reference_points_cuda(DType dtype, const FlattenShape& shape,
                                   const void* valid_ratios, void* out, int device,
                                   uintptr_t stream) {
  using namespace cuda_detail;
  const int64_t total = shape.N * shape.S * shape.L;
  if (total == 0) return;
  if (dtype != DType::f32 && dtype != DType::f64)
    throw std::invalid_argument("encoder_reference_points takes float32 or float64 ratios");
  DeviceGuard guard(device);
  dispatch(dtype, [&](auto tag) {
    using A = Acc<typename decltype(tag)::type>;
    reference_points_kernel<A><<<grid_blocks(total, kBlock), kBlock, 0, as_stream(stream)>>>(
        shape, static_cast<const A*>(valid_ratios), static_cast<A*>(out));
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace ddetr
