// CPU kernels of multi-scale deformable attention (layouts in ddetr/msda.h, the
// sampling math in ddetr/bilinear.h).
//
// Both passes work in two phases per query:
//   1. corner setup, vectorised across the query's samples: bilinear_setup for each
//      sample, then the element offsets of its four corners and their weights
//      (folded with the attention weight), into small per-thread SoA arrays;
//   2. the channel loops: per sample, four gathers of D contiguous channels.
// Phase 1 is most of the instructions of a naive loop (floor, compares, index
// math); vectorised it costs a few per sample. Corners off the map get the offset
// of a per-thread row of zeros, so phase 2 has no branch on the channels.
//
// Forward: out[n, q, m, :] = sum_{l, p} sum_k (attn * weight_k) * value[row_k, m, :].
//   Threads split the (n, q) pairs (consecutive queries are neighbouring pixels, so
//   a thread's gathers stay in a small window of the value map).
//
// Backward: per sample, one pass over the channels computes the four corner dot
//   products <grad_out, value_k> and scatters attn * weight_k * grad_out into
//   grad_value; bilinear_backward turns the dots into the location and attention
//   gradients. Threads own whole (n, m) heads (in contiguous blocks of heads):
//   grad_value[n, :, m, :] is written by exactly one thread, which walks its queries
//   in order, so there are no atomics, no private copies of grad_value, and every
//   element sums its terms in the same order for any thread count (bitwise
//   reproducible). Corners off the map scatter into a per-thread dummy row.
//
//   The per-sample pass is hand-written with AVX-512 intrinsics for float and bf16
//   values with D a multiple of 16 (sample_pass_simd<Avx512>), and with AVX2 + FMA for D a
//   multiple of 8 (sample_pass_simd<Avx2>: CPUs without AVX-512); the corners a few samples
//   ahead, and the next queries' inputs, are prefetched by hand (how far: MsdaCpuTuning,
//   set at run time, per machine); and with many queries
//   a thread visits them in strips of the map (visit_order) so its window stays small.
//   At E1 (800x1333, 22,223 queries, 8 heads of 32) that took the backward from about
//   100 to 31 ms on a 2-core Zen 5 VM.
//
// D is a template argument for the common head sizes so the channel loops have a
// constant trip count; other sizes take the runtime-D instantiation.
//
// The kernels themselves are in msda_cpu_isa.inc, compiled here once per instruction set
// (generic, AVX2 + FMA, AVX-512); each call runs the widest copy the CPU can (or the one
// MsdaCpuTuning::vector_pass names), so a portable build (DDETR_NATIVE_ARCH=OFF) is as
// fast as a -march=native one. This file holds what the copies share and the dispatch.
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ddetr/threads.h"
#include "ddetr/bilinear.h"
#include "ddetr/msda.h"

// Which copies are compiled. GCC on x86 compiles the AVX2 and AVX-512 copies for their
// instruction set whatever the build's flags (#pragma GCC target); other compilers get the
// copies the build's flags allow, as before.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define DDETR_MSDA_PER_ISA 1
#endif
#if defined(DDETR_MSDA_PER_ISA) || (defined(__AVX2__) && defined(__FMA__))
#define DDETR_MSDA_AVX2 1
#endif
#if defined(DDETR_MSDA_PER_ISA) || defined(__AVX512F__)
#define DDETR_MSDA_AVX512 1
#endif
#if defined(DDETR_MSDA_AVX2)
#include <immintrin.h>
#endif

