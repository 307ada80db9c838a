// Deterministic grad_value of the MSDA backward: bitwise the same on every run,
// because every element is summed in one fixed order and no floating-point
// atomic is used.
//
// Math: grad_value[n, start_l + pixel_k, m, c] += sum over the corner entries
// (sample s, corner k) that land on that pixel of attn[s] * weight_k(s) * g[s's row, c],
// with weight_k / pixel_k from bilinear_setup (ddetr/bilinear.h). It adds into
// grad_value, as the fast path's atomics do (msda.h: the caller zeroes it), so a caller
// that runs the backward block by block (the layer driver) accumulates in place.
//
// Layout: grad_value (N, S, M, D) viewed as R = N * S * M rows of D channels; row
// r = (n * S + start_l + pixel) * M + m. Entries are e = 4 * s + k with s the flat
// index of (n, q, m, l, p) in loc / attn, so s recovers loc, attn and the
// grad_out row s / (L * P).
//
// Steps, all on the caller's stream, all scratch from the caller's workspace:
//  1. corner_keys_kernel (one thread per sample): key[e] = row of corner k, or
//     the sentinel R when the corner is off the map; id[e] = e; counts[row]++.
//     The counts use integer atomics, which are exact in any order.
//  2. cub::DeviceRadixSort::SortPairs on (key, id) over bits [0, bit_width(R)).
//     LSD radix sort is stable and the ids start in increasing order, so the
//     entries of one row come out in increasing entry id: a fixed order.
//     Sentinels sort last and are never read.
//  3. cub::DeviceScan::ExclusiveSum over the R + 1 counts, in place: row r's
//     entries are sorted_id[offsets[r], offsets[r + 1]).
//  4. row_reduce_kernel: one group of lanes per row, lanes over channels
//     (msda_common.cuh). The group takes the row's entries `group` at a time:
//     lane t decodes entry t of the batch (id -> loc, attn, bilinear_setup) so
//     the decoding runs in parallel, then the batch is broadcast with shuffles
//     in entry order and every lane adds coef * g_c for its channels. Each
//     lane owns its channels, so each element's share is a sequential sum from
//     0 in entry order, which the lane then adds to the element once:
//     grad_value = grad_value + share. A row nothing lands on is not touched.
//
// Workspace (msda_backward_workspace_bytes_cuda(shape, true)), T4 = 4 * N * Lq * M * L * P,
// each part rounded up to 256 bytes, plus 255 bytes to align the base pointer:
//   keys[2] and ids[2] (uint32, T4 each; the sort ping-pongs between the pair),
//   counts / offsets (uint32, R + 1), CUB temp storage (max of sort and scan).
// The 32-bit keys and ids, and CUB's int item counts, need T4 <= 2^31 - 1 and
// R + 1 <= 2^31 - 1; larger problems are rejected with std::invalid_argument.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "msda_common.cuh"

namespace ddetr {
namespace cuda_detail {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    throw std::invalid_argument("ddetr: deterministic MSDA backward: problem size overflows int64");
  return r;
}

// Where each scratch buffer sits, as byte offsets from the 256-aligned base.
struct Plan {
  int64_t samples = 0;  // N * Lq * M * L * P
  int64_t corners = 0;  // 4 * samples: sort entries
  int64_t rows = 0;     // N * S * M: grad_value rows, and the sentinel key
  int end_bit = 0;      // key bits the sort must look at
  size_t keys[2] = {0, 0}, ids[2] = {0, 0}, counts = 0, temp = 0;
  size_t temp_bytes = 0;
  size_t total = 0;  // what the caller must provide, base alignment included
};

// Queries CUB on the current device (its temp size may depend on the GPU).
Plan make_plan(const MsdaShape& s) {
  Plan plan;
  plan.samples = checked_mul(checked_mul(checked_mul(s.N, s.Lq), s.M), checked_mul(s.L, s.P));
  plan.corners = checked_mul(plan.samples, 4);
  if (plan.corners == 0) return plan;
  plan.rows = checked_mul(checked_mul(s.N, s.S), s.M);

  constexpr int64_t kMaxItems = INT32_MAX;
  if (plan.corners > kMaxItems)
    throw std::invalid_argument(
        "ddetr: deterministic MSDA backward supports at most 2^31 - 1 sampling corners "
        "(4 * N * Lq * M * L * P), got " +
        std::to_string(plan.corners) + "; split the batch or use deterministic=false");
  if (plan.rows + 1 > kMaxItems)
    throw std::invalid_argument(
        "ddetr: deterministic MSDA backward supports at most 2^31 - 2 value rows "
        "(N * S * M), got " +
        std::to_string(plan.rows) + "; split the batch or use deterministic=false");

  while (plan.end_bit < 32 && (int64_t(1) << plan.end_bit) <= plan.rows) ++plan.end_bit;

  const int corners = static_cast<int>(plan.corners);
  const int scan_items = static_cast<int>(plan.rows + 1);
  size_t sort_bytes = 0, scan_bytes = 0;
  cub::DoubleBuffer<uint32_t> no_keys(nullptr, nullptr), no_ids(nullptr, nullptr);
  DDETR_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, no_keys, no_ids, corners,
                                                   0, plan.end_bit));
  uint32_t* const no_counts = nullptr;
  DDETR_CUDA_CHECK(
      cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, no_counts, no_counts, scan_items));
  plan.temp_bytes = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;

  const size_t entry_bytes = align_up(size_t(plan.corners) * sizeof(uint32_t));
  size_t at = 0;
  for (size_t& part : plan.keys) { part = at; at += entry_bytes; }
  for (size_t& part : plan.ids) { part = at; at += entry_bytes; }
  plan.counts = at;
  at += align_up(size_t(plan.rows + 1) * sizeof(uint32_t));
  plan.temp = at;
  at += align_up(plan.temp_bytes);
  plan.total = at + (kAlign - 1);
  return plan;
}

