// bfloat16 GEMM on the CPU (ddetr::gemm_bf16, see ddetr/blas.h).
//
// Math. C[m, n] = act(sum_k op(A)[m, k] op(B)[k, n] + beta * C[m, n] + bias[n]), the sum
// in float over all of K in increasing k, C rounded once to bf16 (to nearest even) or
// stored as float.
//
// AVX512-BF16 path. VDPBF16PS takes two vectors of 16 bf16 *pairs* and adds, in each of
// its 16 float lanes, a[2i] b[2i] + a[2i+1] b[2i+1] (the products of two bf16 are exact
// in float; the instruction treats denormal inputs as zero and flushes denormal results,
// and so does VCVTNEPS2BF16, which rounds C, so this path never makes a bf16 denormal).
// So both operands are packed as 32-bit words holding a pair (k = 2p in the low half,
// 2p + 1 in the high half; an odd K's last pair has a zero high half):
//   op(B): panels of NR = 16 * NV columns, pair p of the panel at words [p * NR, p * NR + NR)
//   op(A): one panel of MR rows at a time, pair p at words [p * MR, p * MR + MR)
// The micro-kernel keeps an MR x NR tile of C in MR * NV zmm accumulators (28 of the 32
// registers); per pair it loads NV vectors of B and broadcasts each row's A word, which
// is MR * NV dot products for NV + MR loads. Edges are zero-padded in the packs, and the
// epilogue (beta * C, bias, ReLU, rounding) stores through masks; edge tiles of at most
// 8 rows or 16 columns run a narrower instance of the kernel (1, 2, 4 or 8 rows; one
// vector), so skinny GEMMs (M or N = 1) do not pay for all of the padding.
//
// Blocking. K in blocks of at most kMaxKc (even, equal sizes, so a pair never straddles
// two blocks), N in blocks whose packed B (kc x nc bf16) takes at most kBWords words of
// the scratch so it stays in L2 while every row of A streams past it; the A panel
// (MR x kc, 28 KB at most, on the stack) sits in L1 and is reused across the block's NR
// panels. With more than one K block (K > kMaxKc: weight gradients, whose K is the
// number of tokens) the partial sums of a block of rows wait in float in the scratch
// (kAccFloats) between K blocks. 14 x 32 tiles and kMaxKc = 1024 measured best among
// the candidates tried (6 x 64, 8 x 48, 10 x 48, 12 x 32; kMaxKc 256, 512) on Zen 5.
//
// Threads: one OpenMP team; all threads pack the B block together (its pairs or panels
// split between them, then a barrier), then each takes an equal contiguous range of the
// block's MR x NR tiles, numbered row panel by row panel (so a thread packs each A panel
// once; a panel split between two threads is packed by both). Every element of C is
// summed by one micro-kernel in the same order whatever the thread count, so the result
// does not depend on it: the blocking depends on K and N only.
//
// The AMX path (below, before the driver) shares the packs, the blocking, the driver
// and the epilogue, with 32 x 32 micro-tiles of tile instructions.
//
// Which path runs: AMX when the CPU has AMX-BF16 (and the OS grants the tile state),
// else the AVX512-BF16 kernel when the CPU has it (checked once, the kernels carry their
// own target attributes, so the library builds with any -march), else the widening path
// of gemm_bf16_widen.cpp. The environment variable DDETR_BF16_GEMM (amx, amx_emulated,
// avx512, widen) forces one (for tests and benchmarks).
#include "ddetr/amx_tiles.h"
#include "ddetr/blas.h"
#include "ddetr/threads.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define DDETR_HAVE_AVX512_BF16_PATH 1
#include <immintrin.h>
#define DDETR_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define DDETR_AVX512BF16_INLINE \
  DDETR_AVX512BF16 __attribute__((always_inline)) inline
#else
#define DDETR_HAVE_AVX512_BF16_PATH 0
#endif