namespace ddetr {
namespace {

// Below this many samples a call takes microseconds and waking a thread team costs
// more than it saves (and on a loaded machine a spinning OpenMP worker can hold the
// core the caller needs for a whole scheduler slice).
constexpr int64_t kSerialBelowSamples = 8192;

// Address arithmetic in bytes from one base, so a corner off the map can point at a
// row of zeros elsewhere in memory with the same add as a corner on the map.
template <class T> const T* at(const void* base, intptr_t offset) {
  return reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(base) + uintptr_t(offset));
}

// Level size and head offset of each (m, l, p) sample: constant over queries.
struct SampleTable {
  std::vector<int32_t> h, w;
  std::vector<intptr_t> head;  // bytes from value[n] to value[n, level_start_l, m, 0]
  intptr_t pixel_bytes;        // a pixel step: M * D elements
  explicit SampleTable(const MsdaShape& s, size_t elem_bytes) {
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t l = 0; l < s.L; ++l)
        for (int64_t p = 0; p < s.P; ++p) {
          h.push_back(int32_t(s.level_h[l]));
          w.push_back(int32_t(s.level_w[l]));
          head.push_back(intptr_t((s.level_start[l] * s.M + m) * s.D) * intptr_t(elem_bytes));
        }
    pixel_bytes = intptr_t(s.M * s.D) * intptr_t(elem_bytes);
  }
};

// Phase 1 output for up to M*L*P samples (structure of arrays for vector stores).
template <class A> struct Corners {
  std::vector<intptr_t> off[4];   // bytes from the base of value[n] (or to the zero row)
  std::vector<A> w[4];            // attn * bilinear weight
  // backward only:
  std::vector<intptr_t> goff[4];  // bytes from grad_value[n] (or to a dummy row)
  std::vector<A> raw[4];          // bilinear weight alone
  std::vector<A> dot;             // <grad_out, value corner>, 4 per sample (k fastest)
  std::vector<A> ly, lx;          // fractional parts
  std::vector<uint8_t> inside;    // the sample is on the map
  explicit Corners(int64_t n) : ly(n), lx(n), inside(n) {
    for (int k = 0; k < 4; ++k) {
      off[k].resize(n);
      w[k].resize(n);
      goff[k].resize(n);
      raw[k].resize(n);
    }
    dot.resize(4 * n);
  }
};

// ---- Prefetching. The gathers (and the backward's scatters) wander over a window of
// the map larger than L2, and the out-of-order window holds only a few samples' misses,
// so the corners a few samples on are prefetched by hand (more samples ahead in the
// forward, whose samples take fewer instructions; measured at E1). The backward also
// reads loc, attn and grad_out a block of heads at a time, with gaps between queries,
// which the hardware prefetcher follows late: the rows of the query a few on
// are prefetched too, and the rows it will write (grad_loc, grad_attn and, when asked
// for, the forward's output) are prefetched for writing: the backward's stores had
// waited on those lines (E1 backward 36-37 -> 32-33 ms on the Zen 5, one process, the
// two variants taking turns).
// The distances are run-time settings (MsdaCpuTuning): the best ones differ between
// CPUs (the defaults were measured at E1 on a Zen 5), and they never change a result.
// The settings are read once per call into a Knobs.
std::atomic<int> g_corners_ahead_forward{MsdaCpuTuning{}.corners_ahead_forward};
std::atomic<int> g_corners_ahead_backward{MsdaCpuTuning{}.corners_ahead_backward};
std::atomic<int> g_queries_ahead{MsdaCpuTuning{}.queries_ahead};
std::atomic<int> g_vector_pass{kPassAuto};

// Whether this CPU (and its OS, which must save the wider registers) runs a pass; the
// same feature lists as the #pragma GCC target lines below.
bool cpu_runs(int pass) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else  // no run-time check (or not x86: no such copies): the copies the build has
  const bool avx2 = true, avx512 = true;
#endif
  if (pass == kPassAvx512) return avx512;
  if (pass == kPassAvx2) return avx2;
  return pass == kPassGeneric;
}

// The pass kPassAuto runs: the widest this build has and this CPU runs.
int widest_pass() {
  static const int widest = [] {
#if defined(DDETR_MSDA_AVX512)
    if (cpu_runs(kPassAvx512)) return int(kPassAvx512);
#endif
#if defined(DDETR_MSDA_AVX2)
    if (cpu_runs(kPassAvx2)) return int(kPassAvx2);
#endif
    return int(kPassGeneric);
  }();
  return widest;
}

