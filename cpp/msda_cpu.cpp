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

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define DDETR_MSDA_AVX2 1  // (every AVX-512 CPU has AVX2 and FMA)
#endif
#if defined(__AVX512F__)
#define DDETR_MSDA_AVX512 1
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
// are prefetched too.
// The distances are run-time settings (MsdaCpuTuning): the best ones differ between
// CPUs (the defaults were measured at E1 on a Zen 5), and they never change a result.
// The settings are read once per call into a Knobs.
std::atomic<int> g_corners_ahead_forward{MsdaCpuTuning{}.corners_ahead_forward};
std::atomic<int> g_corners_ahead_backward{MsdaCpuTuning{}.corners_ahead_backward};
std::atomic<int> g_queries_ahead{MsdaCpuTuning{}.queries_ahead};
std::atomic<int> g_vector_pass{kPassAuto};

constexpr int kWidestPass =
#if defined(DDETR_MSDA_AVX512)
    kPassAvx512;
#elif defined(DDETR_MSDA_AVX2)
    kPassAvx2;
#else
    kPassGeneric;
#endif

struct Knobs {
  int64_t corners_ahead_forward, corners_ahead, queries_ahead;
  int pass;
  Knobs()
      : corners_ahead_forward(g_corners_ahead_forward.load(std::memory_order_relaxed)),
        corners_ahead(g_corners_ahead_backward.load(std::memory_order_relaxed)),
        queries_ahead(g_queries_ahead.load(std::memory_order_relaxed)),
        pass(g_vector_pass.load(std::memory_order_relaxed)) {
    if (pass == kPassAuto) pass = kWidestPass;
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

inline void prefetch_bytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < bytes; b += 64) DDETR_PREFETCH(c + b, 0);
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

// Samples [first, first + count) of the table for one query: loc / attn point at
// the first of them. kGrad also fills what the backward needs.
template <bool kGrad, class A>
void setup_corners(const SampleTable& t, int64_t first, int64_t count, const A* loc,
                   const A* attn, const OffMap& om, Corners<A>& c) {
  // Raw pointers: the vectoriser does not see through std::vector inside the loop.
  const int32_t *h = t.h.data() + first, *w = t.w.data() + first;
  const intptr_t* head = t.head.data() + first;
  const intptr_t pixel_bytes = t.pixel_bytes;
  intptr_t *off0 = c.off[0].data(), *off1 = c.off[1].data(), *off2 = c.off[2].data(),
           *off3 = c.off[3].data();
  intptr_t *goff0 = c.goff[0].data(), *goff1 = c.goff[1].data(), *goff2 = c.goff[2].data(),
           *goff3 = c.goff[3].data();
  A *w0 = c.w[0].data(), *w1 = c.w[1].data(), *w2 = c.w[2].data(), *w3 = c.w[3].data();
  A *r0 = c.raw[0].data(), *r1 = c.raw[1].data(), *r2 = c.raw[2].data(), *r3 = c.raw[3].data();
  A *ly = c.ly.data(), *lx = c.lx.data();
  uint8_t* inside = c.inside.data();
  const intptr_t zero = om.zero, scale = om.grad_scale;
  const intptr_t dummy0 = om.dummy[0], dummy1 = om.dummy[1], dummy2 = om.dummy[2],
                 dummy3 = om.dummy[3];
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    Bilinear<A> b;
    const bool on_map = bilinear_setup(loc[2 * j], loc[2 * j + 1], h[j], w[j], b);
    const A a = attn[j];
    const intptr_t at0 = head[j] + intptr_t(b.pixel[0]) * pixel_bytes;
    const intptr_t at1 = head[j] + intptr_t(b.pixel[1]) * pixel_bytes;
    const intptr_t at2 = head[j] + intptr_t(b.pixel[2]) * pixel_bytes;
    const intptr_t at3 = head[j] + intptr_t(b.pixel[3]) * pixel_bytes;
    off0[j] = b.pixel[0] >= 0 ? at0 : zero;
    off1[j] = b.pixel[1] >= 0 ? at1 : zero;
    off2[j] = b.pixel[2] >= 0 ? at2 : zero;
    off3[j] = b.pixel[3] >= 0 ? at3 : zero;
    w0[j] = fold_weight(a, b.weight[0]);
    w1[j] = fold_weight(a, b.weight[1]);
    w2[j] = fold_weight(a, b.weight[2]);
    w3[j] = fold_weight(a, b.weight[3]);
    if constexpr (kGrad) {
      goff0[j] = b.pixel[0] >= 0 ? at0 * scale : dummy0;
      goff1[j] = b.pixel[1] >= 0 ? at1 * scale : dummy1;
      goff2[j] = b.pixel[2] >= 0 ? at2 * scale : dummy2;
      goff3[j] = b.pixel[3] >= 0 ? at3 * scale : dummy3;
      r0[j] = b.weight[0];
      r1[j] = b.weight[1];
      r2[j] = b.weight[2];
      r3[j] = b.weight[3];
    }
    if constexpr (kGrad) {
      inside[j] = on_map;
      ly[j] = b.ly;
      lx[j] = b.lx;
    }
  }
}


