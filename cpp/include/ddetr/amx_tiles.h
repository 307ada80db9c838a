// AMX tiles for the CPU GEMMs (cpp/gemm_bf16.cpp, cpp/gemm_int8.cpp): the CPU check,
// the tile configuration, and the tile operations behind a Tiles class with two
// implementations:
// * HardwareTiles issues the instructions (TILELOADD, TILESTORED, TILEZERO, TDPBF16PS,
//   TDPBSSD);
// * EmulatedTiles does the same arithmetic in plain C++ on thread-local tile registers,
//   so a kernel written against Tiles runs, and is tested, on CPUs without AMX (slow).
// Every kernel here uses one layout of 8 tiles of 16 rows x 64 bytes: 0-3 the C tiles (C
// tile c: rows 16 (c / 2), columns 16 (c % 2) of a 32 x 32 micro-tile), 4 and 5 the two
// 16-row halves of the A panel, 6 and 7 the two 16-column halves of the B panel; dot(c)
// is C tile c += A tile 4 + c / 2 times B tile 6 + c % 2.
//
// Semantics (Intel SDM), per C element, k running over the 64 bytes of an A row:
// * TDPBF16PS: c += a[2k] b[2k], then c += a[2k + 1] b[2k + 1], for each bf16 pair k in
//   order, in float (a product of two bf16 is exact), denormal inputs read as zero,
//   denormal results flushed to zero;
// * TDPBSSD: c += a[4k] b[4k] + ... + a[4k + 3] b[4k + 3], signed int8, int32 wrapping.
//
// A Linux process must ask for the tile state once before the first tile instruction
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); amx_usable() does, with the CPU
// check.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define DDETR_HAVE_AMX_PATH 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
// The target of a kernel written against Tiles (also of its emulation, which issues no
// tile instruction: one function body for both): the AMX units and the AVX-512 of the
// packing and epilogues around them.
#define DDETR_TILES                                                                      \
  __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,"         \
                        "avx512bf16,avx512vnni,avx2,fma")))
#else
#define DDETR_HAVE_AMX_PATH 0
#endif

namespace ddetr {
namespace amx {

enum class Unit { bf16, int8 };

// Whether this CPU has AMX-TILE and the unit (CPUID leaf 7: EDX bit 24 AMX-TILE, 22
// AMX-BF16, 25 AMX-INT8) and the operating system grants this process the tile state
// (asked for once; Linux only). The caller checks the AVX-512 its packing needs.
inline bool amx_usable(Unit unit) {
#if DDETR_HAVE_AMX_PATH && defined(__linux__)
  // CPUID leaf 7's EDX where AMX-TILE is there and the tile state granted, else 0
  static const unsigned edx = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1)) return 0u;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0 ? d : 0u;
  }();
  return unit == Unit::bf16 ? (edx >> 22 & 1) : (edx >> 25 & 1);
#else
  (void)unit;
  return false;
#endif
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile t
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// 8 tiles of 16 rows x 64 bytes
inline const TileConfig& tile_config() {
  static const TileConfig c = [] {
    TileConfig t;
    for (int i = 0; i < 8; ++i) t.colsb[i] = 64, t.rows[i] = 16;
    return t;
  }();
  return c;
}

#if DDETR_HAVE_AMX_PATH
#define DDETR_TILES_INLINE DDETR_TILES __attribute__((always_inline)) inline
// The tile number of an AMX intrinsic is part of the instruction: the switches fold away
// once the calls, whose numbers are constants, are inlined.
#define DDETR_EACH_TILE(t, X) \
  switch (t) {                \
    case 0: X(0); break;      \
    case 1: X(1); break;      \
    case 2: X(2); break;      \
    case 3: X(3); break;      \
    case 4: X(4); break;      \
    case 5: X(5); break;      \
    case 6: X(6); break;      \
    default: X(7); break;     \
  }