struct Knobs {
  int64_t corners_ahead_forward, corners_ahead, queries_ahead;
  int pass;
  Knobs()
      : corners_ahead_forward(g_corners_ahead_forward.load(std::memory_order_relaxed)),
        corners_ahead(g_corners_ahead_backward.load(std::memory_order_relaxed)),
        queries_ahead(g_queries_ahead.load(std::memory_order_relaxed)),
        pass(g_vector_pass.load(std::memory_order_relaxed)) {
    if (pass == kPassAuto) pass = widest_pass();
  }
};

#if defined(__GNUC__) || defined(__clang__)
#define DDETR_PREFETCH(p, write) __builtin_prefetch((p), (write))
#else
#define DDETR_PREFETCH(p, write) ((void)(p))
#endif

// kLines cache lines from p. Unrolled by recursion: GCC vectorises a loop of
// __builtin_prefetch calls and drops the prefetches.
template <int kLines, int kWrite> inline void prefetch_lines(const void* p) {
  if constexpr (kLines > 0) {
    DDETR_PREFETCH(p, kWrite);
    prefetch_lines<kLines - 1, kWrite>(static_cast<const char*>(p) + 64);
  }
}

// `bytes` from p, to read (kWrite 0) or to write (1).
template <int kWrite> inline void prefetch_bytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < bytes; b += 64) DDETR_PREFETCH(c + b, kWrite);
}

// The four corners of sample j of `c` (offsets from value_n), and with kGrad their
// gradient rows (offsets from grad_value_n), for writing. Head sizes known at compile
// time only.
template <class T, int DC, bool kGrad, class A>
void prefetch_corners(const T* value_n, const A* grad_value_n, const Corners<A>& c, int64_t j) {
  if constexpr (DC > 0) {
    constexpr int kValueLines = int((DC * sizeof(T) + 63) / 64);
    constexpr int kGradLines = int((DC * sizeof(A) + 63) / 64);
    for (int k = 0; k < 4; ++k) {
      prefetch_lines<kValueLines, 0>(at<T>(value_n, c.off[k][j]));
      if constexpr (kGrad) prefetch_lines<kGradLines, 1>(at<A>(grad_value_n, c.goff[k][j]));
    }
  }
}

// Where corners off the map read from (value) and scatter to (grad_value): byte
// offsets from the image's base, so on and off the map cost the same add.
struct OffMap {
  intptr_t zero = 0;         // from value[n] to a row of zeros
  intptr_t dummy[4] = {};    // from grad_value[n] to scratch rows (backward)
  intptr_t grad_scale = 1;   // sizeof(Acc<T>) / sizeof(T): value bytes -> grad bytes
};

template <class P> intptr_t byte_distance(const P* from, const void* to) {
  return intptr_t(reinterpret_cast<uintptr_t>(to) - reinterpret_cast<uintptr_t>(from));
}

// Per-thread buffers of the backward.
template <class T> struct BackwardScratch {
  std::vector<T> zero_row;    // read for corners off the map
  std::vector<Acc<T>> dummy;  // 4 rows, written for corners off the map
  std::vector<Acc<T>> g;      // grad_out row in the accumulation type (generic pass)
  std::vector<Acc<T>> fwd;    // the forward's output row (when asked for)
  Corners<Acc<T>> corners;
  BackwardScratch(int64_t D, int64_t samples)
      : zero_row(D, from_acc<T>(Acc<T>(0))), dummy(4 * D), g(D), fwd(D), corners(samples) {}
};

// Work items of the backward: image n with heads [m0, m1). Heads are split into as
// few contiguous blocks as give every thread an item, so the corner setup of a
// query runs over a block's (m1 - m0) * L * P samples at once.
// `size` heads per block and `per_image` blocks, every block non-empty: with 8 heads and
// 6 wanted blocks the size is 2, so there are 4 blocks, not 6 (blocks starting past M
// would give m1 - m0 < 0).
struct HeadBlocks {
  int64_t per_image, size;
  HeadBlocks(const MsdaShape& s, int threads) {
    const int64_t want = (threads + s.N - 1) / s.N;
    const int64_t blocks = want < s.M ? (want > 0 ? want : 1) : s.M;
    size = (s.M + blocks - 1) / blocks;
    per_image = (s.M + size - 1) / size;
  }
};

