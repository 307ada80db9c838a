// int8 GEMM on the CPU (ddetr::gemm_int8, see ddetr/gemm_int8.h for the formula).
//
// Three kernels over one driver. Each keeps an MR x NR tile of int32 sums in registers
// over all of K, reading one A panel (MR rows, quantised and packed by the thread that
// owns them) and one W panel (NR columns, packed once):
//
// * avx2 (MR 6, NR 16). No instruction multiplies int8 by int8 into int32 exactly on
//   AVX2: VPMADDUBSW (u8 x s8) adds two products into a saturating int16. So both sides
//   are widened to int16 and VPMADDWD multiplies 16 int16 pairs, adding each two
//   neighbouring products into an int32 lane (|a w| <= 2^14, two of them fit; exact).
//   W panel: per pair of k, 16 words (w[n, k], w[n, k + 1]) as int16 (64 bytes, two
//   ymm); A panel: MR rows of int16, so word p of row r is the pair (a[m, 2p],
//   a[m, 2p + 1]), broadcast to a ymm. Per pair: 2 loads of W, 6 broadcasts, 12
//   VPMADDWD + 12 VPADDD into 12 accumulators (15 of the 16 ymm registers in use).
// * avx512_vnni (MR 8, NR 32). VPDPBUSD adds four u8 x s8 products into an int32 lane
//   without saturation, but takes one side unsigned. A is signed, so it goes in as
//   a + 128 (0..255) and the extra 128 sum_k w[n, k] is taken off by starting each
//   column's sum at comp[n] = -128 sum_k w[n, k], stored at the head of its W panel.
//   W panel: 32 comp words, then per quad of k 32 words of (w[n, 4q] .. w[n, 4q + 3]);
//   A panel: MR rows of a + 128 as bytes, word q of a row (a quad) broadcast to a zmm.
// * scalar: the avx512_vnni layout and arithmetic in plain C++ (the portable fallback,
//   and, on machines without VNNI, the check of that layout).
// * amx (MR 32, NR 32): AMX TDPBSSD multiplies signed int8 by signed int8 into int32, 64
//   products a row per instruction, so no offset: A panel rows are the signed bytes,
//   padded with zeros to whole tile rows (16 quads, 64 k); W panel: per quad 32 words as
//   avx512_vnni's, without the compensation words, the quads padded to whole tiles. A
//   32 x 32 micro-tile is four 16 x 16 int32 tiles (ddetr/amx_tiles.h), stored to
//   memory for the avx512_vnni epilogue. amx_emulated runs the same code with the tile
//   instructions done in C++.
// Edges: K is padded to whole pairs / quads (amx: tile rows) with w = 0 (and a = 0, i.e.
// 128 unsigned for avx512_vnni),
// N to whole panels with w = 0 (never stored), M to whole panels (never stored).
//
// Epilogue (all kernels, per element): s = a_scale[m] * w_scale[n] (one float multiply),
// c = fma(float(sum), s, bias[n] or 0), then max(0, c) for ReLU (NaN stays NaN). The
// conversions of the int32 sums round to nearest even in every kernel.
//
// Threads: one OpenMP loop over panels of MR rows (shared dynamically; each panel
// quantises and packs its rows, then walks all W panels). Every element is computed by
// one tile in the same order whatever the thread count, so the result does not depend
// on it. Quantising A: one pass for max |x| (AVX2 or scalar, the same result: max is
// exact), one pass dividing by the scale (IEEE division, the same in both), clamping to
// +-127 and rounding to nearest even.
#include "ddetr/amx_tiles.h"
#include "ddetr/gemm_int8.h"
#include "ddetr/threads.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define DDETR_INT8_X86 1
#include <immintrin.h>
#define DDETR_AVX2 __attribute__((target("avx2,fma")))
#define DDETR_AVX2_INLINE DDETR_AVX2 __attribute__((always_inline)) inline
#define DDETR_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define DDETR_VNNI_INLINE DDETR_VNNI __attribute__((always_inline)) inline
#else
#define DDETR_INT8_X86 0
#endif