namespace ddetr {
namespace {

// Below this many multiply-adds a GEMM stays on the calling thread.
constexpr int64_t kSerialBelowFlops = int64_t(1) << 22;

bool avx512_bf16_supported() {
#if DDETR_HAVE_AVX512_BF16_PATH
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

// The AMX kernel runs: AMX-BF16 granted (ddetr/amx_tiles.h) and AVX512-BF16, which its
// packing and epilogue use.
bool amx_supported() {
  static const bool yes = avx512_bf16_supported() && amx::amx_usable(amx::Unit::bf16);
  return yes;
}

#if DDETR_HAVE_AVX512_BF16_PATH

constexpr int kNr = 32;              // columns of a micro-tile (both kernels)
constexpr int kMr = 14;              // AVX512-BF16: rows of the micro-tile
constexpr int kNv = kNr / 16;        // AVX512-BF16: zmm vectors across it
constexpr int kAmxMr = 32;           // AMX: rows of the micro-tile (two A tiles)
constexpr int64_t kAmxPairs = 16;    // AMX: K pairs a tile row holds (64 bytes)
constexpr int64_t kMaxKc = 1024;     // K elements per block (even)
constexpr int64_t kBWords = int64_t(1) << 18;    // packed B block: 1 MB
constexpr int64_t kAccFloats = int64_t(1) << 19;  // partial sums across K blocks: 2 MB
static_assert(kBWords + kAccFloats <= kGemmBf16ScratchFloats, "scratch too small");
static_assert(kMaxKc % 2 == 0 && kBWords >= kMaxKc / 2 * kNr, "B block below one panel");
static_assert(kMaxKc / 2 % kAmxPairs == 0, "an AMX A panel of kMaxKc is whole tiles");

// Block sizes of one GEMM: they depend on K, N and the kernel only, never on the thread
// count.
struct Blocking {
  int64_t kc = 0, nk = 1;  // K block (even unless it is all of an odd K) and count
  int64_t nc = 0, nn = 1;  // N block (a multiple of kNr) and count
  int64_t mc = 0;          // rows summed over all K blocks before moving on
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// `mr`: rows of the kernel's micro-tile; `pair_align`: its packs hold the K pairs of a
// block rounded up to a multiple of this (zero pairs at the end).
Blocking blocking(int64_t M, int64_t N, int64_t K, int64_t mr, int64_t pair_align) {
  Blocking b;
  b.nk = std::max<int64_t>(1, ceil_div(K, kMaxKc));
  b.kc = b.nk == 1 ? K : round_up(ceil_div(K, b.nk), 2);
  const int64_t pairs = round_up(std::max<int64_t>(1, ceil_div(b.kc, 2)), pair_align);
  const int64_t max_nc = std::max<int64_t>(kNr, kBWords / pairs / kNr * kNr);
  b.nn = ceil_div(N, max_nc);
  b.nc = round_up(ceil_div(N, b.nn), kNr);
  b.mc = b.nk == 1 ? M : std::max<int64_t>(mr, kAccFloats / b.nc / mr * mr);
  return b;
}

// ---------------------------------------------------------------------------
// Packing. Two sources of pair words:
// * "row words": a row-major matrix whose rows run along k (A, or B transposed): the
//   pair (k, k + 1) of row r is already one word, so packing is a 32-bit transpose of
//   16 rows x 16 words at a time;
// * "row pairs": a matrix whose rows are k (A transposed, or B): rows 2p and 2p + 1 are
//   interleaved 16 bits at a time with one two-source permute.

// r[j] <- column j of the 16 x 16 word matrix r (rows in, columns out)
DDETR_AVX512BF16_INLINE void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // 128-bit lane L: rows i, i + 1 of words 4L .. 4L + 3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c], lane L: rows i .. i + 3 of word 4L + c
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // transpose the 4 x 4 lanes of u[c], u[4 + c], ...
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

__mmask32 first_bits32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : (__mmask32(1) << n) - 1;
}
__mmask16 first_bits16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? 0 : __mmask16((1u << n) - 1);
}

// out[p * W + r] = pair p of row r (src + r * ld, kc elements), r < rows <= W; rows
// rows .. W - 1 and the missing half of an odd last pair are zero.
DDETR_AVX512BF16 void pack_row_words(const bf16* src, int64_t ld, int rows, int64_t kc, int W,
                                     uint32_t* out) {
  const int64_t pairs = ceil_div(kc, 2);
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    const __mmask32 load = first_bits32(kc - 2 * p0);  // whole or half words left
    const int64_t np = std::min<int64_t>(16, pairs - p0);
    for (int g = 0; g < W; g += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = g + i < rows ? _mm512_maskz_loadu_epi16(load, src + (g + i) * ld + 2 * p0)
                            : _mm512_setzero_si512();
      transpose16(r);
      const __mmask16 store = first_bits16(W - g);
      for (int64_t j = 0; j < np; ++j)
        _mm512_mask_storeu_epi32(out + (p0 + j) * W + g, store, r[j]);
    }
  }
}

// Word j of the permutes below: (x0[j], x1[j]) for j < 16 (kLo) or j >= 16 (kHi).
alignas(64) constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                          37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                          11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                          53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                          27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// For pairs p in [p0, p1): out[(c / W) * panel_words + p * W + c % W] = (src[2p][c],
// src[2p + 1][c]) for c < cols (rows of src ld apart, kc of them), in panels of W
// columns; the last panel's columns past cols and a missing row 2p + 1 are zero. Rows
// are read whole, one after the other, which the hardware prefetcher follows.
DDETR_AVX512BF16 void pack_row_pairs(const bf16* src, int64_t ld, int64_t cols, int64_t kc,
                                     int64_t p0, int64_t p1, int W, int64_t panel_words,
                                     uint32_t* out) {
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t p = p0; p < p1; ++p) {
    const bf16* row = src + 2 * p * ld;
    const bool second = 2 * p + 1 < kc;
    for (int64_t c0 = 0; c0 < cols; c0 += W) {
      uint32_t* panel = out + c0 / W * panel_words + p * W;
      for (int g = 0; g < W; g += 32) {
        const __mmask32 load = first_bits32(std::min<int64_t>(cols - c0, W) - g);
        const __m512i x0 = _mm512_maskz_loadu_epi16(load, row + c0 + g);
        const __m512i x1 = second ? _mm512_maskz_loadu_epi16(load, row + ld + c0 + g)
                                  : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(panel + g, first_bits16(W - g),
                                 _mm512_permutex2var_epi16(x0, lo, x1));
        if (W - g > 16)
          _mm512_mask_storeu_epi32(panel + g + 16, first_bits16(W - g - 16),
                                   _mm512_permutex2var_epi16(x0, hi, x1));
      }
    }
  }
}