// The order in which a thread visits the queries of image n in the backward. A
// thread's scatters and gathers hit the map around each query's sampling points; in
// the given order (for the encoder, raster order over each level's pixels) that window
// spans whole rows of the finest level, megabytes for a block of heads, which L2 does not
// hold. So the queries are visited in vertical strips of the largest level, kStripPixels
// wide, rows top to bottom within a strip, by where their first sample lies (a counting
// sort on that key). Empty when the call is too small to gain, or the grid would have
// many more cells than there are queries. Every thread uses the same order whatever the
// thread count, so the backward stays bitwise reproducible. Measured at E1: about 8%
// faster (strips of 8 and 32 pixels gained less). The forward keeps the given order,
// which measured faster there: it reads loc and attn query after query, and no window of
// scatters is at stake.
constexpr int64_t kStripPixels = 16;
constexpr int64_t kReorderMinQueries = 1024;

template <class A>
std::vector<int64_t> visit_order(const MsdaShape& s, const A* loc, int64_t n) {
  int64_t big = 0;
  for (int64_t l = 1; l < s.L; ++l)
    if (s.level_h[l] * s.level_w[l] > s.level_h[big] * s.level_w[big]) big = l;
  const int64_t H = s.level_h[big], W = s.level_w[big];
  const int64_t strips = (W + kStripPixels - 1) / kStripPixels;
  const int64_t keys = strips * H;
  // (no points: loc is empty, and there is nothing to order by)
  if (s.P == 0 || s.Lq < kReorderMinQueries || keys > 4 * s.Lq) return {};
  std::vector<int64_t> order(s.Lq), key(s.Lq), count(keys + 1, 0);
  const int64_t stride = s.M * s.L * s.P * 2;  // between queries' first samples
  for (int64_t q = 0; q < s.Lq; ++q) {
    const A* xy = loc + (n * s.Lq + q) * stride + 2 * big * s.P;  // (n, q, 0, big, 0)
    // off-map and non-finite locations clamp to the map's edge (any key is correct)
    const A fx = xy[0] * A(W), fy = xy[1] * A(H);
    const int64_t x = fx > A(0) ? (fx < A(W) ? int64_t(fx) : W - 1) : 0;
    const int64_t y = fy > A(0) ? (fy < A(H) ? int64_t(fy) : H - 1) : 0;
    key[q] = x / kStripPixels * H + y;
    ++count[key[q] + 1];
  }
  for (int64_t k = 0; k < keys; ++k) count[k + 1] += count[k];
  for (int64_t q = 0; q < s.Lq; ++q) order[count[key[q]]++] = q;
  return order;
}

// Calls fn.template operator()<DC>() with DC = D for the head sizes worth a
// dedicated instantiation, 0 (runtime D) otherwise.
template <class Fn> void with_head_size(int64_t D, Fn&& fn) {
  switch (D) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// ---- The per-instruction-set copies of the kernels (msda_cpu_isa.inc).
namespace msda_generic {
#define DDETR_MSDA_LEVEL 1
#include "msda_cpu_isa.inc"
#undef DDETR_MSDA_LEVEL
}  // namespace msda_generic

#if defined(DDETR_MSDA_AVX2)
#if defined(DDETR_MSDA_PER_ISA)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace msda_avx2 {
#define DDETR_MSDA_LEVEL 2
#include "msda_cpu_isa.inc"
#undef DDETR_MSDA_LEVEL
}  // namespace msda_avx2
#if defined(DDETR_MSDA_PER_ISA)
#pragma GCC pop_options
#endif
#endif

#if defined(DDETR_MSDA_AVX512)
#if defined(DDETR_MSDA_PER_ISA)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
namespace msda_avx512 {
#define DDETR_MSDA_LEVEL 3
#include "msda_cpu_isa.inc"
#undef DDETR_MSDA_LEVEL
}  // namespace msda_avx512
#if defined(DDETR_MSDA_PER_ISA)
#pragma GCC pop_options
#endif
#endif

}  // namespace

MsdaCpuTuning msda_cpu_tuning() {
  MsdaCpuTuning t;
  t.corners_ahead_forward = g_corners_ahead_forward.load();
  t.corners_ahead_backward = g_corners_ahead_backward.load();
  t.queries_ahead = g_queries_ahead.load();
  t.vector_pass = g_vector_pass.load();
  return t;
}

