// CPU kernels of multi-scale deformable attention (layouts in ddetr/msda.h, the
// sampling math in ddetr/bilinear.h).
//
// Forward: out[n, q, m, :] = sum_{l, p} attn * sum_k weight_k * value[row_k, m, :].
//   Threads split the (n, q) pairs (consecutive queries are neighbouring pixels, so
//   a thread's gathers stay in a small window of the value map). Per sample the
//   four corner weights are folded with the attention weight once, then one loop
//   over the D channels does four FMAs per channel; corners off the map point at a
//   row of zeros instead of branching, so that loop has no branch and vectorises.
//
// Backward: per sample, one pass over the channels computes the four corner dot
//   products <grad_out, value_k> and scatters attn * weight_k * grad_out into
//   grad_value; bilinear_backward turns the dots into the location and attention
//   gradients. Threads own whole (n, m) heads: grad_value[n, :, m, :] is written by
//   exactly one thread, which walks its queries in order, so there are no atomics,
//   no private copies of grad_value and the result is bitwise reproducible for any
//   thread count. Corners off the map scatter into a per-thread dummy row.
//
// D is a template argument for the common head sizes so the channel loops have a
// constant trip count; other sizes take the runtime-D instantiation.
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ddetr/bilinear.h"
#include "ddetr/msda.h"

namespace ddetr {
namespace {

// Below this many samples a call takes microseconds and waking a thread team costs
// more than it saves (and on a loaded machine a spinning OpenMP worker can hold the
// core the caller needs for a whole scheduler slice).
constexpr int64_t kSerialBelowSamples = 8192;

int resolve_threads(int requested, int64_t samples) {
#ifdef _OPENMP
  if (samples < kSerialBelowSamples) return 1;
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  (void)samples;
  return 1;
#endif
}

template <class T> struct Sample {
  const Acc<T>* loc;   // (x, y) of sample 0 of this (n, q, m), then the next ones
  const Acc<T>* attn;  // attention weight of sample 0
};

template <class T, int DC>
void forward_query(const MsdaShape& s, const T* value_nm, Sample<T> smp, const T* zero_row,
                   Acc<T>* acc, T* out) {
  using A = Acc<T>;
  const int64_t D = DC ? DC : s.D;
  const int64_t row_stride = s.M * s.D;  // value rows are (S, M, D): a pixel step is M*D
  for (int64_t c = 0; c < D; ++c) acc[c] = A(0);
  int64_t i = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const T* level = value_nm + s.level_start[l] * row_stride;
    for (int64_t p = 0; p < s.P; ++p, ++i) {
      Bilinear<A> b;
      if (!bilinear_setup(smp.loc[2 * i], smp.loc[2 * i + 1], s.level_h[l], s.level_w[l], b))
        continue;
      const A a = smp.attn[i];
      const T* v[4];
      A w[4];
      for (int k = 0; k < 4; ++k) {
        v[k] = b.pixel[k] >= 0 ? level + b.pixel[k] * row_stride : zero_row;
        w[k] = a * b.weight[k];
      }
#pragma omp simd
      for (int64_t c = 0; c < D; ++c)
        acc[c] += w[0] * to_acc(v[0][c]) + w[1] * to_acc(v[1][c]) + w[2] * to_acc(v[2][c]) +
                  w[3] * to_acc(v[3][c]);
    }
  }
  for (int64_t c = 0; c < D; ++c) out[c] = from_acc<T>(acc[c]);
}

template <class T, int DC>
void forward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn, T* out,
             int threads) {
  const int64_t samples = s.L * s.P;  // per (n, q, m)
  const int64_t pairs = s.N * s.Lq;
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc<T>> acc(s.D);
    std::vector<T> zero_row(s.D, from_acc<T>(Acc<T>(0)));
#pragma omp for schedule(static)
    for (int64_t nq = 0; nq < pairs; ++nq) {
      const int64_t n = nq / s.Lq;
      for (int64_t m = 0; m < s.M; ++m) {
        const int64_t nqm = nq * s.M + m;
        const Sample<T> smp{loc + 2 * nqm * samples, attn + nqm * samples};
        forward_query<T, DC>(s, value + (n * s.S * s.M + m) * s.D, smp, zero_row.data(),
                             acc.data(), out + nqm * s.D);
      }
    }
  }
}

template <class T> struct BackwardBuffers {
  const T* value_nm;      // value[n, 0, m, :]
  Acc<T>* grad_value_nm;  // grad_value[n, 0, m, :]
  const T* zero_row;      // D zeros, read for corners off the map
  Acc<T>* dummy_rows;     // 4 x D scratch, written for corners off the map
  Acc<T>* g;              // D: grad_out row in the accumulation type
};

