// The part of the layer driver (ddetr/layer_driver.h) that the forward and the backward
// share: what a pass is given (LayerArgs), the context every stage of a pass reads
// (LayerPass), the unit of work of the per-block stages (RowBlock), the workspace
// carver, and the small helpers both passes call.
//
// Rows are tokens t = n * Lq + q (ddetr/layers.h). Per-block stages see the rows
// [r0, r0 + rows) of one image n, r0 counted from the first row of image 0, so a saved
// buffer of (T, cols) elements is read at r0 * cols.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ddetr/dropout.h"
#include "ddetr/layer_ops.h"
#include "ddetr/layers.h"

namespace ddetr {

// One pass's arguments as the entry points of ddetr/layers.h receive them: what
// cpp/layers_cpu.cpp and cuda/layers.cu hand the driver.
template <class T> struct LayerArgs {
  const LayerShape& s;         // sizes and the level table
  const LayerOptions& o;       // training, recompute, dropout probability and seed
  const LayerParams<T>& w;     // the parameters
  const LayerInputs<T>& in;    // x, pos, ref, memory, mask
  const LayerSaved<T>& saved;  // written by a training forward, read by the backward
};

namespace layer_detail {

// Whether T is its own accumulation type (float, double), so Acc<T> buffers can stand in
// for T ones; for bf16 they are rounded into a T copy (to_storage).
template <class T> constexpr bool kAccIsStorage = std::is_same<T, Acc<T>>::value;

// An Acc<T> buffer: `t` itself where Acc<T> is T, else the separate `acc` (bf16).
template <class T> Acc<T>* acc_or(Acc<T>* acc, T* t) {
  if constexpr (kAccIsStorage<T>)
    return t;
  else
    return acc;
}

// Hands out aligned pieces of the workspace; with a null base it only counts bytes.
class Carver {
 public:
  Carver(void* base, size_t align) : base_(static_cast<char*>(base)), align_(align) {}
  template <class T> T* take(int64_t count) {
    used_ = (used_ + align_ - 1) / align_ * align_;
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += size_t(std::max<int64_t>(count, 0)) * sizeof(T);
    return p;
  }
  void* take_bytes(size_t bytes) { return take<char>(int64_t(bytes)); }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t align_;
  size_t used_ = 0;
};

// Sizes used throughout.
struct Dims {
  int64_t N, Lq, S, C, F, M, D, K, B, T;  // K = M*L*P, B = rows per block, T = N*Lq
  Dims(const LayerShape& s, int64_t block_rows)
      : N(s.N), Lq(s.Lq), S(s.msda.S), C(s.C), F(s.F), M(s.msda.M), D(s.msda.D),
        K(s.msda.M * s.msda.L * s.msda.P), B(std::min(s.Lq, block_rows)),
        T(s.N * s.Lq) {}
};

// Rows [r0, r0 + rows) of image n: the unit of work of the per-block stages.
struct RowBlock {
  int64_t n, r0, rows;
};

// The blocks of at most d.B query rows of every image, numbered image by image.
inline int64_t blocks_per_image(const Dims& d) { return (d.Lq + d.B - 1) / d.B; }

inline int64_t block_count(const Dims& d) { return d.N * blocks_per_image(d); }

inline RowBlock block_at(const Dims& d, int64_t i) {
  const int64_t per_image = blocks_per_image(d);
  const int64_t n = i / per_image, q0 = (i % per_image) * d.B;
  return RowBlock{n, n * d.Lq + q0, std::min(d.B, d.Lq - q0)};
}

// Runs fn(block) for every block, in order.
template <class Fn> void for_each_block(const Dims& d, Fn&& fn) {
  for (int64_t i = 0, count = block_count(d); i < count; ++i) fn(block_at(d, i));
}

// The encoder's value input: the memory, or x itself (the dense layer, Lq = S).
template <class T> const T* encoder_values_in(const LayerInputs<T>& in) {
  return in.memory ? in.memory : in.x;
}

// What the deformable attention samples: the encoder's projected values, or the
// decoder's masked memory and map of ones (see ddetr/layer_driver.h).
template <class T> struct ValueMaps {
  const T *value, *memory, *ones;
};

// Everything a pass reads that stays fixed over it, built once by layer_forward /
// layer_backward and handed to every stage: the backend, the caller's arguments, and
// what the stages before the blocks prepared for them.
template <class T, class Ops> struct LayerPass {
  const Ops& ops;              // the backend's primitives (ddetr/layer_ops.h)
  const LayerShape& s;         // sizes and the level table
  const Dims d;                // the sizes used throughout
  const LayerOptions& o;       // training, recompute, dropout probability and seed
  const LayerParams<T>& w;     // the parameters
  const LayerInputs<T>& in;    // x, pos, ref, memory, mask
  const LayerSaved<T>& saved;  // the saved activations (null fields: not kept)
  const ValueMaps<T> maps;     // what the deformable attention samples
  const T* xin;                // (T, C) rows the deformable attention starts from:
                               // x (encoder) or y0 = LN_sa(...) (decoder)

  LayerPass(const Ops& ops_, const LayerArgs<T>& a, const Dims& d_, ValueMaps<T> maps_,
            const T* xin_)
      : ops(ops_), s(a.s), d(d_), o(a.o), w(a.w), in(a.in), saved(a.saved), maps(maps_),
        xin(xin_) {}
  // The same pass on other ops: the forward's per-block ops (Ops::run_blocks).
  LayerPass(const LayerPass& p, const Ops& ops_)
      : ops(ops_), s(p.s), d(p.d), o(p.o), w(p.w), in(p.in), saved(p.saved), maps(p.maps),
        xin(p.xin) {}
};

// Parameter gradients while the backward accumulates them over blocks of rows: in
// Acc<T>, so bf16 layers round each gradient once, at the end, like a single GEMM would.
template <class T> using GradAcc = LayerWeights<Acc<T>*>;

// Gradients of the sampled maps, accumulated in Acc<T> (many samples add into each).
template <class T> struct ValueGrads {
  Acc<T> *value, *memory, *ones;
};

// What the backward writes and accumulates, beside the LayerPass it reads.
template <class T> struct BackwardState {
  const T* grad_out;              // (T, C) gradient of the layer's output
  T* dxin;                        // (T, C) gradient of LayerPass::xin, written by the blocks:
                                  // grad_in.x (encoder) or dy0 (decoder)
  const LayerInputGrads<T>& gi;   // the caller's input gradients (pos, ref, memory may be null)
  GradAcc<T> gw;                  // parameter gradients, accumulated over the blocks
  ValueGrads<T> vg;               // gradients of the sampled maps, zeroed before the blocks
  void* msda_ws;                  // scratch of the blocks' MSDA backward calls
  size_t msda_ws_bytes;
};

// A saved buffer at row r0 (row length `cols`), or the block's workspace piece.
template <class T> T* rows_of(T* saved, int64_t r0, int64_t cols, T* scratch) {
  return saved ? saved + r0 * cols : scratch;
}

// x + pos into `scratch`, or x itself without positions.
template <class T, class Ops>
const T* with_pos(const Ops& ops, int64_t n, const T* x, const T* pos, T* scratch) {
  if (!pos) return x;
  ops.add(n, x, pos, scratch);
  return scratch;
}

inline DropoutArgs drop_args(const LayerOptions& o, DropSite site, int64_t first_row,
                             int64_t n) {
  DropoutArgs a;
  a.n = n;
  a.p = o.training ? o.p : 0.f;
  a.seed = o.seed;
  a.offset = (uint64_t(site) << 40) + uint64_t(first_row);
  return a;
}

inline bool dropping(const LayerOptions& o) { return o.training && o.p > 0.f; }

// A dropout site's mask applied to g (the forward on activations, the backward on their
// gradients: the same mask), into `to` or in place; g itself when nothing drops.
template <class T, class Ops>
const T* dropped(const Ops& ops, const LayerOptions& o, DropSite site, int64_t first_row,
                 int64_t n, const T* g, T* to) {
  if (!dropping(o)) return g;
  ops.dropout(drop_args(o, site, first_row, n), g, to, false);
  return to;
}

inline SamplingArgs sampling_args(const LayerShape& s, int64_t rows) {
  SamplingArgs a;
  a.rows = rows;
  a.M = s.msda.M;
  a.L = s.msda.L;
  a.P = s.msda.P;
  a.ref_dim = s.ref_dim;
  for (int64_t l = 0; l < s.msda.L; ++l) {
    a.level_h[l] = s.msda.level_h[l];
    a.level_w[l] = s.msda.level_w[l];
  }
  return a;
}

// The MSDA shape of one block of rows of one image.
inline MsdaShape block_shape(const LayerShape& s, int64_t rows) {
  MsdaShape ms = s.msda;
  ms.N = 1;
  ms.Lq = rows;
  return ms;
}

// The decoder's sampling shapes: every (query, head) is one query of a one-head MSDA
// over the memory (D = C) or over the ones (D = 1).
inline MsdaShape memory_shape(const LayerShape& s, int64_t rows, int64_t D) {
  MsdaShape ms = block_shape(s, rows * s.msda.M);
  ms.M = 1;
  ms.D = D;
  return ms;
}

// The decoder's saved (T, M) sampling coefficients (after the (T, M, C) samples) at row r0.
template <class T> T* saved_coef(const LayerSaved<T>& saved, const Dims& d, int64_t r0) {
  return saved.smem + d.T * d.M * d.C + r0 * d.M;
}

// The saved buffers a training forward must be given (same rule as layer_saved_sizes).
template <class T> LayerSaved<T> counting_saved(const LayerShape& s, const LayerOptions& o) {
  int64_t sizes[kLayerSavedCount];
  layer_saved_sizes(s, o, sizes);
  T* some = reinterpret_cast<T*>(alignof(T));  // non-null marker, never dereferenced
  LayerSaved<T> saved;
  const auto f = saved.fields();
  for (int i = 0; i < kLayerSavedCount; ++i) *f[i] = o.training && sizes[i] > 0 ? some : nullptr;
  return saved;
}

// What both passes require of their arguments.
template <class T> void check_call(const LayerArgs<T>& a) {
  validate(a.s);
  if (a.s.decoder && !a.in.memory)
    throw std::invalid_argument("layer: a decoder layer needs memory");
  if (!a.in.memory && a.s.msda.S != a.s.Lq)
    throw std::invalid_argument("layer: an encoder layer without memory updates all its S "
                                "tokens (Lq = S); give the memory to update Lq of them");
  if (!a.o.training) return;
  int64_t sizes[kLayerSavedCount];
  layer_saved_sizes(a.s, a.o, sizes);
  LayerSaved<T> saved = a.saved;
  const auto ptrs = saved.fields();
  for (int i = 0; i < kLayerSavedCount; ++i)
    if ((sizes[i] > 0) != (*ptrs[i] != nullptr))
      throw std::invalid_argument("saved activation buffer " + std::to_string(i) +
                                  (sizes[i] > 0 ? " is missing" : " is not expected"));
}

inline void check_workspace(size_t need, size_t given) {
  if (given < need)
    throw std::invalid_argument("workspace: the pass needs " + std::to_string(need) +
                                " bytes, got " + std::to_string(given));
}

// Element counts of the parameters, in LayerWeights order (0: not in this layer).
inline void param_sizes(const LayerShape& s, int64_t sizes[LayerParams<float>::kCount]) {
  const int64_t C = s.C, F = s.F, K3 = 3 * s.msda.M * s.msda.L * s.msda.P;
  const int64_t sa = s.decoder ? 1 : 0;
  const int64_t all[LayerParams<float>::kCount] = {
      sa * 3 * C * C, sa * 3 * C, sa * C * C, sa * C, sa * C, sa * C,  // self-attention
      C * C, C, K3 * C, K3, C * C, C, C, C,                           // deformable attention
      F * C, F, C * F, C, C, C};                                      // FFN
  std::copy(all, all + LayerParams<float>::kCount, sizes);
}

// n accumulated values x in the storage type: for bf16 rounded into `out`; for float
// and double x itself, since the driver accumulates those in their outputs (`out` is x
// or unused).
template <class T, class Ops>
const T* storage_copy(const Ops& ops, int64_t n, const Acc<T>* x, T* out) {
  if constexpr (kAccIsStorage<T>) {
    (void)ops;
    (void)out;
    return x;
  } else {
    ops.to_storage(n, x, out);
    return out;
  }
}

// The decoder's masked memory and map of ones (see ddetr/layer_driver.h).
template <class T, class Ops>
ValueMaps<T> memory_maps(const Ops& ops, const Dims& d, const LayerInputs<T>& in, T* memory,
                         T* ones) {
  const int64_t rows = d.N * d.S;
  ops.fill(rows, Acc<T>(1), ones);
  if (!in.mask) return {nullptr, in.memory, ones};
  ops.copy_rows(rows, d.C, in.memory, d.C, memory, d.C);
  ops.mask_rows(rows, d.C, in.mask, memory);
  ops.mask_rows(rows, 1, in.mask, ones);
  return {nullptr, memory, ones};
}

// Image n's attention probabilities softmax(Q_m K_m^T / sqrt(D)), (M, Lq, Lq), from its
// rows of qkv (Q_m is columns [m D, m D + D) of the Q block); the scores stay in Acc<T>
// (`scores`, for bf16) until the softmax. The forward runs it, and the backward again
// when the probabilities were not kept (recompute).
template <class T, class Ops>
void attention_probs(const Ops& ops, const Dims& d, const T* qkv_n, const Acc<T>* bias,
                     Acc<T>* scores, T* probs) {
  const int64_t C3 = 3 * d.C, LL = d.Lq * d.Lq;
  Acc<T>* sc = acc_or(scores, probs);
  // with a bias (0 or -inf per query pair) every head's scores start from it and the
  // GEMM adds Q K^T (beta 1); the softmax's scale keeps -inf at -inf
  if (bias)
    for (int64_t m = 0; m < d.M; ++m) ops.copy_rows(d.Lq, d.Lq, bias, d.Lq, sc + m * LL, d.Lq);
  ops.gemm_batched(false, true, d.Lq, d.Lq, d.D, qkv_n, C3, d.D, qkv_n + d.C, C3, d.D,
                   Acc<T>(bias ? 1 : 0), sc, d.Lq, LL, d.M);
  ops.softmax_rows(d.M * d.Lq, d.Lq, Acc<T>(1) / std::sqrt(Acc<T>(d.D)), sc, probs);
}

}  // namespace layer_detail
}  // namespace ddetr