int msda_cpu_widest_pass() { return widest_pass(); }

bool msda_cpu_per_isa() {
#if defined(DDETR_MSDA_PER_ISA)
  return true;
#else
  return false;
#endif
}

void set_msda_cpu_tuning(const MsdaCpuTuning& t) {
  const std::pair<const char*, int> distances[] = {
      {"corners_ahead_forward", t.corners_ahead_forward},
      {"corners_ahead_backward", t.corners_ahead_backward},
      {"queries_ahead", t.queries_ahead}};
  for (const auto& [name, v] : distances)
    if (v < 0 || v > 256)
      throw std::invalid_argument(std::string(name) + ": expected 0..256, got " +
                                  std::to_string(v));
  const int pass = t.vector_pass;
  const bool known = pass == kPassAuto || pass == kPassGeneric || pass == kPassAvx2 ||
                     pass == kPassAvx512;
  // every pass up to the widest one is compiled and runs here
  if (!known || (pass != kPassAuto && pass > widest_pass()))
    throw std::invalid_argument("vector_pass: " + std::to_string(pass) +
                                " is not a pass this build runs on this CPU (widest: " +
                                std::to_string(widest_pass()) + ")");
  g_corners_ahead_forward = t.corners_ahead_forward;
  g_corners_ahead_backward = t.corners_ahead_backward;
  g_queries_ahead = t.queries_ahead;
  g_vector_pass = pass;
}

template <class T>
void msda_forward_cpu(const MsdaShape& s, const T* value, const Acc<T>* loc,
                      const Acc<T>* attn, T* out, int num_threads) {
  validate(s);
  if (s.N * s.Lq * s.M * s.D == 0) return;
  const int threads =
      resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P, kSerialBelowSamples);
  const Knobs k;
  switch (k.pass) {
#if defined(DDETR_MSDA_AVX512)
    case kPassAvx512: return msda_avx512::run_forward(s, value, loc, attn, out, threads, k);
#endif
#if defined(DDETR_MSDA_AVX2)
    case kPassAvx2: return msda_avx2::run_forward(s, value, loc, attn, out, threads, k);
#endif
    default: return msda_generic::run_forward(s, value, loc, attn, out, threads, k);
  }
}

template <class T>
void msda_backward_cpu(const MsdaShape& s, const T* value, const Acc<T>* loc,
                       const Acc<T>* attn, const T* grad_out, Acc<T>* grad_value,
                       Acc<T>* grad_loc, Acc<T>* grad_attn, int num_threads, T* out) {
  validate(s);
  if (s.N * s.Lq * s.M == 0) return;
  const int threads =
      resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P, kSerialBelowSamples);
  const Knobs k;
  switch (k.pass) {
#if defined(DDETR_MSDA_AVX512)
    case kPassAvx512:
      return msda_avx512::run_backward(s, value, loc, attn, grad_out, grad_value, grad_loc,
                                       grad_attn, threads, out, k);
#endif
#if defined(DDETR_MSDA_AVX2)
    case kPassAvx2:
      return msda_avx2::run_backward(s, value, loc, attn, grad_out, grad_value, grad_loc,
                                     grad_attn, threads, out, k);
#endif
    default:
      return msda_generic::run_backward(s, value, loc, attn, grad_out, grad_value, grad_loc,
                                        grad_attn, threads, out, k);
  }
}

#define DDETR_INSTANTIATE(T)                                                             \
  template void msda_forward_cpu<T>(const MsdaShape&, const T*, const Acc<T>*,           \
                                    const Acc<T>*, T*, int);                              \
  template void msda_backward_cpu<T>(const MsdaShape&, const T*, const Acc<T>*,          \
                                     const Acc<T>*, const T*, Acc<T>*, Acc<T>*, Acc<T>*, \
                                     int, T*);
DDETR_INSTANTIATE(float)
DDETR_INSTANTIATE(double)
DDETR_INSTANTIATE(bf16)
#undef DDETR_INSTANTIATE

}  // namespace ddetr