// Phase 2 of the backward for the samples [first, first + count) of one (n, q, m):
// per sample, the four dots <g, value_k> into c.dot and the scatter
// grad_value_k += w_k * g; with kOut, also fwd = sum of w_k * value_k (the forward's
// output row). go is the D-channel row of grad_out, g a scratch row for it in the
// accumulation type, fwd D floats (or doubles).
template <class T, int DC, bool kOut>
void sample_pass_generic(int64_t D, const T* value_n, Acc<T>* grad_value_n, Corners<Acc<T>>& c,
                         int64_t first, int64_t count, int64_t set_up, int64_t ahead,
                         const T* go, Acc<T>* g, Acc<T>* fwd) {
  using A = Acc<T>;
  if constexpr (DC) D = DC;
  for (int64_t ch = 0; ch < D; ++ch) g[ch] = to_acc(go[ch]);
  if constexpr (kOut)
    for (int64_t ch = 0; ch < D; ++ch) fwd[ch] = A(0);
  for (int64_t j = first; j < first + count; ++j) {
    if (ahead > 0 && j + ahead < set_up)
      prefetch_corners<T, DC, true>(value_n, grad_value_n, c, j + ahead);
    const T *v0 = at<T>(value_n, c.off[0][j]), *v1 = at<T>(value_n, c.off[1][j]);
    const T *v2 = at<T>(value_n, c.off[2][j]), *v3 = at<T>(value_n, c.off[3][j]);
    A* gv0 = const_cast<A*>(at<A>(grad_value_n, c.goff[0][j]));
    A* gv1 = const_cast<A*>(at<A>(grad_value_n, c.goff[1][j]));
    A* gv2 = const_cast<A*>(at<A>(grad_value_n, c.goff[2][j]));
    A* gv3 = const_cast<A*>(at<A>(grad_value_n, c.goff[3][j]));
    const A w0 = c.w[0][j], w1 = c.w[1][j], w2 = c.w[2][j], w3 = c.w[3][j];
    A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t ch = 0; ch < D; ++ch) {
      const A gc = g[ch];
      const A x0 = to_acc(v0[ch]), x1 = to_acc(v1[ch]), x2 = to_acc(v2[ch]), x3 = to_acc(v3[ch]);
      d0 += gc * x0;
      d1 += gc * x1;
      d2 += gc * x2;
      d3 += gc * x3;
      gv0[ch] += w0 * gc;
      gv1[ch] += w1 * gc;
      gv2[ch] += w2 * gc;
      gv3[ch] += w3 * gc;
      if constexpr (kOut) fwd[ch] += w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3;
    }
    A* dot = c.dot.data() + 4 * j;
    dot[0] = d0;
    dot[1] = d1;
    dot[2] = d2;
    dot[3] = d3;
  }
}

// The same pass with vector intrinsics, for float or bf16 values and D a multiple of the
// vector width: g, the output accumulators and the four dot products stay in registers,
// and the dots of a sample end in one 4-way horizontal sum (sum4) instead of four lane
// reductions. Written by hand because GCC spilled the dot vectors to the stack and summed
// their lanes in scalar loops, most of the instructions of the generic loop (which also
// prefetches less well). One template over the ISA (Isa: the vector type and the
// handful of operations it needs): Avx512 (16 lanes, head sizes 16, 32, 64) and Avx2
// (AVX2 + FMA, 8 lanes, also 8: CPUs without AVX-512, e.g. AMD Zen 2/3).
#ifdef DDETR_MSDA_AVX2
struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kCornerSets = 1;
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16* p) {  // bf16 -> float: the bits move to the upper half
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // (sum of a's lanes, of b's, of c's, of d's)
  static __m128 sum4(V a, V b, V c, V d) {
    // per 128-bit half: (a01, a23, b01, b23), then (a0123, b0123, c0123, d0123)
    const V abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  }
};
#endif