namespace ddetr {
namespace {

constexpr int64_t kSerialBelow = int64_t(1) << 22;  // multiply-adds a team must pay for
constexpr uint32_t kMagic = 0x50384944;             // "DI8P"
constexpr size_t kHeaderBytes = 64;

struct Header {
  uint32_t magic;
  int32_t kernel;
  int64_t N, K;
  uint64_t bytes;
};
static_assert(sizeof(Header) <= kHeaderBytes, "header too large");

constexpr int kAvx2Mr = 6, kAvx2Nr = 16;
constexpr int kVnniMr = 8, kVnniNr = 32;
constexpr int kAmxMr = 32, kAmxNr = 32;
constexpr int kMaxMr = kAmxMr;

// What a kernel's packed panels look like.
struct Layout {
  int mr, nr;   // rows of an A panel, columns of a W panel
  int group;    // k values per 32-bit word: 2 (int16 pairs) or 4 (int8 quads)
  bool comp;    // the W panel starts with nr compensation words (and A is a + 128)
  int align;    // words per row rounded up to a multiple of this (zero words after K)
};

bool is_amx(Int8GemmKernel k) {
  return k == Int8GemmKernel::amx || k == Int8GemmKernel::amx_emulated;
}

Layout layout_of(Int8GemmKernel k) {
  if (k == Int8GemmKernel::avx2) return {kAvx2Mr, kAvx2Nr, 2, false, 1};
  if (is_amx(k)) return {kAmxMr, kAmxNr, 4, false, 16};
  return {kVnniMr, kVnniNr, 4, true, 1};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 32-bit words of one row of an A panel (one per k group, padded)
int64_t row_words(const Layout& l, int64_t K) {
  return ceil_div(ceil_div(K, l.group), l.align) * l.align;
}

// 32-bit words of one W panel
int64_t panel_words(const Layout& l, int64_t K) {
  return (l.comp ? l.nr : 0) + row_words(l, K) * l.nr;
}

bool cpu_has_avx2() {
#if DDETR_INT8_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if DDETR_INT8_X86
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni") && cpu_has_avx2();
  return yes;
#else
  return false;
#endif
}

// AMX-INT8 granted (ddetr/amx_tiles.h), with the VNNI epilogue
bool cpu_has_amx_int8() {
  static const bool yes = cpu_has_vnni() && amx::amx_usable(amx::Unit::int8);
  return yes;
}

// ---------------------------------------------------------------------------
// Quantising one row of A.

// max |x| over n values; NaN when one of them is NaN or inf
float row_absmax_scalar(const float* x, int64_t n) {
  float amax = 0.f;
  bool bad = false;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(x[k]);
    bad |= !(a <= FLT_MAX);
    amax = std::max(amax, a);
  }
  return bad ? NAN : amax;
}

void quantize_row_scalar(const float* x, int64_t n, float scale, int8_t* q) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = std::min(std::max(x[k] / scale, -127.f), 127.f);
    q[k] = int8_t(std::nearbyint(v));  // the default rounding mode: to nearest even
  }
}

#if DDETR_INT8_X86
DDETR_AVX2 float row_absmax_avx2(const float* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big = _mm256_set1_ps(FLT_MAX);
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // NaN or inf
    amax = _mm256_max_ps(amax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float m = row_absmax_scalar(x + k, n - k);
  if (_mm256_movemask_ps(bad) || std::isnan(m)) return NAN;
  for (float v : lanes) m = std::max(m, v);
  return m;
}

DDETR_AVX2 void quantize_row_avx2(const float* x, int64_t n, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f),
               hi = _mm256_set1_ps(127.f);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m256i i[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k + 8 * h), s);
      i[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));  // MXCSR: nearest even
    }
    // 2 x 8 int32 -> 16 int16 (lane-interleaved by the pack, put back by the permute) -> int8
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0xd8);
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), b);
  }
  quantize_row_scalar(x + k, n - k, scale, q + k);
}
#endif

template <class Absmax, class Quantize>
float quantize_row_with(Absmax absmax, Quantize quantize, const float* x, int64_t n, int8_t* q) {
  const float scale = absmax(x, n) / 127.f;  // NaN stays NaN
  if (scale > 0.f)
    quantize(x, n, scale, q);
  else  // zero (or underflowed to zero) or NaN: no values, no division
    std::memset(q, 0, size_t(n));
  return scale;
}