// Prefetching. An MR-row panel of an untransposed A is 14 separate row segments, often
// read straight from memory (the encoder's activations are megabytes, read once), and
// the hardware prefetcher does not foresee the jump to the next panel: its lines are
// asked for a slice per tile while the tiles of the current panel compute. (A
// transposed panel reads on along the lines the last one read.) Inlined by force: as a
// function of its own GCC finds this pure and drops the calls.
DDETR_AVX512BF16_INLINE void prefetch_a(const GemmArgs& g, int64_t m0, int64_t rows, int64_t k0,
                                        int64_t kc, int64_t part, int64_t parts) {
  if (g.trans_a || rows <= 0 || kc <= 0) return;
  const auto* base =
      reinterpret_cast<const char*>(static_cast<const bf16*>(g.A) + m0 * g.lda + k0);
  const int64_t ld = g.lda * int64_t(sizeof(bf16)), bytes = kc * int64_t(sizeof(bf16));
  const int64_t per_row = ceil_div(bytes, 64) + 1;  // + 1: a row need not start a line
  const int64_t e0 = rows * per_row * part / parts, e1 = rows * per_row * (part + 1) / parts;
  int64_t row = e0 / per_row, line = e0 % per_row;  // one division, then steps
  for (int64_t e = e0; e < e1; ++e) {
    __builtin_prefetch(base + row * ld + std::min(64 * line, bytes - 1), 0, 3);
    if (++line == per_row) line = 0, ++row;
  }
}

// Rows [m0, m0 + rows) of op(A), K elements [k0, k0 + kc), as one MR-row panel.
DDETR_AVX512BF16 void pack_a(const GemmArgs& g, int64_t m0, int rows, int64_t k0, int64_t kc,
                             uint32_t* out) {
  const auto* A = static_cast<const bf16*>(g.A);
  if (g.trans_a)  // A is (K, M): op(A)'s k runs down A's rows
    pack_row_pairs(A + k0 * g.lda + m0, g.lda, rows, kc, 0, ceil_div(kc, 2), kMr, 0, out);
  else
    pack_row_words(A + m0 * g.lda + k0, g.lda, rows, kc, kMr, out);
}

// This thread's share of the B block: columns [n0, n0 + nc) of op(B), K elements
// [k0, k0 + kc), as NR-column panels of `pair_rows` pairs each (ceil(kc / 2) of them
// packed, the rest zero).
DDETR_AVX512BF16 void pack_b_share(const GemmArgs& g, int64_t n0, int64_t nc, int64_t k0,
                                   int64_t kc, int64_t pair_rows, uint32_t* out) {
  const auto* B = static_cast<const bf16*>(g.B);
  const int64_t pairs = ceil_div(kc, 2), npanels = ceil_div(nc, kNr);
  const auto [j0, j1] = thread_slice(npanels, 1);
  if (g.trans_b) {  // B is (N, K): each column of op(B) is a row of B; panels shared out
    for (int64_t j = j0; j < j1; ++j)
      pack_row_words(B + (n0 + j * kNr) * g.ldb + k0, g.ldb,
                     int(std::min<int64_t>(kNr, nc - j * kNr)), kc, kNr,
                     out + j * pair_rows * kNr);
  } else {  // rows of B are rows of op(B); pairs shared out
    const auto [p0, p1] = thread_slice(pairs, 8);
    pack_row_pairs(B + k0 * g.ldb + n0, g.ldb, nc, kc, p0, p1, kNr, pair_rows * kNr, out);
  }
  for (int64_t j = j0; j < j1; ++j)  // the padding pairs
    std::fill(out + (j * pair_rows + pairs) * kNr, out + (j + 1) * pair_rows * kNr, 0u);
}

// ---------------------------------------------------------------------------
// Micro-kernel and epilogue.