#ifdef DDETR_MSDA_AVX512
struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kCornerSets = 4;  // (AVX2 keeps one: 16 ymm registers)
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) {  // bf16 -> float: the bits move to the upper half
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static __m128 sum4(V a, V b, V c, V d) {
    // per 128-bit block: ab = (a0+a2, b0+b2, a1+a3, b1+b3), cd likewise
    const V ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const V cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // per block: (a, b, c, d) partial sums; then the four blocks added together
    const V abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), upper);
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  }
};
#endif

#ifdef DDETR_MSDA_AVX2
// Chunk i of a sample row summed in Isa::kCornerSets running sums (corner k of every
// sample goes into sum k % kCornerSets: shorter chains of dependent FMAs), added at the
// end as ((s0 + s1) + (s2 + s3)). The forward and the backward's forward row both sum
// this way, so they agree bit for bit.
// (sums: S rows of `chunks` vectors)
template <class Isa, int S>
typename Isa::V corner_sum(const typename Isa::V* sums, int chunks, int i) {
  static_assert(S == 1 || S == 4, "corner_sum adds 1 or 4 running sums");
  if constexpr (S == 4)
    return Isa::add(Isa::add(sums[i], sums[chunks + i]),
                    Isa::add(sums[2 * chunks + i], sums[3 * chunks + i]));
  else
    return sums[i];
}

template <class Isa, class T, int DC, bool kOut>
void sample_pass_simd(const T* value_n, float* grad_value_n, Corners<float>& c, int64_t first,
                      int64_t count, int64_t set_up, int64_t ahead, const T* go, float* fwd) {
  using V = typename Isa::V;
  constexpr int kW = Isa::kLanes, kChunks = DC / kW, kSets = Isa::kCornerSets;
  V gr[kChunks], acc[kSets][kChunks];
  for (int i = 0; i < kChunks; ++i) {
    gr[i] = Isa::load(go + kW * i);
    for (int s = 0; s < kSets; ++s) acc[s][i] = Isa::zero();
  }
  for (int64_t j = first; j < first + count; ++j) {
    if (ahead > 0 && j + ahead < set_up)
      prefetch_corners<T, DC, true>(value_n, grad_value_n, c, j + ahead);
    const T* v[4];
    float* gv[4];
    V w[4], p[4];
    for (int k = 0; k < 4; ++k) {
      v[k] = at<T>(value_n, c.off[k][j]);
      gv[k] = const_cast<float*>(at<float>(grad_value_n, c.goff[k][j]));
      w[k] = Isa::set1(c.w[k][j]);
      p[k] = Isa::zero();
    }
    for (int i = 0; i < kChunks; ++i)
      for (int k = 0; k < 4; ++k) {
        const V x = Isa::load(v[k] + kW * i);
        p[k] = Isa::fmadd(gr[i], x, p[k]);
        if constexpr (kOut) acc[k % kSets][i] = Isa::fmadd(w[k], x, acc[k % kSets][i]);
        float* dst = gv[k] + kW * i;
        Isa::store(dst, Isa::fmadd(w[k], gr[i], Isa::load(dst)));
      }
    _mm_storeu_ps(c.dot.data() + 4 * j, Isa::sum4(p[0], p[1], p[2], p[3]));
  }
  if constexpr (kOut)
    for (int i = 0; i < kChunks; ++i)
      Isa::store(fwd + kW * i, corner_sum<Isa, kSets>(&acc[0][0], kChunks, i));
}
#endif

// set_up: how many entries of `c` hold this query's corners (for the prefetch); `pass`
// a resolved MsdaPass this build has (set_msda_cpu_tuning checks).
template <class T, int DC, bool kOut>
void sample_pass(int64_t D, const T* value_n, Acc<T>* grad_value_n, Corners<Acc<T>>& c,
                 int64_t first, int64_t count, int64_t set_up, const Knobs& k, const T* go,
                 Acc<T>* g, Acc<T>* fwd) {
  [[maybe_unused]] constexpr bool kSimd = !std::is_same_v<T, double> && DC > 0;
#ifdef DDETR_MSDA_AVX512
  if constexpr (kSimd && DC % 16 == 0)
    if (k.pass == kPassAvx512) {
      sample_pass_simd<Avx512, T, DC, kOut>(value_n, grad_value_n, c, first, count, set_up,
                                            k.corners_ahead, go, fwd);
      return;
    }
#endif
#ifdef DDETR_MSDA_AVX2
  if constexpr (kSimd && DC % 8 == 0)
    if (k.pass == kPassAvx2 || k.pass == kPassAvx512) {  // (AVX-512 with D = 8: 8 lanes)
      sample_pass_simd<Avx2, T, DC, kOut>(value_n, grad_value_n, c, first, count, set_up,
                                          k.corners_ahead, go, fwd);
      return;
    }
#endif
  sample_pass_generic<T, DC, kOut>(D, value_n, grad_value_n, c, first, count, set_up,
                                   k.corners_ahead, go, g, fwd);
}

