// Argument checks of the MSDA contract, shared by every backend.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ddetr/msda.h"

namespace ddetr {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

void check_nonnegative(const char* name, int64_t v) {
  if (v < 0) fail(std::string(name) + " must be >= 0, got " + std::to_string(v));
}

}  // namespace

void validate(const MsdaShape& s) {
  check_nonnegative("N (batch)", s.N);
  check_nonnegative("S (value length)", s.S);
  check_nonnegative("M (heads)", s.M);
  check_nonnegative("D (channels per head)", s.D);
  check_nonnegative("Lq (queries)", s.Lq);
  check_nonnegative("P (points)", s.P);
  if (s.L < 1 || s.L > kMaxLevels)
    fail("spatial_shapes must have between 1 and " + std::to_string(kMaxLevels) +
         " levels, got " + std::to_string(s.L));
  int64_t total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const std::string level = "level " + std::to_string(l);
    if (s.level_h[l] < 1 || s.level_w[l] < 1)
      fail("spatial_shapes: " + level + " has size (" + std::to_string(s.level_h[l]) + ", " +
           std::to_string(s.level_w[l]) + "); every H and W must be >= 1");
    if (s.level_h[l] > INT32_MAX / s.level_w[l])
      fail("spatial_shapes: " + level + " has " + std::to_string(s.level_h[l]) + " x " +
           std::to_string(s.level_w[l]) + " pixels; at most 2^31 - 1 per level are supported");
    if (s.level_start[l] != total)
      fail("level_start_index: " + level + " starts at " + std::to_string(s.level_start[l]) +
           " but the levels before it hold " + std::to_string(total) + " rows");
    total += s.level_h[l] * s.level_w[l];
  }
  if (total != s.S)
    fail("value has " + std::to_string(s.S) + " rows (dim 1) but spatial_shapes sums to " +
         std::to_string(total) + " = sum of H*W");
}

}  // namespace ddetr