// The row's scale (see the header), and q filled with its quantised values: the same
// on both paths (max is exact, the division IEEE, the rounding to nearest even).
float quantize_row(const float* x, int64_t n, int8_t* q) {
#if DDETR_INT8_X86
  if (cpu_has_avx2()) return quantize_row_with(row_absmax_avx2, quantize_row_avx2, x, n, q);
#endif
  return quantize_row_with(row_absmax_scalar, quantize_row_scalar, x, n, q);
}

// ---------------------------------------------------------------------------
// Packing.

// Word `word` of one row: k values [group * word, group * word + group) of v (n long),
// zero past n; as int16 pairs (group 2) or int8 quads (group 4).
uint32_t row_word(const int8_t* v, int64_t n, int64_t word, int group) {
  uint32_t out = 0;
  for (int j = 0; j < group; ++j) {
    const int64_t k = group * word + j;
    const int x = k < n ? v[k] : 0;
    out |= group == 2 ? uint32_t(uint16_t(int16_t(x))) << (16 * j)
                      : uint32_t(uint8_t(x)) << (8 * j);
  }
  return out;
}

// Row r of an A panel (rows `words` words apart): int16 pairs (group 2), int8 quads as
// unsigned a + 128 (group 4 with compensation), or as they are (amx); past K, a = 0.
void pack_a_row(const Layout& l, const int8_t* q, int64_t K, int64_t words, int r,
                uint32_t* apack) {
  uint32_t* row = apack + r * words;
  if (!l.comp && l.group == 4) {
    auto* out = reinterpret_cast<int8_t*>(row);
    std::memcpy(out, q, size_t(K));
    std::memset(out + K, 0, size_t(4 * words - K));
  } else if (l.group == 2) {
    for (int64_t p = 0; p < K / 2; ++p)  // (vectorised: sign extension and interleave)
      row[p] = uint32_t(uint16_t(int16_t(q[2 * p]))) |
               uint32_t(uint16_t(int16_t(q[2 * p + 1]))) << 16;
    if (K % 2) row[K / 2] = uint32_t(uint16_t(int16_t(q[K - 1])));
  } else {
    auto* out = reinterpret_cast<uint8_t*>(row);  // (bytes may alias the words)
    for (int64_t k = 0; k < K; ++k) out[k] = uint8_t(q[k]) ^ 0x80u;  // a + 128
    for (int64_t k = K; k < 4 * words; ++k) out[k] = 0x80u;
  }
}

void pack_a_padding_row(const Layout& l, int64_t words, int r, uint32_t* apack) {
  const uint32_t zero = l.comp ? 0x80808080u : 0u;  // a = 0
  std::fill(apack + r * words, apack + (r + 1) * words, zero);
}

// W panel j (columns [j nr, j nr + nr)).
void pack_w_panel(const Layout& l, const int8_t* W, int64_t N, int64_t K, int64_t ldw, int64_t j,
                  uint32_t* out) {
  const int64_t words = row_words(l, K);  // the padding words: zero
  uint32_t* body = out + (l.comp ? l.nr : 0);
  for (int c = 0; c < l.nr; ++c) {
    const int64_t n = j * l.nr + c;
    const int8_t* row = n < N && K > 0 ? W + n * ldw : nullptr;  // null: all zero
    int32_t sum = 0;
    for (int64_t k = 0; row && k < K; ++k) sum += row[k];
    if (l.comp) out[c] = uint32_t(-128 * sum);
    for (int64_t w = 0; w < words; ++w) body[w * l.nr + c] = row ? row_word(row, K, w, l.group) : 0;
  }
}

// ---------------------------------------------------------------------------
// Tiles.

// Where one tile's results go and what the epilogue needs.
struct Tile {
  float* c;              // C at the tile's first element
  int64_t ldc;
  const float* a_scale;  // the panel's row scales (mr of them)
  const float* w_scale;  // at the tile's first column
  const float* bias;     // at the tile's first column, or null
  bool relu;
  int rows, cols;        // valid part of the tile
};

inline float epilogue(int32_t sum, float a_scale, const Tile& t, int c) {
  const float s = a_scale * t.w_scale[c];
  const float x = std::fma(float(sum), s, t.bias ? t.bias[c] : 0.f);
  return t.relu ? (x < 0.f ? 0.f : x) : x;  // as max(0, x): NaN and -0 stay
}