// The forward's output row of one (n, q, m) from its samples [first, first + count) of
// `c` (set_up: how many entries `c` holds, for the prefetch): the vector pass keeps the
// row in registers and adds the corners with FMAs into corner_sum's running sums (on
// AVX-512 one per corner: a chain of 4 dependent FMAs per sample became one, 10-16%
// faster at E1 in an interleaved A/B on the Zen 5), as the backward's vector pass
// computes the same row (so the two agree bit for bit); the generic loop sums each
// sample's four products first. acc: a D-float scratch row.
template <class T, int DC>
void forward_head(int64_t D, const T* value_n, const Corners<Acc<T>>& c, int64_t first,
                  int64_t count, int64_t set_up, const Knobs& k, Acc<T>* acc, T* out) {
  using A = Acc<T>;
  const int64_t ahead = k.corners_ahead_forward;
#ifdef DDETR_MSDA_AVX2
  if constexpr (!std::is_same_v<T, double> && DC > 0 && DC % 8 == 0)
    if (k.pass != kPassGeneric) {
      const auto run = [&](auto isa) {
        using Isa = decltype(isa);
        using V = typename Isa::V;
        constexpr int kW = Isa::kLanes, kChunks = DC / kW, kSets = Isa::kCornerSets;
        V sum[kSets][kChunks];
        for (int s = 0; s < kSets; ++s)
          for (int i = 0; i < kChunks; ++i) sum[s][i] = Isa::zero();
        for (int64_t j = first; j < first + count; ++j) {
          if (ahead > 0 && j + ahead < set_up)
            prefetch_corners<T, DC, false>(value_n, static_cast<A*>(nullptr), c, j + ahead);
          for (int kk = 0; kk < 4; ++kk) {
            const T* v = at<T>(value_n, c.off[kk][j]);
            const V w = Isa::set1(c.w[kk][j]);
            V* into = sum[kk % kSets];
            for (int i = 0; i < kChunks; ++i)
              into[i] = Isa::fmadd(w, Isa::load(v + kW * i), into[i]);
          }
        }
        for (int i = 0; i < kChunks; ++i)
          Isa::store(acc + kW * i, corner_sum<Isa, kSets>(&sum[0][0], kChunks, i));
      };
#ifdef DDETR_MSDA_AVX512
      if (k.pass == kPassAvx512 && DC % 16 == 0)
        run(Avx512{});
      else
#endif
        run(Avx2{});
      for (int64_t ch = 0; ch < DC; ++ch) out[ch] = from_acc<T>(acc[ch]);
      return;
    }
#endif
  for (int64_t ch = 0; ch < D; ++ch) acc[ch] = A(0);
  for (int64_t j = first; j < first + count; ++j) {
    if (ahead > 0 && j + ahead < set_up)
      prefetch_corners<T, DC, false>(value_n, static_cast<A*>(nullptr), c, j + ahead);
    const T* v0 = at<T>(value_n, c.off[0][j]);
    const T* v1 = at<T>(value_n, c.off[1][j]);
    const T* v2 = at<T>(value_n, c.off[2][j]);
    const T* v3 = at<T>(value_n, c.off[3][j]);
    const A w0 = c.w[0][j], w1 = c.w[1][j], w2 = c.w[2][j], w3 = c.w[3][j];
#pragma omp simd
    for (int64_t ch = 0; ch < D; ++ch)
      acc[ch] += w0 * to_acc(v0[ch]) + w1 * to_acc(v1[ch]) + w2 * to_acc(v2[ch]) +
                 w3 * to_acc(v3[ch]);
  }
  for (int64_t ch = 0; ch < D; ++ch) out[ch] = from_acc<T>(acc[ch]);
}