// All samples of one (n, q, m): reads grad_out row `g`, writes grad_value and the
// L*P location/attention gradients.
template <class T, int DC>
void backward_query(const MsdaShape& s, const BackwardBuffers<T>& buf, Sample<T> smp,
                    Acc<T>* grad_loc, Acc<T>* grad_attn) {
  using A = Acc<T>;
  const int64_t D = DC ? DC : s.D;
  const int64_t row_stride = s.M * s.D;
  const A* g = buf.g;
  int64_t i = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const T* level = buf.value_nm + s.level_start[l] * row_stride;
    A* grad_level = buf.grad_value_nm + s.level_start[l] * row_stride;
    for (int64_t p = 0; p < s.P; ++p, ++i) {
      Bilinear<A> b;
      const A x = smp.loc[2 * i], y = smp.loc[2 * i + 1];
      if (!bilinear_setup(x, y, s.level_h[l], s.level_w[l], b)) {
        grad_attn[i] = grad_loc[2 * i] = grad_loc[2 * i + 1] = A(0);
        continue;
      }
      const A a = smp.attn[i];
      const T* v[4];
      A* gv[4];
      A w[4];
      for (int k = 0; k < 4; ++k) {
        const bool on_map = b.pixel[k] >= 0;
        v[k] = on_map ? level + b.pixel[k] * row_stride : buf.zero_row;
        gv[k] = on_map ? grad_level + b.pixel[k] * row_stride : buf.dummy_rows + k * s.D;
        w[k] = a * b.weight[k];
      }
      A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t c = 0; c < D; ++c) {
        const A gc = g[c];
        d0 += gc * to_acc(v[0][c]);
        d1 += gc * to_acc(v[1][c]);
        d2 += gc * to_acc(v[2][c]);
        d3 += gc * to_acc(v[3][c]);
        gv[0][c] += w[0] * gc;
        gv[1][c] += w[1] * gc;
        gv[2][c] += w[2] * gc;
        gv[3][c] += w[3] * gc;
      }
      const A dot[4] = {d0, d1, d2, d3};
      const SampleGrad<A> sg = bilinear_backward(b, dot, a, s.level_h[l], s.level_w[l]);
      grad_attn[i] = sg.attn;
      grad_loc[2 * i] = sg.x;
      grad_loc[2 * i + 1] = sg.y;
    }
  }
}

template <class T, int DC>
void backward(const MsdaShape& s, const T* value, const Acc<T>* loc, const Acc<T>* attn,
              const T* grad_out, Acc<T>* grad_value, Acc<T>* grad_loc, Acc<T>* grad_attn,
              int threads) {
  const int64_t samples = s.L * s.P;
  const int64_t heads = s.N * s.M;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> zero_row(s.D, from_acc<T>(Acc<T>(0)));
    std::vector<Acc<T>> scratch(5 * s.D);  // 4 dummy rows + the grad_out row
    BackwardBuffers<T> buf{nullptr, nullptr, zero_row.data(), scratch.data(),
                           scratch.data() + 4 * s.D};
    // Whole heads per thread: see the file comment for why this is race-free.
#pragma omp for schedule(dynamic, 1)
    for (int64_t nm = 0; nm < heads; ++nm) {
      const int64_t n = nm / s.M, m = nm % s.M;
      buf.value_nm = value + (n * s.S * s.M + m) * s.D;
      buf.grad_value_nm = grad_value + (n * s.S * s.M + m) * s.D;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t nqm = (n * s.Lq + q) * s.M + m;
        const T* go = grad_out + nqm * s.D;
        for (int64_t c = 0; c < s.D; ++c) buf.g[c] = to_acc(go[c]);
        const Sample<T> smp{loc + 2 * nqm * samples, attn + nqm * samples};
        backward_query<T, DC>(s, buf, smp, grad_loc + 2 * nqm * samples,
                              grad_attn + nqm * samples);
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

template <class T>
void msda_forward_cpu(const MsdaShape& s, const T* value, const Acc<T>* loc,
                      const Acc<T>* attn, T* out, int num_threads) {
  validate(s);
  if (s.N * s.Lq * s.M * s.D == 0) return;
  with_head_size(s.D, [&](auto dc) {
    const int threads = resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P);
    forward<T, decltype(dc)::value>(s, value, loc, attn, out, threads);
  });
}

template <class T>
void msda_backward_cpu(const MsdaShape& s, const T* value, const Acc<T>* loc,
                       const Acc<T>* attn, const T* grad_out, Acc<T>* grad_value,
                       Acc<T>* grad_loc, Acc<T>* grad_attn, int num_threads) {
  validate(s);
  if (s.N * s.Lq * s.M == 0) return;
  with_head_size(s.D, [&](auto dc) {
    const int threads = resolve_threads(num_threads, s.N * s.Lq * s.M * s.L * s.P);
    backward<T, decltype(dc)::value>(s, value, loc, attn, grad_out, grad_value, grad_loc,
                                     grad_attn, threads);
  });
}

#define DDETR_INSTANTIATE(T)                                                             \
  template void msda_forward_cpu<T>(const MsdaShape&, const T*, const Acc<T>*,           \
                                    const Acc<T>*, T*, int);                              \
  template void msda_backward_cpu<T>(const MsdaShape&, const T*, const Acc<T>*,          \
                                     const Acc<T>*, const T*, Acc<T>*, Acc<T>*, Acc<T>*, \
                                     int);
DDETR_INSTANTIATE(float)
DDETR_INSTANTIATE(double)
DDETR_INSTANTIATE(bf16)
#undef DDETR_INSTANTIATE

}  // namespace ddetr