// The part of tile t (a row panel, all of C's columns) that W panel j of nr columns
// covers: its columns of C, its scales and its bias.
inline Tile panel_tile(Tile t, int nr, int64_t N, int64_t j) {
  t.c += j * nr;
  t.w_scale += j * nr;
  if (t.bias) t.bias += j * nr;
  t.cols = int(std::min<int64_t>(nr, N - j * nr));
  return t;
}

// scalar: the avx512_vnni layout in plain C++.
void tile_scalar(int64_t quads, const uint32_t* a, const uint32_t* w, const Tile& t) {
  int32_t acc[kVnniMr][kVnniNr];
  for (int r = 0; r < kVnniMr; ++r)
    for (int c = 0; c < kVnniNr; ++c) acc[r][c] = int32_t(w[c]);
  const uint32_t* body = w + kVnniNr;
  for (int64_t q = 0; q < quads; ++q) {
    for (int r = 0; r < t.rows; ++r) {
      uint8_t av[4];
      std::memcpy(av, a + r * quads + q, 4);
      for (int c = 0; c < kVnniNr; ++c) {
        int8_t wv[4];
        std::memcpy(wv, body + q * kVnniNr + c, 4);
        acc[r][c] += av[0] * wv[0] + av[1] * wv[1] + av[2] * wv[2] + av[3] * wv[3];
      }
    }
  }
  for (int r = 0; r < t.rows; ++r)
    for (int c = 0; c < t.cols; ++c) t.c[r * t.ldc + c] = epilogue(acc[r][c], t.a_scale[r], t, c);
}

#if DDETR_INT8_X86
alignas(32) constexpr int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};

// lanes [0, n) of 8 (n in 0..8)
DDETR_AVX2_INLINE __m256i first_lanes8(int n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - std::clamp(n, 0, 8)));
}

DDETR_AVX2_INLINE void tile_avx2(int64_t pairs, const uint32_t* a, const uint32_t* w,
                                 const Tile& t) {
  constexpr int MR = kAvx2Mr;
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * kAvx2Nr));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * kAvx2Nr + 8));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i av = _mm256_set1_epi32(int(a[r * pairs + p]));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, w1));
    }
  }
  // through memory, so that the loop above keeps every sum in a register
  alignas(32) int32_t sums[MR][kAvx2Nr];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r]), acc[r][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r] + 8), acc[r][1]);
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int v = 0; v < 2; ++v) {
    const int cols = t.cols - 8 * v;
    if (cols <= 0) break;
    const __m256i mask = first_lanes8(cols);
    const __m256 ws = _mm256_maskload_ps(t.w_scale + 8 * v, mask);
    const __m256 b = t.bias ? _mm256_maskload_ps(t.bias + 8 * v, mask) : zero;
    for (int r = 0; r < t.rows; ++r) {
      const __m256 s = _mm256_mul_ps(_mm256_set1_ps(t.a_scale[r]), ws);
      const __m256i sum = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r] + 8 * v));
      __m256 x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, b);
      if (t.relu) x = _mm256_max_ps(zero, x);  // NaN (second operand) stays
      float* out = t.c + r * t.ldc + 8 * v;
      if (cols >= 8)
        _mm256_storeu_ps(out, x);
      else
        _mm256_maskstore_ps(out, mask, x);
    }
  }
}

DDETR_AVX2 void columns_avx2(int64_t words, const uint32_t* apack, const uint32_t* wpack,
                             int64_t pw, int64_t N, Tile t) {
  for (int64_t j = 0; j * kAvx2Nr < N; ++j)
    tile_avx2(words, apack, wpack + j * pw, panel_tile(t, kAvx2Nr, N, j));
}

DDETR_VNNI_INLINE __mmask16 first_lanes16(int n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// The epilogue of a tile of up to 32 columns from its int32 sums (rows `ld` apart).
DDETR_VNNI_INLINE void finish_sums_vnni(const int32_t* sums, int64_t ld, const Tile& t) {
  const __m512 zero = _mm512_setzero_ps();
  for (int v = 0; v < 2; ++v) {
    const __mmask16 mask = first_lanes16(t.cols - 16 * v);
    if (!mask) break;
    const __m512 ws = _mm512_maskz_loadu_ps(mask, t.w_scale + 16 * v);
    const __m512 b = t.bias ? _mm512_maskz_loadu_ps(mask, t.bias + 16 * v) : zero;
    for (int r = 0; r < t.rows; ++r) {
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(t.a_scale[r]), ws);
      const __m512i sum = _mm512_loadu_si512(sums + r * ld + 16 * v);
      __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, b);
      if (t.relu) x = _mm512_max_ps(zero, x);
      _mm512_mask_storeu_ps(t.c + r * t.ldc + 16 * v, mask, x);
    }
  }
}

