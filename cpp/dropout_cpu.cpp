// CPU dropout kernels (the math is in ddetr/dropout.h).
//
// Layout: flat arrays of n elements. Threads own contiguous ranges of Philox blocks
// (4 elements each); within a range, the bits of kBatch blocks are generated first
// in a loop the compiler vectorises (every block independent), then applied to the
// 4 * kBatch elements in a second vectorised loop. Nothing is allocated and the result
// does not depend on the thread count.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "ddetr/dropout.h"
#include "ddetr/threads.h"

namespace ddetr {
namespace {

constexpr int64_t kBatch = 64;                    // Philox blocks per generation step
constexpr int64_t kSerialBelowElements = 1 << 16; // below: one thread

// With GCC on x86, generate() is compiled for AVX-512, AVX2 and the build's flags, and
// the loader picks the copy the CPU runs: its 32 x 32 -> 64-bit multiplies vectorise to
// 2 lanes with SSE2, so a portable build (DDETR_NATIVE_ARCH=OFF) spent 4% of the native
// encoder layer's forward + backward in it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DDETR_PER_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DDETR_PER_ISA_CLONES
#endif

// The words of blocks [first, first + count) in element order: bits[4 * k + w] is word w
// of block first + k. The ten rounds run on four arrays of 32-bit lanes (the layout
// the compiler vectorises best: the widening multiplies become vpmuludq); this is
// philox4x32_10 of ddetr/dropout.h, unrolled across blocks.
DDETR_PER_ISA_CLONES void generate(const DropoutArgs& a, int64_t first, int64_t count,
                                   uint32_t* bits) {
  uint32_t c0[kBatch], c1[kBatch], c2[kBatch], c3[kBatch];
  const uint32_t lo = uint32_t(uint64_t(first)), hi = uint32_t(uint64_t(first) >> 32);
  for (int64_t k = 0; k < kBatch; ++k) {
    c0[k] = lo + uint32_t(k);
    c1[k] = hi + (c0[k] < lo ? 1u : 0u);  // carry into the high word
    c2[k] = uint32_t(a.offset);
    c3[k] = uint32_t(a.offset >> 32);
  }
  uint32_t k0 = uint32_t(a.seed), k1 = uint32_t(a.seed >> 32);
  for (int round = 0; round < 10; ++round) {
#pragma omp simd
    for (int64_t k = 0; k < kBatch; ++k) {
      const uint64_t p0 = uint64_t(kPhiloxM0) * c0[k];
      const uint64_t p1 = uint64_t(kPhiloxM1) * c2[k];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[k] ^ k0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3[k] ^ k1;
      c0[k] = n0;
      c1[k] = uint32_t(p1);
      c2[k] = n2;
      c3[k] = uint32_t(p0);
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t k = 0; k < count; ++k) {
    bits[4 * k] = c0[k];
    bits[4 * k + 1] = c1[k];
    bits[4 * k + 2] = c2[k];
    bits[4 * k + 3] = c3[k];
  }
}

// out[j] = keep ? x[j] * scale : 0 over one batch (out may alias x).
template <class T, bool kRelu>
void apply(const T* x, T* out, const uint32_t* bits, int64_t len, uint32_t threshold,
           Acc<T> scale) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const Acc<T> v = to_acc(x[j]);
    const bool keep = bits[j] >= threshold && (!kRelu || v > Acc<T>(0));
    out[j] = from_acc<T>(keep ? v * scale : Acc<T>(0));
  }
}

template <class Op>
void for_each_block(const DropoutArgs& a, int num_threads, Op&& op) {
  const int64_t blocks = (a.n + 3) / 4;
  const int threads = resolve_threads(num_threads, a.n, kSerialBelowElements);
#pragma omp parallel for num_threads(threads) DDETR_SHARE_ROWS
  for (int64_t start = 0; start < blocks; start += kBatch) {
    uint32_t bits[4 * kBatch];
    const int64_t count = std::min(kBatch, blocks - start);
    generate(a, start, count, bits);
    const int64_t first = 4 * start, len = std::min(a.n, 4 * (start + count)) - first;
    op(first, len, bits);
  }
}

}  // namespace

void validate_dropout(const DropoutArgs& a) {
  if (a.n < 0) throw std::invalid_argument("dropout: negative element count");
  if (!(a.p >= 0.f && a.p <= 1.f))
    throw std::invalid_argument("dropout: p must lie in [0, 1], got " + std::to_string(a.p));
}

template <class T>
void dropout_cpu(const DropoutArgs& a, const T* x, T* out, bool relu, int num_threads) {
  validate_dropout(a);
  const KeepRule rule = keep_rule(a.p);
  if (rule.drop_all) {
    std::fill(out, out + a.n, from_acc<T>(Acc<T>(0)));
    return;
  }
  const Acc<T> scale = Acc<T>(rule.scale);
  const uint32_t threshold = rule.threshold;
  for_each_block(a, num_threads, [=](int64_t first, int64_t len, const uint32_t* bits) {
    if (relu)
      apply<T, true>(x + first, out + first, bits, len, threshold, scale);
    else
      apply<T, false>(x + first, out + first, bits, len, threshold, scale);
  });
}

template <class T>
void relu_dropout_backward_cpu(const DropoutArgs& a, const T* out, const T* grad_out,
                               T* grad_x, int num_threads) {
  validate_dropout(a);
  const KeepRule rule = keep_rule(a.p);
  const Acc<T> scale = Acc<T>(rule.scale);
  const int threads = resolve_threads(num_threads, a.n, kSerialBelowElements);
#pragma omp parallel for simd num_threads(threads) DDETR_SHARE_ELEMENTS
  for (int64_t i = 0; i < a.n; ++i) {
    // grad_out is read whatever the mask: a read under the condition vectorises only
    // with masked loads (AVX2 and up); this way a portable SSE2 build vectorises it too
    // (it ran scalar, with a mispredicted branch per element: 6x slower)
    const Acc<T> g = to_acc(grad_out[i]);
    grad_x[i] = from_acc<T>(to_acc(out[i]) > Acc<T>(0) ? g * scale : Acc<T>(0));
  }
}

#define DDETR_INSTANTIATE(T)                                                             \
  template void dropout_cpu<T>(const DropoutArgs&, const T*, T*, bool, int);             \
  template void relu_dropout_backward_cpu<T>(const DropoutArgs&, const T*, const T*, T*, \
                                             int);
DDETR_INSTANTIATE(float)
DDETR_INSTANTIATE(double)
DDETR_INSTANTIATE(bf16)
#undef DDETR_INSTANTIATE

}  // namespace ddetr