// Where one MR x NR tile goes.
struct Tile {
  void* c;               // C at the tile's first element (bf16 or float)
  int64_t ldc;
  bool c_float;
  float beta;
  const bf16* bias;      // at the tile's first column, or null
  bool relu;
  int rows, cols;        // valid part of the tile
  float* partial;        // the tile's float sums between K blocks (row stride ld_partial)
  int64_t ld_partial;
  bool first, last;      // K block: first (start from zero), last (finish into C)
};

// 16 bf16 (n of them, the rest zero) widened to float
DDETR_AVX512BF16_INLINE __m512 load_bf16(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Columns [16 v, 16 v + 16) of row i of the tile (`mask`: those in C), from their sums
// x: beta * C, bias, ReLU, rounding, store.
DDETR_AVX512BF16_INLINE void finish_vector(__m512 x, const Tile& t, int i, int v,
                                           __mmask16 mask, __m512 bias) {
  const int64_t at = i * t.ldc + 16 * v;
  if (t.beta != 0.f) {
    const __m512 old = t.c_float ? _mm512_maskz_loadu_ps(mask, static_cast<float*>(t.c) + at)
                                 : load_bf16(static_cast<bf16*>(t.c) + at, mask);
    x = _mm512_fmadd_ps(_mm512_set1_ps(t.beta), old, x);
  }
  if (t.bias) x = _mm512_add_ps(x, bias);
  if (t.relu) x = _mm512_max_ps(x, _mm512_setzero_ps());  // NaN -> 0, as !(x > 0) -> 0
  if (t.c_float)
    _mm512_mask_storeu_ps(static_cast<float*>(t.c) + at, mask, x);
  else
    _mm256_mask_storeu_epi16(static_cast<bf16*>(t.c) + at, mask,
                             (__m256i)_mm512_cvtneps_pbh(x));
}

// The tile's column masks and bias vectors.
template <int NV>
DDETR_AVX512BF16_INLINE void tile_columns(const Tile& t, __mmask16 (&mask)[NV],
                                          __m512 (&bias)[NV]) {
  for (int v = 0; v < NV; ++v) {
    mask[v] = first_bits16(t.cols - 16 * v);
    bias[v] = t.bias ? load_bf16(t.bias + 16 * v, mask[v]) : _mm512_setzero_ps();
  }
}

template <int MR, int NV>
DDETR_AVX512BF16_INLINE void finish_tile(__m512 (&acc)[MR][NV], const Tile& t) {
  __mmask16 mask[NV];
  __m512 bias[NV];
  tile_columns<NV>(t, mask, bias);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i >= t.rows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) finish_vector(acc[i][v], t, i, v, mask[v], bias[v]);
  }
}