template <class T, int DC>
void forward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn, T* out,
             int threads) {
  using A = Acc<T>;
  const int64_t D = DC ? DC : s.D;
  const int64_t lp = s.L * s.P, samples = s.M * lp;  // per (n, q, m) and per (n, q)
  const int64_t pairs = s.N * s.Lq;
  const SampleTable table(s, sizeof(T));
  const Knobs k;
#pragma omp parallel num_threads(threads)
  {
    std::vector<A> acc(D);
    std::vector<T> zero_row(D, from_acc<T>(A(0)));
    Corners<A> c(samples);
#pragma omp for DDETR_SHARE_ROWS
    for (int64_t nq = 0; nq < pairs; ++nq) {
      const T* value_n = value + (nq / s.Lq) * s.S * s.M * s.D;
      OffMap om;
      om.zero = byte_distance(value_n, zero_row.data());
      setup_corners<false>(table, 0, samples, loc + 2 * nq * samples, attn + nq * samples, om,
                           c);
      for (int64_t m = 0; m < s.M; ++m)
        forward_head<T, DC>(D, value_n, c, m * lp, lp, samples, k, acc.data(),
                            out + (nq * s.M + m) * D);
    }
  }
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

// The L*P samples of one (n, q, m), whose corners start at entry `first` of `c`:
// first the dots and the scatter, sample by sample over the channels (and, when `out`
// is not null, the forward's output row from the same corners); then, in one
// vectorised pass over the samples, their location and attention gradients.
// go/attn/grad_loc/grad_attn point at this (n, q, m)'s row or first sample.
template <class T, int DC, bool kOut>
void backward_head(const MsdaShape& s, const SampleTable& t, int64_t table_first,
                   const T* value_n, Acc<T>* grad_value_n, BackwardScratch<T>& buf,
                   int64_t first, int64_t set_up, const Knobs& k, const T* go, const Acc<T>* attn,
                   Acc<T>* grad_loc, Acc<T>* grad_attn, T* out) {
  using A = Acc<T>;
  const int64_t D = DC ? DC : s.D;
  const int64_t lp = s.L * s.P;
  Corners<A>& c = buf.corners;
  // (a fixed-size local for the common head sizes, which the compiler keeps in registers
  // across the samples; the scratch row for other sizes)
  A fwd_local[DC ? DC : 1];
  A* fwd = DC ? fwd_local : buf.fwd.data();
  sample_pass<T, DC, kOut>(D, value_n, grad_value_n, c, first, lp, set_up, k, go,
                           buf.g.data(), fwd);
  if constexpr (kOut)
    for (int64_t ch = 0; ch < D; ++ch) out[ch] = from_acc<T>(fwd[ch]);
  const int32_t *h = t.h.data() + table_first, *w = t.w.data() + table_first;
  const uint8_t* inside = c.inside.data() + first;
  const A *ly = c.ly.data() + first, *lx = c.lx.data() + first;
  const A *r0 = c.raw[0].data() + first, *r1 = c.raw[1].data() + first;
  const A *r2 = c.raw[2].data() + first, *r3 = c.raw[3].data() + first;
  const A* e = c.dot.data() + 4 * first;
#pragma omp simd
  for (int64_t i = 0; i < lp; ++i) {
    Bilinear<A> b;
    b.weight[0] = r0[i];
    b.weight[1] = r1[i];
    b.weight[2] = r2[i];
    b.weight[3] = r3[i];
    b.ly = ly[i];
    b.lx = lx[i];
    const A dot[4] = {e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3]};
    const SampleGrad<A> sg = bilinear_backward(b, dot, attn[i], h[i], w[i]);
    // explicit zeros off the map: a non-finite attn must not turn them into NaN
    grad_attn[i] = inside[i] ? sg.attn : A(0);
    grad_loc[2 * i] = inside[i] ? sg.x : A(0);
    grad_loc[2 * i + 1] = inside[i] ? sg.y : A(0);
  }
}

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
// many more cells than there are queries. Every thread uses the same order whatever the thread count, so
// the backward stays bitwise reproducible. Measured at E1: about 8% faster (strips of 8
// and 32 pixels gained less). The forward keeps the given order, which measured faster
// there: it reads loc and attn query after query, and no window of scatters is at stake.
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