DDETR_VNNI_INLINE void tile_vnni(int64_t quads, const uint32_t* a, const uint32_t* w,
                                 const Tile& t) {
  constexpr int MR = kVnniMr;
  const __m512i comp0 = _mm512_loadu_si512(w), comp1 = _mm512_loadu_si512(w + 16);
  __m512i acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = comp0, acc[r][1] = comp1;
  const uint32_t* body = w + kVnniNr;
  for (int64_t q = 0; q < quads; ++q) {
    const __m512i w0 = _mm512_loadu_si512(body + q * kVnniNr);
    const __m512i w1 = _mm512_loadu_si512(body + q * kVnniNr + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(int(a[r * quads + q]));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, w1);
    }
  }
  alignas(64) int32_t sums[MR][kVnniNr];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_store_si512(sums[r], acc[r][0]);
    _mm512_store_si512(sums[r] + 16, acc[r][1]);
  }
  finish_sums_vnni(&sums[0][0], kVnniNr, t);
}

DDETR_VNNI void columns_vnni(int64_t words, const uint32_t* apack, const uint32_t* wpack,
                             int64_t pw, int64_t N, Tile t) {
  for (int64_t j = 0; j * kVnniNr < N; ++j)
    tile_vnni(words, apack, wpack + j * pw, panel_tile(t, kVnniNr, N, j));
}

#if !DDETR_HAVE_AMX_PATH  // a compiler without AMX: the emulation alone
#define DDETR_TILES DDETR_VNNI
#endif

// amx: one 32 x 32 micro-tile over `words` (a multiple of 16) quads.
template <class Tiles>
DDETR_TILES __attribute__((always_inline)) inline void tile_amx(int64_t words,
                                                                const uint32_t* a,
                                                                const uint32_t* w,
                                                                const Tile& t) {
  const int64_t a_stride = words * 4, w_stride = kAmxNr * 4;
  for (int c = 0; c < 4; ++c) Tiles::zero(c);
  for (int64_t q = 0; q < words; q += 16) {
    Tiles::load(4, a + q, a_stride);
    Tiles::load(5, a + 16 * words + q, a_stride);
    Tiles::load(6, w + q * kAmxNr, w_stride);
    Tiles::load(7, w + q * kAmxNr + 16, w_stride);
    for (int c = 0; c < 4; ++c) Tiles::dot_int8(c);
  }
  alignas(64) int32_t sums[kAmxMr][kAmxNr];
  for (int c = 0; c < 4; ++c) Tiles::store(c, &sums[16 * (c / 2)][16 * (c % 2)], kAmxNr * 4);
  finish_sums_vnni(&sums[0][0], kAmxNr, t);
}

template <class Tiles>
DDETR_TILES void columns_amx(int64_t words, const uint32_t* apack, const uint32_t* wpack,
                             int64_t pw, int64_t N, Tile t) {
  Tiles::configure(amx::tile_config());
  for (int64_t j = 0; j * kAmxNr < N; ++j)
    tile_amx<Tiles>(words, apack, wpack + j * pw, panel_tile(t, kAmxNr, N, j));
  Tiles::release();
}
#endif

void columns_scalar(int64_t words, const uint32_t* apack, const uint32_t* wpack, int64_t pw,
                    int64_t N, Tile t) {
  for (int64_t j = 0; j * kVnniNr < N; ++j)
    tile_scalar(words, apack, wpack + j * pw, panel_tile(t, kVnniNr, N, j));
}

// ---------------------------------------------------------------------------
// Checks and the driver.

void check_kernel_runs(Int8GemmKernel k) {
  if (!gemm_int8_supported(k))
    throw std::runtime_error("gemm_int8: this CPU cannot run the " + int8_kernel_name(k) +
                             " kernel");
}