template <class T>
__global__ void corner_keys_kernel(const MsdaShape s, const Acc<T>* __restrict__ loc,
                                   uint32_t* __restrict__ keys, uint32_t* __restrict__ ids,
                                   uint32_t* __restrict__ counts, const int64_t samples) {
  using A = Acc<T>;
  const uint32_t sentinel = static_cast<uint32_t>(s.N * s.S * s.M);
  const int64_t per_row = s.L * s.P;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < samples;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = (i / s.P) % s.L;
    const int64_t row = i / per_row;
    const int64_t m = row % s.M;
    const int64_t n = row / (s.Lq * s.M);
    const Vec2<A> xy = load_xy(loc, i);
    Bilinear<A> b;
    const bool valid = bilinear_setup(xy.x, xy.y, s.level_h[l], s.level_w[l], b);
    uint32_t key[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      key[k] = sentinel;
      if (valid && b.pixel[k] >= 0) {
        key[k] = static_cast<uint32_t>((n * s.S + s.level_start[l] + b.pixel[k]) * s.M + m);
        atomicAdd(counts + key[k], 1u);
      }
    }
    // The four entries of a sample are adjacent and the buffers 256-byte aligned.
    const uint32_t e = static_cast<uint32_t>(4 * i);
    reinterpret_cast<uint4*>(keys)[i] = make_uint4(key[0], key[1], key[2], key[3]);
    reinterpret_cast<uint4*>(ids)[i] = make_uint4(e, e + 1, e + 2, e + 3);
  }
}

// No __launch_bounds__: see msda_forward.cu.
template <class T, int CPL>
__global__ void row_reduce_kernel(const MsdaShape s, const Acc<T>* __restrict__ loc,
                                  const Acc<T>* __restrict__ attn,
                                  const T* __restrict__ grad_out,
                                  const uint32_t* __restrict__ offsets,
                                  const uint32_t* __restrict__ sorted_ids,
                                  Acc<T>* __restrict__ grad_value, const int group) {
  using A = Acc<T>;
  const int64_t rows = s.N * s.S * s.M;
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  // Shuffles stay inside the group: groups of one warp may sit in different
  // rows with different entry counts, so they must not wait for each other.
  const unsigned group_mask =
      group == kWarp ? 0xffffffffu
                     : ((1u << group) - 1u) << ((threadIdx.x % kWarp) & ~unsigned(group - 1));
  const int64_t groups_per_block = kBlock / group;
  const int64_t grid_stride = int64_t(gridDim.x) * groups_per_block;
  const int64_t chunk = int64_t(group) * CPL;
  const int64_t per_row = s.L * s.P;

  for (int64_t r = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / group; r < rows;
       r += grid_stride) {
    const uint32_t begin = offsets[r], end = offsets[r + 1];
    if (begin == end) continue;  // the same for the whole group: nothing to add
    Acc<T>* out_row = grad_value + r * s.D + lane;

    for (int64_t c0 = 0; c0 < s.D; c0 += chunk) {
      A acc[CPL];
#pragma unroll
      for (int j = 0; j < CPL; ++j) acc[j] = A(0);

      for (uint32_t t0 = begin; t0 < end; t0 += group) {
        // Lane t decodes entry t0 + t: coefficient attn * weight_k and grad_out row.
        A coef = A(0);
        int64_t go_row = 0;
        const uint32_t t = t0 + lane;
        if (t < end) {
          const uint32_t e = sorted_ids[t];
          const int64_t i = e >> 2;
          const int k = e & 3;
          const int64_t l = (i / s.P) % s.L;
          const Vec2<A> xy = load_xy(loc, i);
          Bilinear<A> b;
          if (bilinear_setup(xy.x, xy.y, s.level_h[l], s.level_w[l], b)) {
            // Select without indexing by the runtime k, which would put b in local memory.
            A w = b.weight[0];
#pragma unroll
            for (int kk = 1; kk < 4; ++kk)
              if (k == kk) w = b.weight[kk];
            coef = fold_weight(attn[i], w);
          }
          go_row = i / per_row;
        }
        const int batch = end - t0 < uint32_t(group) ? int(end - t0) : group;
        // Entry order within the row = batch order, then lane order: fixed. The
        // unroll lets the grad_out loads of several entries overlap; the adds
        // into acc stay in entry order (the compiler does not reassociate them).
#pragma unroll 4
        for (int src = 0; src < batch; ++src) {
          const A cb = __shfl_sync(group_mask, coef, src, group);
          const int64_t rb = __shfl_sync(group_mask, go_row, src, group);
          const T* g = grad_out + rb * s.D + c0 + lane;
#pragma unroll
          for (int j = 0; j < CPL; ++j)
            if (c0 + lane + int64_t(j) * group < s.D) acc[j] += cb * to_acc(g[j * group]);
        }
      }

#pragma unroll
      for (int j = 0; j < CPL; ++j)
        if (c0 + lane + int64_t(j) * group < s.D)
          out_row[c0 + j * group] = out_row[c0 + j * group] + acc[j];
    }
  }
}

}  // namespace

