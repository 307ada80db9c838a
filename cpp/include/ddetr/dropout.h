// Dropout with a counter-based generator, so a backward regenerates the forward's mask
// from (seed, offset) instead of storing it.
//
// Random bits: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011). Element i takes word (i mod 4) of the block
//   philox(counter = (lo(i / 4), hi(i / 4), lo(offset), hi(offset)), key = (lo(seed), hi(seed))),
// so the mask of an element depends only on (seed, offset, i): the same on every
// device, thread count and chunking. An element is kept when its 32-bit word is at
// least threshold = round(p * 2^32) (probability 1 - p, to within 2^-32), and a kept
// element is scaled by 1 / (1 - p); p = 1 drops everything.
//
// The ops (T = float, double, bfloat16; CUDA adds float16; arithmetic in Acc<T>):
//   dropout:               out[i] = keep(i) ? x[i] * scale : 0
//                          (its backward is the same op on the gradient, same seed)
//   relu_dropout:          out[i] = keep(i) && x[i] > 0 ? x[i] * scale : 0
//   relu_dropout_backward: grad_x[i] = out[i] > 0 ? grad_out[i] * scale : 0
//                          (out > 0 exactly where x > 0 and the element was kept, so
//                          the backward needs the output only, no mask and no input)
#pragma once

#include <cstdint>

#include "ddetr/core.h"

namespace ddetr {

struct DropoutArgs {
  int64_t n = 0;        // elements
  float p = 0.f;        // drop probability in [0, 1]
  uint64_t seed = 0;    // Philox key
  uint64_t offset = 0;  // high half of the Philox counter
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key increments

struct Philox4 {
  uint32_t w[4];
};

DDETR_HD Philox4 philox4x32_10(uint64_t block, uint64_t offset, uint64_t seed) {
  uint32_t c0 = uint32_t(block), c1 = uint32_t(block >> 32);
  uint32_t c2 = uint32_t(offset), c3 = uint32_t(offset >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0;
    const uint64_t p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = uint32_t(p1);
    c2 = n2;
    c3 = uint32_t(p0);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// Words below the threshold are dropped; drop_all for p >= 1 (2^32 does not fit).
struct KeepRule {
  uint32_t threshold;
  bool drop_all;
  float scale;
};

DDETR_HD KeepRule keep_rule(float p) {
  if (!(p < 1.f)) return {0u, true, 0.f};
  const double t = double(p) * 4294967296.0 + 0.5;
  return {t >= 4294967295.0 ? 4294967295u : uint32_t(t), false, 1.f / (1.f - p)};
}

void validate_dropout(const DropoutArgs& a);

// CPU (cpp/dropout_cpu.cpp): `out` may alias `x`.
template <class T> void dropout_cpu(const DropoutArgs& a, const T* x, T* out, bool relu,
                                    int num_threads);
template <class T> void relu_dropout_backward_cpu(const DropoutArgs& a, const T* out,
                                                  const T* grad_out, T* grad_x,
                                                  int num_threads);

// CUDA (cuda/dropout.cu), on `stream` (a cudaStream_t as an integer).
void dropout_cuda(DType dtype, const DropoutArgs& a, const void* x, void* out, bool relu,
                  int device, uintptr_t stream);
void relu_dropout_backward_cuda(DType dtype, const DropoutArgs& a, const void* out,
                                const void* grad_out, void* grad_x, int device,
                                uintptr_t stream);

}  // namespace ddetr