// One MR x (16 NV) tile over `pairs` K pairs of the packed a (kMr words a pair, of which
// the first MR are used) and b (kNr words a pair, the first 16 NV).
template <int MR, int NV>
DDETR_AVX512BF16 void micro_kernel(int64_t pairs, const uint32_t* a, const uint32_t* b,
                                   const Tile& t) {
  if (t.last) {  // the tile's rows of C, on their way in while the sums run
    const int64_t esize = t.c_float ? 4 : 2, bytes = esize * t.cols;
    for (int i = 0; i < t.rows; ++i) {
      const char* row = static_cast<const char*>(t.c) + i * t.ldc * esize;
      for (int64_t at = 0; at < bytes + 63; at += 64)
        __builtin_prefetch(row + std::min(at, bytes - 1), 1, 3);
    }
  }
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = t.first ? _mm512_setzero_ps()
                          : _mm512_load_ps(t.partial + i * t.ld_partial + 16 * v);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_si512(b + p * kNr + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(int(a[p * kMr + i]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  if (t.last) {
    finish_tile<MR, NV>(acc, t);
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      _mm512_store_ps(t.partial + i * t.ld_partial + 16 * v, acc[i][v]);
}

// The tile with the fewest rows and vectors that covers it: a skinny GEMM (M = 1 or
// N = 1: the gradients of the per-head value bias) would otherwise spend 14 or 32
// times the work on padding, in one long chain of dependent dot products.
template <int NV>
DDETR_AVX512BF16 void narrow_kernel(int64_t pairs, const uint32_t* a, const uint32_t* b,
                                    const Tile& t) {
  if (t.rows == 1) return micro_kernel<1, NV>(pairs, a, b, t);
  if (t.rows <= 2) return micro_kernel<2, NV>(pairs, a, b, t);
  if (t.rows <= 4) return micro_kernel<4, NV>(pairs, a, b, t);
  if (t.rows <= 8) return micro_kernel<8, NV>(pairs, a, b, t);
  micro_kernel<kMr, NV>(pairs, a, b, t);
}

DDETR_AVX512BF16 void any_kernel(int64_t pairs, const uint32_t* a, const uint32_t* b,
                                 const Tile& t) {
  if (t.rows == kMr && t.cols > 16) return micro_kernel<kMr, kNv>(pairs, a, b, t);
  if (t.cols <= 16) return narrow_kernel<1>(pairs, a, b, t);
  narrow_kernel<kNv>(pairs, a, b, t);
}

// The AVX512-BF16 kernel as the driver below sees it.
struct Avx512Kernel {
  static constexpr int kRows = kMr;
  static constexpr int64_t kPairAlign = 1;
  static void begin() {}
  static void end() {}
  DDETR_AVX512BF16 static void pack(const GemmArgs& g, int64_t m0, int rows, int64_t k0,
                                    int64_t kc, int64_t /*pair_rows*/, uint32_t* out) {
    pack_a(g, m0, rows, k0, kc, out);
  }
  DDETR_AVX512BF16 static void run(int64_t pair_rows, const uint32_t* a, const uint32_t* b,
                                   const Tile& t) {
    any_kernel(pair_rows, a, b, t);
  }
};

// ---------------------------------------------------------------------------
// AMX path. TDPBF16PS multiplies tiles: C (16 rows x 16 floats) += A (16 rows x 16 bf16
// pairs) B (16 pair rows x 16 columns of pairs), each float of C taking, pair after pair
// in k order, a[2k] b[2k] and a[2k + 1] b[2k + 1] (denormal inputs read as zero,
// denormal results flushed, as VDPBF16PS). A micro-tile is 32 x 32: tiles 0-3 hold C
// (rows 16 (c / 2), columns 16 (c % 2)), 4 and 5 the two 16-row halves of the A panel, 6
// and 7 the two 16-column halves of the B panel. The B panel is the AVX512-BF16 kernel's
// (pair p of its 32 columns at words [32 p, 32 p + 32)), its pairs padded with zeros to
// a multiple of 16, so a B tile is 16 consecutive pairs read 128 bytes apart. The A panel
// is 32 rows of `pair_rows` words (row-major, rows and pairs past the matrix zero). Sums
// between K blocks wait in the scratch as with AVX512-BF16 (tile loads and stores of
// it), and the epilogue runs from a 32 x 32 float copy of the tiles with the same
// AVX-512 code, so beta, bias, ReLU and rounding are those of the other kernel.
//
// The tile instructions are behind a Tiles class (ddetr/amx_tiles.h): HardwareTiles
// issues them; EmulatedTiles does the same arithmetic in C++, so every CPU with
// AVX512-BF16 runs and tests the AMX path's packing, blocking and epilogue (kernel
// amx_emulated, slow).

using amx::EmulatedTiles;
#if DDETR_HAVE_AMX_PATH
using amx::HardwareTiles;
#else  // a compiler without AMX: the emulation alone
#define DDETR_TILES DDETR_AVX512BF16
#define DDETR_TILES_INLINE DDETR_AVX512BF16_INLINE
#endif

// Row k0 + k of a (K, M) A, its columns m0 .. m0 + 31 under `cols` (zeros past kc).
// (A function, not a lambda: a lambda does not take its caller's target attribute, so
// a build without -march=native could not inline the intrinsics into it.)
DDETR_AVX512BF16_INLINE __m512i column_block(const bf16* A, int64_t lda, int64_t k0, int64_t kc,
                                             int64_t m0, __mmask32 cols, int64_t k) {
  return k < kc ? _mm512_maskz_loadu_epi16(cols, A + (k0 + k) * lda + m0) : _mm512_setzero_si512();
}

// The A panel: rows [m0, m0 + rows) of op(A), K elements [k0, k0 + kc), as kAmxMr rows
// of pair_rows words (pair p of row r at word r * pair_rows + p).
DDETR_AVX512BF16 void pack_a_rows(const GemmArgs& g, int64_t m0, int rows, int64_t k0,
                                  int64_t kc, int64_t pair_rows, uint32_t* out) {
  const auto* A = static_cast<const bf16*>(g.A);
  if (!g.trans_a) {  // rows of op(A) are rows of A: copied, 32 elements at a time
    for (int r = 0; r < kAmxMr; ++r) {
      bf16* row = reinterpret_cast<bf16*>(out + r * pair_rows);
      const bf16* src = A + (m0 + r) * g.lda + k0;
      for (int64_t k = 0; k < 2 * pair_rows; k += 32) {
        const __mmask32 m = r < rows ? first_bits32(kc - k) : 0;
        _mm512_storeu_si512(row + k, _mm512_maskz_loadu_epi16(m, src + k));
      }
    }
    return;
  }
  // A is (K, M): op(A)'s rows are A's columns. Per pair p, A's rows 2p and 2p + 1 (32
  // columns, those past `rows` zero) interleaved 16 bits at a time give pair p of 16
  // rows of op(A) per vector; 16 pairs of them, transposed as 16 x 16 words, are 16 rows
  // of 16 pairs each
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  const __mmask32 cols = first_bits32(rows);
  for (int64_t p0 = 0; p0 < pair_rows; p0 += kAmxPairs) {
    __m512i v[2][16];
    for (int i = 0; i < 16; ++i) {
      const __m512i x0 = column_block(A, g.lda, k0, kc, m0, cols, 2 * (p0 + i));
      const __m512i x1 = column_block(A, g.lda, k0, kc, m0, cols, 2 * (p0 + i) + 1);
      v[0][i] = _mm512_permutex2var_epi16(x0, lo, x1);  // rows 0-15 of the panel
      v[1][i] = _mm512_permutex2var_epi16(x0, hi, x1);  // rows 16-31
    }
    for (int h = 0; h < 2; ++h) {
      transpose16(v[h]);  // v[h][j]: pairs p0 .. p0 + 15 of row 16 h + j
      for (int j = 0; j < 16; ++j)
        _mm512_storeu_si512(out + (16 * h + j) * pair_rows + p0, v[h][j]);
    }
  }
}

// One 32 x 32 micro-tile over pair_rows (a multiple of 16) pairs of the packed a and b.
template <class Tiles>
DDETR_TILES_INLINE void amx_tile(int64_t pair_rows, const uint32_t* a, const uint32_t* b,
                                 const Tile& t) {
  const int64_t a_stride = pair_rows * 4, b_stride = kNr * 4, p_stride = t.ld_partial * 4;
  const auto partial = [&](int c) {
    return t.partial + 16 * (c / 2) * t.ld_partial + 16 * (c % 2);
  };
  for (int c = 0; c < 4; ++c) {
    if (t.first)
      Tiles::zero(c);
    else
      Tiles::load(c, partial(c), p_stride);
  }
  for (int64_t p = 0; p < pair_rows; p += kAmxPairs) {
    Tiles::load(4, a + p, a_stride);
    Tiles::load(5, a + 16 * pair_rows + p, a_stride);
    Tiles::load(6, b + p * kNr, b_stride);
    Tiles::load(7, b + p * kNr + 16, b_stride);
    for (int c = 0; c < 4; ++c) Tiles::dot_bf16(c);
  }
  if (!t.last) {
    for (int c = 0; c < 4; ++c) Tiles::store(c, partial(c), p_stride);
    return;
  }
  alignas(64) float sums[kAmxMr][kNr];
  for (int c = 0; c < 4; ++c) Tiles::store(c, &sums[16 * (c / 2)][16 * (c % 2)], kNr * 4);
  __mmask16 mask[kNv];
  __m512 bias[kNv];
  tile_columns<kNv>(t, mask, bias);
  for (int i = 0; i < t.rows; ++i)
    for (int v = 0; v < kNv; ++v)
      finish_vector(_mm512_load_ps(&sums[i][16 * v]), t, i, v, mask[v], bias[v]);
}

template <class Tiles>
struct AmxKernel {
  static constexpr int kRows = kAmxMr;
  static constexpr int64_t kPairAlign = kAmxPairs;
  DDETR_TILES static void begin() { Tiles::configure(amx::tile_config()); }
  DDETR_TILES static void end() { Tiles::release(); }
  static void pack(const GemmArgs& g, int64_t m0, int rows, int64_t k0, int64_t kc,
                   int64_t pair_rows, uint32_t* out) {
    pack_a_rows(g, m0, rows, k0, kc, pair_rows, out);
  }
  DDETR_TILES static void run(int64_t pair_rows, const uint32_t* a, const uint32_t* b,
                              const Tile& t) {
    amx_tile<Tiles>(pair_rows, a, b, t);
  }
};

// ---------------------------------------------------------------------------
// Driver: the blocking loops of one thread of the team, for a kernel K (Avx512Kernel or
// AmxKernel): its micro-tile rows, the padding of its packs' pairs, its A packing and
// its micro-kernel, with begin / end around a thread's tiles.

// The pairs each packed row of a K block of kc elements holds for kernel K (its pairs,
// zero-padded to K::kPairAlign).
template <class K>
int64_t pair_rows_of(int64_t kc) {
  return round_up(ceil_div(kc, 2), K::kPairAlign);
}

struct Job {
  const GemmArgs* g;
  bool c_float;
  Blocking bl;
  uint32_t* bpack;  // packed B block (scratch)
  float* partial;   // partial sums between K blocks (scratch): mc rows of round_up(nc, kNr)
};

// Tiles [t0, t1) of one (rows, N, K) block, numbered row panel by row panel (tile t:
// MR-row panel t / npanels, NR-column panel t % npanels); rows [m0, m0 + mc), columns
// [n0, n0 + nc), K [k0, k0 + kc) of block kb.
template <class K>
DDETR_AVX512BF16 void run_tiles(const Job& job, int64_t m0, int64_t mc, int64_t n0, int64_t nc,
                                int64_t k0, int64_t kc, int64_t kb, int64_t t0, int64_t t1) {
  constexpr int MR = K::kRows;
  const GemmArgs& g = *job.g;
  const int64_t pair_rows = pair_rows_of<K>(kc);
  const int64_t npanels = ceil_div(nc, kNr);
  const int64_t esize = job.c_float ? 4 : 2;
  alignas(64) uint32_t apack[MR * (kMaxKc / 2)];
  if (t0 >= t1) return;
  K::begin();
  for (int64_t t = t0; t < t1;) {
    const int64_t i = t / npanels, j_end = std::min(t1, (i + 1) * npanels) - i * npanels;
    const int rows = int(std::min<int64_t>(MR, mc - i * MR));
    K::pack(g, m0 + i * MR, rows, k0, kc, pair_rows, apack);
    const int64_t next_rows = std::min<int64_t>(MR, mc - (i + 1) * MR);
    for (int64_t j = t - i * npanels; j < j_end; ++j, ++t) {
      prefetch_a(g, m0 + (i + 1) * MR, next_rows, k0, kc, j, npanels);
      Tile tile;
      const int64_t m = m0 + i * MR, n = n0 + j * kNr;
      tile.c = static_cast<char*>(g.C) + (m * g.ldc + n) * esize;
      tile.ldc = g.ldc;
      tile.c_float = job.c_float;
      tile.beta = float(g.beta);
      tile.bias = g.bias ? static_cast<const bf16*>(g.bias) + n : nullptr;
      tile.relu = g.relu;
      tile.rows = rows;
      tile.cols = int(std::min<int64_t>(kNr, nc - j * kNr));
      tile.ld_partial = round_up(nc, kNr);
      tile.partial = job.partial + i * MR * tile.ld_partial + j * kNr;
      tile.first = kb == 0;
      tile.last = kb == job.bl.nk - 1;
      K::run(pair_rows, apack, job.bpack + j * pair_rows * kNr, tile);
    }
  }
  K::end();
}

template <class K>
DDETR_AVX512BF16 void team_body(const Job& job) {
  constexpr int MR = K::kRows;
  const GemmArgs& g = *job.g;
  const Blocking& bl = job.bl;
  for (int64_t n0 = 0; n0 < g.N; n0 += bl.nc) {
    const int64_t nc = std::min(bl.nc, g.N - n0), npanels = ceil_div(nc, kNr);
    for (int64_t m0 = 0; m0 < g.M; m0 += bl.mc) {
      const int64_t mc = std::min(bl.mc, g.M - m0), mpanels = ceil_div(mc, MR);
      for (int64_t kb = 0; kb < bl.nk; ++kb) {
        const int64_t k0 = kb * bl.kc, kc = std::min(bl.kc, g.K - k0);
        // one B block serves every row block when K is not split
        if (m0 == 0 || bl.nk > 1) {
#pragma omp barrier
          pack_b_share(g, n0, nc, k0, kc, pair_rows_of<K>(kc), job.bpack);
#pragma omp barrier
        }
        // equal shares of the tiles; a row panel split between two threads is packed by both
        const auto [t0, t1] = thread_slice(mpanels * npanels, 1);
        run_tiles<K>(job, m0, mc, n0, nc, k0, kc, kb, t0, t1);
      }
    }
  }
}

template <class K>
void run_gemm(const GemmArgs& g, bool c_float, int num_threads, float* scratch) {
  Job job;
  job.g = &g;
  job.c_float = c_float;
  job.bl = blocking(g.M, g.N, g.K, K::kRows, K::kPairAlign);
  job.bpack = reinterpret_cast<uint32_t*>(scratch);
  job.partial = scratch + kBWords;
  const int nt = resolve_threads(num_threads, g.M * g.N * g.K, kSerialBelowFlops);
#pragma omp parallel num_threads(nt)
  team_body<K>(job);
}

#endif  // DDETR_HAVE_AVX512_BF16_PATH

constexpr std::pair<const char*, Bf16GemmKernel> kKernelNames[] = {
    {"auto", Bf16GemmKernel::automatic},  {"amx", Bf16GemmKernel::amx},
    {"amx_emulated", Bf16GemmKernel::amx_emulated}, {"avx512", Bf16GemmKernel::avx512},
    {"widen", Bf16GemmKernel::widen}};

Bf16GemmKernel env_choice() {
  const char* env = std::getenv("DDETR_BF16_GEMM");
  const std::string name = env ? env : "";
  if (!name.empty()) {
    const std::optional<Bf16GemmKernel> k = bf16_kernel_named(name);
    if (!k || *k == Bf16GemmKernel::automatic)
      throw std::invalid_argument(
          "DDETR_BF16_GEMM: expected amx, amx_emulated, avx512 or widen, got " + name);
    return *k;
  }
  if (amx_supported()) {
    if (gemm_bf16_agrees(Bf16GemmKernel::amx)) return Bf16GemmKernel::amx;
    std::fprintf(stderr,
                 "ddetr: the AMX bfloat16 GEMM disagreed with the AVX512-BF16 one on a "
                 "check on this CPU; bfloat16 GEMMs run on AVX512-BF16 instead (please "
                 "report this)\n");
  }
  return avx512_bf16_supported() ? Bf16GemmKernel::avx512 : Bf16GemmKernel::widen;
}

}  // namespace

const char* bf16_kernel_name(Bf16GemmKernel kernel) {
  for (const auto& [name, k] : kKernelNames)
    if (k == kernel) return name;
  return "auto";  // (every kernel is in the table)
}

std::optional<Bf16GemmKernel> bf16_kernel_named(const std::string& name) {
  for (const auto& [n, k] : kKernelNames)
    if (name == n) return k;
  return std::nullopt;
}

bool gemm_bf16_agrees(Bf16GemmKernel kernel) {
  // 33 x 47 x 75 with op(A) plain and transposed: a tail in every size of both kernels'
  // micro-tiles and packs; float C, beta 1 and a bias, so the epilogue is in the check
  constexpr int64_t M = 33, N = 47, K = 75;
  std::vector<bf16> a(M * K), b(N * K), bias(N);
  std::vector<float> c0(M * N);
  uint32_t state = 12345;
  const auto next = [&] {  // in [-2, 2), rounded to bf16
    state = state * 1664525u + 1013904223u;
    return to_bf16(float(state >> 8) / float(1 << 24) * 4.f - 2.f);
  };
  for (auto* v : {&a, &b, &bias})
    for (bf16& x : *v) x = next();
  for (float& x : c0) x = to_acc(next());
  std::vector<float> storage(size_t(kGemmBf16ScratchFloats) + 16);
  float* scratch = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
  for (const bool trans_a : {false, true}) {
    std::vector<float> want = c0, got = c0;
    const int64_t lda = trans_a ? M : K;
    GemmArgs g = gemm_args(trans_a, true, M, N, K, a.data(), lda, b.data(), K, 1.0, nullptr,
                           N, bias.data(), false);
    g.C = want.data();
    gemm_bf16(g, true, 1, scratch, Bf16GemmKernel::avx512);
    g.C = got.data();
    gemm_bf16(g, true, 2, scratch, kernel);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float size = std::fabs(c0[m * N + n]) + std::fabs(to_acc(bias[n]));
        for (int64_t k = 0; k < K; ++k)
          size += std::fabs(to_acc(a[trans_a ? k * M + m : m * K + k]) * to_acc(b[n * K + k]));
        if (!(std::fabs(got[m * N + n] - want[m * N + n]) <= 1e-5f * size)) return false;
      }
  }
  return true;
}

bool gemm_bf16_avx512_supported() { return avx512_bf16_supported(); }
bool gemm_bf16_amx_supported() { return amx_supported(); }

Bf16GemmKernel gemm_bf16_default_kernel() {
  static const Bf16GemmKernel k = env_choice();
  return k;
}

bool check_gemm_bf16(const GemmArgs& g, const float* scratch) {
  if (!check_gemm_args(g)) return false;
  if (!scratch) throw std::invalid_argument("gemm_bf16: null scratch");
  return true;
}

void gemm_bf16(const GemmArgs& g, bool c_float, int num_threads, float* scratch,
               Bf16GemmKernel kernel) {
  if (!check_gemm_bf16(g, scratch)) return;
  if (kernel == Bf16GemmKernel::automatic) kernel = gemm_bf16_default_kernel();
  switch (kernel) {
    case Bf16GemmKernel::widen:
      return gemm_bf16_widen(g, c_float, num_threads, scratch);
    case Bf16GemmKernel::amx:
#if DDETR_HAVE_AMX_PATH
      if (amx_supported())
        return run_gemm<AmxKernel<HardwareTiles>>(g, c_float, num_threads, scratch);
#endif
      throw std::runtime_error("gemm_bf16: this CPU (or its operating system) offers no "
                               "AMX-BF16 tiles");
    case Bf16GemmKernel::amx_emulated:
#if DDETR_HAVE_AVX512_BF16_PATH
      if (avx512_bf16_supported())
        return run_gemm<AmxKernel<EmulatedTiles>>(g, c_float, num_threads, scratch);
#endif
      throw std::runtime_error("gemm_bf16: the emulated AMX kernel needs AVX512-BF16, which "
                               "this CPU lacks");
    default:
#if DDETR_HAVE_AVX512_BF16_PATH
      if (avx512_bf16_supported())
        return run_gemm<Avx512Kernel>(g, c_float, num_threads, scratch);
#endif
      throw std::runtime_error("gemm_bf16: this CPU lacks AVX512-BF16");
  }
}

}  // namespace ddetr