size_t deterministic_workspace_bytes(const MsdaShape& shape) { return make_plan(shape).total; }

template <class T>
void deterministic_grad_value(const MsdaShape& s, const Acc<T>* loc, const Acc<T>* attn,
                              const T* grad_out, Acc<T>* grad_value, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  const Plan plan = make_plan(s);
  if (plan.corners == 0) return;
  if (workspace == nullptr || workspace_bytes < plan.total)
    throw std::invalid_argument(
        "ddetr: deterministic MSDA backward needs a workspace of " + std::to_string(plan.total) +
        " bytes (msda_backward_workspace_bytes_cuda on the same device), got " +
        std::to_string(workspace == nullptr ? 0 : workspace_bytes));
  if (s.D == 0) return;  // grad_value has no elements

  const uintptr_t raw = reinterpret_cast<uintptr_t>(workspace);
  char* base = reinterpret_cast<char*>((raw + kAlign - 1) / kAlign * kAlign);
  uint32_t* keys[2] = {reinterpret_cast<uint32_t*>(base + plan.keys[0]),
                       reinterpret_cast<uint32_t*>(base + plan.keys[1])};
  uint32_t* ids[2] = {reinterpret_cast<uint32_t*>(base + plan.ids[0]),
                      reinterpret_cast<uint32_t*>(base + plan.ids[1])};
  uint32_t* counts = reinterpret_cast<uint32_t*>(base + plan.counts);
  void* temp = base + plan.temp;

  DDETR_CUDA_CHECK(
      cudaMemsetAsync(counts, 0, size_t(plan.rows + 1) * sizeof(uint32_t), stream));
  corner_keys_kernel<T><<<grid_blocks(plan.samples, kBlock), kBlock, 0, stream>>>(
      s, loc, keys[0], ids[0], counts, plan.samples);
  DDETR_CUDA_CHECK_LAUNCH();

  cub::DoubleBuffer<uint32_t> key_buf(keys[0], keys[1]), id_buf(ids[0], ids[1]);
  size_t temp_bytes = plan.temp_bytes;
  DDETR_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, key_buf, id_buf,
                                                   static_cast<int>(plan.corners), 0,
                                                   plan.end_bit, stream));
  temp_bytes = plan.temp_bytes;
  DDETR_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, counts,
                                                 static_cast<int>(plan.rows + 1), stream));

  const ChannelSplit split = split_channels(s.D);
  const unsigned blocks = grid_blocks(plan.rows, kBlock / split.group);
  dispatch_cpl(split.cpl, [&](auto cpl) {
    row_reduce_kernel<T, decltype(cpl)::value><<<blocks, kBlock, 0, stream>>>(
        s, loc, attn, grad_out, counts, id_buf.Current(), grad_value, split.group);
    DDETR_CUDA_CHECK_LAUNCH();
  });
}

template void deterministic_grad_value<float>(const MsdaShape&, const float*, const float*,
                                              const float*, float*, void*, size_t, cudaStream_t);
template void deterministic_grad_value<double>(const MsdaShape&, const double*, const double*,
                                               const double*, double*, void*, size_t,
                                               cudaStream_t);
template void deterministic_grad_value<__half>(const MsdaShape&, const float*, const float*,
                                               const __half*, float*, void*, size_t,
                                               cudaStream_t);
template void deterministic_grad_value<bf16>(const MsdaShape&, const float*, const float*,
                                             const bf16*, float*, void*, size_t, cudaStream_t);

}  // namespace cuda_detail
}  // namespace ddetr