const Header& check_packed(const void* packed, size_t packed_bytes) {
  if (!packed) throw std::invalid_argument("packed is a null pointer");
  if (packed_bytes < kHeaderBytes)
    throw std::invalid_argument("packed: " + std::to_string(packed_bytes) +
                                " bytes, shorter than its header");
  const auto& h = *static_cast<const Header*>(packed);
  const int32_t k = h.kernel;
  if (h.magic != kMagic || k < 1 || k > 5)
    throw std::invalid_argument("packed: not a buffer written by gemm_int8_pack");
  const auto kernel = Int8GemmKernel(k);
  if (h.N < 0 || h.K < 0 || h.K > kInt8MaxK ||
      h.bytes != gemm_int8_packed_bytes(kernel, h.N, h.K) || packed_bytes < h.bytes)
    throw std::invalid_argument("packed: its header does not match its size");
  return h;
}

void check_args(const Int8GemmArgs& g) {
  if (g.M < 0 || g.N < 0 || g.K < 0)
    throw std::invalid_argument("gemm_int8: negative size (M " + std::to_string(g.M) + ", N " +
                                std::to_string(g.N) + ", K " + std::to_string(g.K) + ")");
  const Header& h = check_packed(g.packed, g.packed_bytes);
  if (h.N != g.N || h.K != g.K)
    throw std::invalid_argument("packed: holds W of N " + std::to_string(h.N) + ", K " +
                                std::to_string(h.K) + ", the call has N " +
                                std::to_string(g.N) + ", K " + std::to_string(g.K));
  check_kernel_runs(Int8GemmKernel(h.kernel));
  if (g.M == 0 || g.N == 0) return;
  if ((g.A != nullptr) == (g.A_q != nullptr))
    throw std::invalid_argument("A, A_q: exactly one of them must be given");
  if (g.A_q && !g.a_scale) throw std::invalid_argument("a_scale is a null pointer");
  if (g.lda < g.K) throw std::invalid_argument("lda: shorter than a row of A (K)");
  if (g.ldc < g.N) throw std::invalid_argument("ldc: shorter than a row of C (N)");
  if (!g.w_scale) throw std::invalid_argument("w_scale is a null pointer");
  if (!g.C) throw std::invalid_argument("C is a null pointer");
}

struct Job {
  const Int8GemmArgs* g;
  Int8GemmKernel kernel;
  Layout lay;
  const uint32_t* wpack;
  int64_t pw;     // words per W panel
  int64_t words;  // words per row of an A panel (pairs or quads of K)
};

// Rows [m0, m0 + mr) of C: quantise and pack the A panel, then every W panel.
void row_panel(const Job& job, int64_t m0, std::vector<int8_t>& qrow,
               std::vector<uint32_t>& apack) {
  const Int8GemmArgs& g = *job.g;
  const Layout& l = job.lay;
  const int rows = int(std::min<int64_t>(l.mr, g.M - m0));
  float scales[kMaxMr] = {};
  for (int r = 0; r < l.mr; ++r) {
    if (r >= rows) {
      pack_a_padding_row(l, job.words, r, apack.data());
      continue;
    }
    const int8_t* q = qrow.data();
    if (g.A) {
      scales[r] = quantize_row(g.A + (m0 + r) * g.lda, g.K, qrow.data());
    } else {
      q = g.A_q + (m0 + r) * g.lda;
      scales[r] = g.a_scale[m0 + r];
    }
    pack_a_row(l, q, g.K, job.words, r, apack.data());
  }
  Tile t{g.C + m0 * g.ldc, g.ldc, scales, g.w_scale, g.bias, g.relu, rows, 0};
  switch (job.kernel) {
#if DDETR_INT8_X86
    case Int8GemmKernel::avx2:
      return columns_avx2(job.words, apack.data(), job.wpack, job.pw, g.N, t);
    case Int8GemmKernel::avx512_vnni:
      return columns_vnni(job.words, apack.data(), job.wpack, job.pw, g.N, t);
    case Int8GemmKernel::amx_emulated:
      return columns_amx<amx::EmulatedTiles>(job.words, apack.data(), job.wpack, job.pw, g.N, t);
#if DDETR_HAVE_AMX_PATH
    case Int8GemmKernel::amx:
      return columns_amx<amx::HardwareTiles>(job.words, apack.data(), job.wpack, job.pw, g.N, t);
#endif
#endif
    default:
      return columns_scalar(job.words, apack.data(), job.wpack, job.pw, g.N, t);
  }
}

}  // namespace