struct HardwareTiles {
  DDETR_TILES_INLINE static void configure(const TileConfig& c) { _tile_loadconfig(&c); }
  DDETR_TILES_INLINE static void release() { _tile_release(); }
  DDETR_TILES_INLINE static void zero(int t) {
#define DDETR_X(n) _tile_zero(n)
    DDETR_EACH_TILE(t, DDETR_X)
#undef DDETR_X
  }
  DDETR_TILES_INLINE static void load(int t, const void* p, int64_t stride) {
#define DDETR_X(n) _tile_loadd(n, p, stride)
    DDETR_EACH_TILE(t, DDETR_X)
#undef DDETR_X
  }
  DDETR_TILES_INLINE static void store(int t, void* p, int64_t stride) {
#define DDETR_X(n) _tile_stored(n, p, stride)
    DDETR_EACH_TILE(t, DDETR_X)
#undef DDETR_X
  }
  DDETR_TILES_INLINE static void dot_bf16(int c) {
    switch (c) {
      case 0: _tile_dpbf16ps(0, 4, 6); break;
      case 1: _tile_dpbf16ps(1, 4, 7); break;
      case 2: _tile_dpbf16ps(2, 5, 6); break;
      default: _tile_dpbf16ps(3, 5, 7); break;
    }
  }
  DDETR_TILES_INLINE static void dot_int8(int c) {
    switch (c) {
      case 0: _tile_dpbssd(0, 4, 6); break;
      case 1: _tile_dpbssd(1, 4, 7); break;
      case 2: _tile_dpbssd(2, 5, 6); break;
      default: _tile_dpbssd(3, 5, 7); break;
    }
  }
};
#undef DDETR_EACH_TILE
#endif

struct EmulatedTiles {
  struct State {
    TileConfig config;
    alignas(64) unsigned char tile[8][16][64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void configure(const TileConfig& c) {
    state().config = c;
    std::memset(state().tile, 0, sizeof(state().tile));
  }
  static void release() {}
  static void zero(int t) { std::memset(state().tile[t], 0, sizeof(state().tile[t])); }
  static void load(int t, const void* p, int64_t stride) {
    State& s = state();
    zero(t);
    for (int r = 0; r < s.config.rows[t]; ++r)
      std::memcpy(s.tile[t][r], static_cast<const char*>(p) + r * stride, s.config.colsb[t]);
  }
  static void store(int t, void* p, int64_t stride) {
    State& s = state();
    for (int r = 0; r < s.config.rows[t]; ++r)
      std::memcpy(static_cast<char*>(p) + r * stride, s.tile[t][r], s.config.colsb[t]);
  }
  static void dot_bf16(int c) {
    State& s = state();
    const int a = 4 + c / 2, b = 6 + c % 2;
    for (int m = 0; m < s.config.rows[c]; ++m)
      for (int n = 0; n < s.config.colsb[c] / 4; ++n) {
        float acc;
        std::memcpy(&acc, &s.tile[c][m][4 * n], 4);
        for (int k = 0; k < s.config.colsb[a] / 4; ++k)
          for (int h = 0; h < 2; ++h) {
            uint16_t x, y;
            std::memcpy(&x, &s.tile[a][m][4 * k + 2 * h], 2);
            std::memcpy(&y, &s.tile[b][k][4 * n + 2 * h], 2);
            acc = flush(acc + bf16_value(x) * bf16_value(y));
          }
        std::memcpy(&s.tile[c][m][4 * n], &acc, 4);
      }
  }
  static void dot_int8(int c) {
    State& s = state();
    const int a = 4 + c / 2, b = 6 + c % 2;
    for (int m = 0; m < s.config.rows[c]; ++m)
      for (int n = 0; n < s.config.colsb[c] / 4; ++n) {
        int32_t acc;
        std::memcpy(&acc, &s.tile[c][m][4 * n], 4);
        uint32_t sum = uint32_t(acc);  // wraps, as the instruction
        for (int k = 0; k < s.config.colsb[a] / 4; ++k)
          for (int h = 0; h < 4; ++h)
            sum += uint32_t(int32_t(int8_t(s.tile[a][m][4 * k + h])) *
                            int32_t(int8_t(s.tile[b][k][4 * n + h])));
        acc = int32_t(sum);
        std::memcpy(&s.tile[c][m][4 * n], &acc, 4);
      }
  }

 private:
  // a float denormal flushed to a zero of its sign
  static float flush(float x) {
    return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x;
  }
  static float bf16_value(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return flush(f);
  }
};

}  // namespace amx
}  // namespace ddetr