template <class T, int DC, bool kOut>
void backward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn,
              const T* grad_out, Acc<T>* grad_value, Acc<T>* grad_loc, Acc<T>* grad_attn,
              int threads, T* out) {
  using A = Acc<T>;
  const int64_t lp = s.L * s.P;
  const HeadBlocks blocks(s, threads);
  const SampleTable table(s, sizeof(T));
  const Knobs k;
  std::vector<std::vector<int64_t>> orders;  // per image; empty: the given order
  for (int64_t n = 0; n < s.N; ++n) orders.push_back(visit_order(s, loc, n));
#pragma omp parallel num_threads(threads)
  {
    BackwardScratch<T> buf(s.D, blocks.size * lp);
    // Whole heads per thread: see the file comment for why this is race-free.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < s.N * blocks.per_image; ++item) {
      const int64_t n = item / blocks.per_image;
      const int64_t m0 = (item % blocks.per_image) * blocks.size;
      const int64_t m1 = m0 + blocks.size < s.M ? m0 + blocks.size : s.M;
      const T* value_n = value + n * s.S * s.M * s.D;
      A* grad_value_n = grad_value + n * s.S * s.M * s.D;
      OffMap om;
      om.zero = byte_distance(value_n, buf.zero_row.data());
      for (int k = 0; k < 4; ++k)
        om.dummy[k] = byte_distance(grad_value_n, buf.dummy.data() + k * s.D);
      om.grad_scale = intptr_t(sizeof(A) / sizeof(T));
      const std::vector<int64_t>& order = orders[n];
      const auto query = [&](int64_t i) { return order.empty() ? i : order[i]; };
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t q = query(i);
        const int64_t first = ((n * s.Lq + q) * s.M + m0) * lp;  // sample (n, q, m0, 0, 0)
        if (k.queries_ahead > 0 && i + k.queries_ahead < s.Lq) {
          const int64_t head = (n * s.Lq + query(i + k.queries_ahead)) * s.M + m0;  // (n, q', m0)
          prefetch_bytes(loc + 2 * head * lp, (m1 - m0) * lp * 2 * sizeof(A));
          prefetch_bytes(attn + head * lp, (m1 - m0) * lp * sizeof(A));
          prefetch_bytes(grad_out + head * s.D, (m1 - m0) * s.D * sizeof(T));
        }
        setup_corners<true>(table, m0 * lp, (m1 - m0) * lp, loc + 2 * first, attn + first, om,
                            buf.corners);
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t nqm = (n * s.Lq + q) * s.M + m;
          backward_head<T, DC, kOut>(s, table, m * lp, value_n, grad_value_n, buf,
                                     (m - m0) * lp, (m1 - m0) * lp, k, grad_out + nqm * s.D,
                                     attn + nqm * lp, grad_loc + 2 * nqm * lp,
                                     grad_attn + nqm * lp, kOut ? out + nqm * s.D : nullptr);
        }
      }
    }
  }
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

}  // namespace

MsdaCpuTuning msda_cpu_tuning() {
  MsdaCpuTuning t;
  t.corners_ahead_forward = g_corners_ahead_forward.load();
  t.corners_ahead_backward = g_corners_ahead_backward.load();
  t.queries_ahead = g_queries_ahead.load();
  t.vector_pass = g_vector_pass.load();
  return t;
}

int msda_cpu_widest_pass() { return kWidestPass; }

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
  // every pass up to the widest one exists in this build
  if (!known || (pass != kPassAuto && pass > kWidestPass))
    throw std::invalid_argument("vector_pass: " + std::to_string(pass) +
                                " is not a pass this build has (widest: " +
                                std::to_string(kWidestPass) + ")");
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
  with_head_size(s.D, [&](auto dc) {
    const int threads = resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P,
                                        kSerialBelowSamples);
    forward<T, decltype(dc)::value>(s, value, loc, attn, out, threads);
  });
}

template <class T>
void msda_backward_cpu(const MsdaShape& s, const T* value, const Acc<T>* loc,
                       const Acc<T>* attn, const T* grad_out, Acc<T>* grad_value,
                       Acc<T>* grad_loc, Acc<T>* grad_attn, int num_threads, T* out) {
  validate(s);
  if (s.N * s.Lq * s.M == 0) return;
  with_head_size(s.D, [&](auto dc) {
    const int threads = resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P,
                                        kSerialBelowSamples);
    if (out)
      backward<T, decltype(dc)::value, true>(s, value, loc, attn, grad_out, grad_value,
                                             grad_loc, grad_attn, threads, out);
    else
      backward<T, decltype(dc)::value, false>(s, value, loc, attn, grad_out, grad_value,
                                              grad_loc, grad_attn, threads, nullptr);
  });
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