Int8GemmKernel int8_kernel_from_name(const std::string& name) {
  if (name == "auto") return Int8GemmKernel::automatic;
  if (name == "scalar") return Int8GemmKernel::scalar;
  if (name == "avx2") return Int8GemmKernel::avx2;
  if (name == "avx512_vnni") return Int8GemmKernel::avx512_vnni;
  if (name == "amx") return Int8GemmKernel::amx;
  if (name == "amx_emulated") return Int8GemmKernel::amx_emulated;
  throw std::invalid_argument(
      "kernel: expected auto, scalar, avx2, avx512_vnni, amx or amx_emulated, got " + name);
}

std::string int8_kernel_name(Int8GemmKernel kernel) {
  switch (kernel) {
    case Int8GemmKernel::scalar: return "scalar";
    case Int8GemmKernel::avx2: return "avx2";
    case Int8GemmKernel::avx512_vnni: return "avx512_vnni";
    case Int8GemmKernel::amx: return "amx";
    case Int8GemmKernel::amx_emulated: return "amx_emulated";
    default: return "auto";
  }
}

bool gemm_int8_supported(Int8GemmKernel kernel) {
  if (kernel == Int8GemmKernel::avx2) return cpu_has_avx2();
  if (kernel == Int8GemmKernel::avx512_vnni || kernel == Int8GemmKernel::amx_emulated)
    return cpu_has_vnni();
  if (kernel == Int8GemmKernel::amx) return cpu_has_amx_int8();
  return true;
}

// The AMX kernel, where the CPU has it, checked once against the scalar one (its tests
// run on CPUs with AMX only); a disagreement is printed and AMX left unused.
static bool amx_int8_checked() {
  static const bool ok = [] {
    if (!cpu_has_amx_int8()) return false;
    if (gemm_int8_agrees(Int8GemmKernel::amx)) return true;
    std::fprintf(stderr, "ddetr: the AMX int8 GEMM disagreed with the scalar one on a check "
                         "on this CPU; int8 GEMMs run on AVX512-VNNI instead (please report "
                         "this)\n");
    return false;
  }();
  return ok;
}

bool gemm_int8_agrees(Int8GemmKernel kernel) {
  // 33 x 47 x 75: a tail in every size of every kernel's panels; float A quantised in
  // the call, a bias and ReLU
  constexpr int64_t M = 33, N = 47, K = 75;
  std::vector<float> a(M * K), w_scale(N), bias(N);
  std::vector<int8_t> w(N * K);
  uint32_t state = 12345;
  const auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  for (float& x : a) x = float(next()) / float(1 << 24) * 4.f - 2.f;
  for (int8_t& x : w) x = int8_t(int(next() % 255) - 127);
  for (float& x : w_scale) x = float(next() % 1000 + 1) / 1e4f;
  for (float& x : bias) x = float(next()) / float(1 << 24) - 0.5f;
  std::vector<float> out[2];
  const Int8GemmKernel kernels[2] = {Int8GemmKernel::scalar, kernel};
  for (int i = 0; i < 2; ++i) {
    std::vector<uint64_t> packed(gemm_int8_packed_bytes(kernels[i], N, K) / 8 + 1);
    const size_t bytes = packed.size() * 8;
    gemm_int8_pack(kernels[i], w.data(), N, K, K, packed.data(), bytes, 1);
    out[i].assign(M * N, 0.f);
    Int8GemmArgs g;
    g.M = M, g.N = N, g.K = K, g.A = a.data(), g.lda = K, g.packed = packed.data();
    g.packed_bytes = bytes, g.w_scale = w_scale.data(), g.bias = bias.data(), g.relu = true;
    g.C = out[i].data(), g.ldc = N;
    gemm_int8(g, 2);
  }
  return std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)) == 0;
}

Int8GemmKernel gemm_int8_resolve(Int8GemmKernel kernel) {
  if (kernel != Int8GemmKernel::automatic) return kernel;
  if (amx_int8_checked()) return Int8GemmKernel::amx;
  if (cpu_has_vnni()) return Int8GemmKernel::avx512_vnni;
  if (cpu_has_avx2()) return Int8GemmKernel::avx2;
  return Int8GemmKernel::scalar;
}

