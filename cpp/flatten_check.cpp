// The level table of the flattening contract: built and checked once, shared by
// every backend (layouts and math in ddetr/flatten.h).
#include <stdexcept>
#include <string>

#include "ddetr/flatten.h"

namespace ddetr {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

}  // namespace

FlattenShape make_flatten_shape(int64_t N, int64_t C, int64_t L, const int64_t* level_h,
                                const int64_t* level_w) {
  if (N < 0) fail("N (batch) must be >= 0, got " + std::to_string(N));
  if (C < 0) fail("C (channels) must be >= 0, got " + std::to_string(C));
  if (L < 1 || L > kMaxLevels)
    fail("the pyramid must have between 1 and " + std::to_string(kMaxLevels) +
         " levels, got " + std::to_string(L));
  FlattenShape s;
  s.N = N;
  s.C = C;
  s.L = L;
  for (int64_t l = 0; l < L; ++l) {
    if (level_h[l] < 1 || level_w[l] < 1)
      fail("level " + std::to_string(l) + " has size (" + std::to_string(level_h[l]) + ", " +
           std::to_string(level_w[l]) + "); every H and W must be >= 1");
    s.level_h[l] = level_h[l];
    s.level_w[l] = level_w[l];
    s.level_start[l] = s.S;
    s.S += level_h[l] * level_w[l];
  }
  return s;
}

int64_t flatten_token_blocks(const FlattenShape& s, int64_t block) {
  int64_t blocks = 0;
  for (int64_t l = 0; l < s.L; ++l) blocks += (s.level_h[l] * s.level_w[l] + block - 1) / block;
  return blocks;
}

size_t flatten_backward_workspace_bytes(const FlattenShape& s, bool with_level_embed,
                                        bool cuda) {
  if (!with_level_embed) return 0;
  const int64_t block = cuda ? kFlattenCudaTileTokens : kFlattenCpuBlockTokens;
  return size_t(s.N * flatten_token_blocks(s, block) * s.C) * sizeof(double);
}

}  // namespace ddetr