size_t gemm_int8_packed_bytes(Int8GemmKernel kernel, int64_t N, int64_t K) {
  if (N < 0 || K < 0 || K > kInt8MaxK)
    throw std::invalid_argument("gemm_int8: need N >= 0 and 0 <= K <= " +
                                std::to_string(kInt8MaxK) + ", got N " + std::to_string(N) +
                                ", K " + std::to_string(K));
  const Layout l = layout_of(gemm_int8_resolve(kernel));
  return kHeaderBytes + size_t(ceil_div(N, l.nr) * panel_words(l, K)) * sizeof(uint32_t);
}

void gemm_int8_pack(Int8GemmKernel kernel, const int8_t* W, int64_t N, int64_t K, int64_t ldw,
                    void* packed, size_t packed_bytes, int num_threads) {
  kernel = gemm_int8_resolve(kernel);
  check_kernel_runs(kernel);
  const size_t needed = gemm_int8_packed_bytes(kernel, N, K);
  if (!packed) throw std::invalid_argument("packed is a null pointer");
  if (packed_bytes < needed)
    throw std::invalid_argument("packed: " + std::to_string(packed_bytes) + " bytes, W of N " +
                                std::to_string(N) + ", K " + std::to_string(K) + " needs " +
                                std::to_string(needed));
  if (N > 0 && K > 0 && !W) throw std::invalid_argument("W is a null pointer");
  if (N > 0 && ldw < K) throw std::invalid_argument("ldw: shorter than a row of W (K)");
  std::memset(packed, 0, kHeaderBytes);
  Header h{kMagic, int32_t(kernel), N, K, needed};
  std::memcpy(packed, &h, sizeof h);
  const Layout l = layout_of(kernel);
  const int64_t pw = panel_words(l, K), panels = ceil_div(N, l.nr);
  auto* body = reinterpret_cast<uint32_t*>(static_cast<char*>(packed) + kHeaderBytes);
  const int nt = resolve_threads(num_threads, N * K, int64_t(1) << 18);
#pragma omp parallel for DDETR_SHARE_ITEMS num_threads(nt)
  for (int64_t j = 0; j < panels; ++j) pack_w_panel(l, W, N, K, ldw, j, body + j * pw);
}

Int8GemmKernel gemm_int8_packed_kernel(const void* packed, size_t packed_bytes) {
  return Int8GemmKernel(check_packed(packed, packed_bytes).kernel);
}

void gemm_int8(const Int8GemmArgs& g, int num_threads) {
  check_args(g);
  if (g.M == 0 || g.N == 0) return;
  Job job;
  job.g = &g;
  job.kernel = Int8GemmKernel(static_cast<const Header*>(g.packed)->kernel);
  job.lay = layout_of(job.kernel);
  job.wpack = reinterpret_cast<const uint32_t*>(static_cast<const char*>(g.packed) + kHeaderBytes);
  job.pw = panel_words(job.lay, g.K);
  job.words = row_words(job.lay, g.K);
  const int64_t panels = ceil_div(g.M, job.lay.mr);
  const int nt = resolve_threads(num_threads, g.M * g.N * std::max<int64_t>(g.K, 1), kSerialBelow);
#pragma omp parallel num_threads(nt)
  {
    std::vector<int8_t> qrow(size_t(g.K) + 1);
    std::vector<uint32_t> apack(size_t(job.words * job.lay.mr) + 1);
#pragma omp for DDETR_SHARE_ITEMS
    for (int64_t i = 0; i < panels; ++i) row_panel(job, i * job.lay.mr, qrow, apack);
  }
}

void quantize_rows_int8(const float* x, int64_t rows, int64_t cols, int64_t ldx, int8_t* q,
                        int64_t ldq, float* scale, int num_threads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("quantize_rows_int8: negative size");
  if (rows == 0) return;
  if (!x || !q || !scale) throw std::invalid_argument("x, q and scale must not be null");
  if (ldx < cols || ldq < cols) throw std::invalid_argument("ldx, ldq: shorter than a row");
  const int nt = resolve_threads(num_threads, rows * cols, int64_t(1) << 18);
#pragma omp parallel for DDETR_SHARE_ITEMS num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) scale[r] = quantize_row(x + r * ldx, cols, q + r * ldq);
}

}  // namespace ddetr
