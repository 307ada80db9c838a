// The layer forward and backward of ddetr/layers.h, written once over the primitives
// of ddetr/layer_ops.h: cpp/layers_cpu.cpp and cuda/layers.cu instantiate it with their
// Ops. The same carve-up of the workspace serves the byte count (null base) and the
// passes, so the two cannot disagree.
//
// Order of work. Forward: the encoder's value projection over all (N, S) rows, or the
// decoder's masked memory; the decoder's self-attention stage over all its (N, Lq) rows
// (it mixes the queries of one image); then, per block of at most kLayerBlockRows query
// rows of one image, deformable attention, add & norm, FFN, add & norm. Backward: the
// blocks in the same order (weight and bias gradients summed over blocks in that fixed
// order, so results are the same bits on every run), the encoder's value projection
// gradient, then the decoder's self-attention stage.
//
// The decoder samples before it projects. Sampling and the value projection are both
// linear, so for head m
//   msda(mask(memory W_v^T + b_v))_m = smem_m W_v,m^T + coef_m b_v,m
// with smem_m = the head's samples of the masked memory itself (all C channels) and
// coef_m = its samples of a map of ones (0 on padding): bilinear weights times
// attention weights, summed. With Lq = 300 queries this costs Lq * M * C * D
// multiply-adds instead of projecting all S memory tokens (S * C * C), about 70x fewer
// at the standard shape, and saves (Lq, M, C + 1) instead of (S, C) values.
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

// Runs fn(n, r0, rows) for every block of at most B query rows of every image, in order.
template <class Fn> void for_each_block(int64_t N, int64_t Lq, int64_t B, Fn&& fn) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q0 = 0; q0 < Lq; q0 += B) fn(n, n * Lq + q0, std::min(B, Lq - q0));
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

// Sizes used throughout.
struct Dims {
  int64_t N, Lq, S, C, F, M, D, K, B, T;  // K = M*L*P, B = rows per block, T = N*Lq
  explicit Dims(const LayerShape& s)
      : N(s.N), Lq(s.Lq), S(s.msda.S), C(s.C), F(s.F), M(s.msda.M), D(s.msda.D),
        K(s.msda.M * s.msda.L * s.msda.P), B(std::min(s.Lq, kLayerBlockRows)),
        T(s.N * s.Lq) {}
};

// Workspace of the per-block part of the forward.
template <class T> struct BlockForward {
  T *q, *raw, *sampled, *a, *y1, *hidden, *smem, *coef;
  Acc<T> *loc, *attn;
  BlockForward(Carver& ws, const Dims& d, const LayerSaved<T>& saved, bool decoder) {
    const int64_t k = decoder && !saved.smem ? 1 : 0;
    smem = ws.take<T>(k * d.B * d.M * d.C);
    coef = ws.take<T>(k * d.B * d.M);
    q = ws.take<T>(d.B * d.C);
    raw = saved.raw ? nullptr : ws.take<T>(d.B * 3 * d.K);
    loc = ws.take<Acc<T>>(d.B * 2 * d.K);
    attn = ws.take<Acc<T>>(d.B * d.K);
    sampled = saved.sampled ? nullptr : ws.take<T>(d.B * d.C);
    a = ws.take<T>(d.B * d.C);
    y1 = ws.take<T>(d.B * d.C);
    hidden = saved.hidden ? nullptr : ws.take<T>(d.B * d.F);
  }
};

// What the deformable attention samples: the encoder's projected values, or the
// decoder's masked memory and map of ones (see the top of the file).
template <class T> struct ValueMaps {
  const T *value, *memory, *ones;
};

// Parameter gradients while the backward accumulates them over blocks of rows: in
// Acc<T>, so bf16 layers round each gradient once, at the end, like a single GEMM would.
template <class T> using GradAcc = LayerWeights<Acc<T>*>;

// Gradients of the sampled maps, accumulated in Acc<T> (many samples add into each).
template <class T> struct ValueGrads {
  Acc<T> *value, *memory, *ones;
};

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

// Workspace of the decoder's self-attention stage (forward).
template <class T> struct SelfAttnForward {
  T *qk, *qkv, *probs, *pd, *heads, *a, *y0;
  Acc<T>* scores;  // bf16: one image's attention scores in Acc<T>
  SelfAttnForward(Carver& ws, const Dims& d, const LayerSaved<T>& saved, bool on) {
    const int64_t k = on ? 1 : 0;
    scores = kAccIsStorage<T> ? nullptr : ws.take<Acc<T>>(k * d.M * d.Lq * d.Lq);
    qk = ws.take<T>(k * d.T * d.C);
    qkv = saved.qkv ? nullptr : ws.take<T>(k * d.T * 3 * d.C);
    probs = saved.probs ? nullptr : ws.take<T>(k * d.M * d.Lq * d.Lq);
    pd = ws.take<T>(k * d.M * d.Lq * d.Lq);
    heads = saved.sa_heads ? nullptr : ws.take<T>(k * d.T * d.C);
    a = ws.take<T>(k * d.T * d.C);
    y0 = ws.take<T>(k * d.T * d.C);
  }
};

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
template <class T> void check_call(const LayerShape& s, const LayerOptions& o,
                                   LayerSaved<T> saved, const LayerInputs<T>& in) {
  validate(s);
  if (s.decoder && !in.memory) throw std::invalid_argument("layer: a decoder layer needs memory");
  if (!o.training) return;
  int64_t sizes[kLayerSavedCount];
  layer_saved_sizes(s, o, sizes);
  const auto ptrs = saved.fields();
  for (int i = 0; i < kLayerSavedCount; ++i)
    if ((sizes[i] > 0) != (*ptrs[i] != nullptr))
      throw std::invalid_argument("saved activation buffer " + std::to_string(i) +
                                  (sizes[i] > 0 ? " is missing" : " is not expected"));
}

// The decoder's saved (T, M) sampling coefficients (after the (T, M, C) samples) at row r0.
template <class T> T* saved_coef(const LayerSaved<T>& saved, const Dims& d, int64_t r0) {
  return saved.smem + d.T * d.M * d.C + r0 * d.M;
}

// A dropout site's mask applied to g (the forward on activations, the backward on their
// gradients: the same mask), into `to` or in place; g itself when nothing drops.
template <class T, class Ops>
const T* dropped(const Ops& ops, const LayerOptions& o, DropSite site, int64_t first_row,
                 int64_t n, const T* g, T* to) {
  if (!dropping(o)) return g;
  ops.dropout(drop_args(o, site, first_row, n), g, to, false);
  return to;
}

// ---------------------------------------------------------------- forward pieces

// Image n's attention probabilities softmax(Q_m K_m^T / sqrt(D)), (M, Lq, Lq), from its
// rows of qkv (Q_m is columns [m D, m D + D) of the Q block); the scores stay in Acc<T>
// (`scores`, for bf16) until the softmax.
template <class T, class Ops>
void attention_probs(const Ops& ops, const Dims& d, const T* qkv_n, Acc<T>* scores, T* probs) {
  const int64_t C3 = 3 * d.C, LL = d.Lq * d.Lq;
  Acc<T>* sc = acc_or(scores, probs);
  ops.gemm_batched(false, true, d.Lq, d.Lq, d.D, qkv_n, C3, d.D, qkv_n + d.C, C3, d.D,
                   Acc<T>(0), sc, d.Lq, LL, d.M);
  ops.softmax_rows(d.M * d.Lq, d.Lq, Acc<T>(1) / std::sqrt(Acc<T>(d.D)), sc, probs);
}

// Q K V projections, per-head softmax(Q K^T / sqrt(D)), dropout, probs V, out_proj,
// add & norm: y0 (T, C).
template <class T, class Ops>
void self_attention_forward(const Ops& ops, const Dims& d, const LayerOptions& o,
                            const LayerParams<T>& w, const LayerInputs<T>& in,
                            const LayerSaved<T>& saved, const SelfAttnForward<T>& b) {
  const int64_t C = d.C, C3 = 3 * d.C, LL = d.Lq * d.Lq;
  const T* qk = with_pos(ops, d.T * C, in.x, in.pos, b.qk);
  T* qkv = saved.qkv ? saved.qkv : b.qkv;
  // [Q K] from x + pos, V from x; rows of qkv are (Q | K | V), each (M, D)
  ops.gemm(false, true, d.T, 2 * C, C, qk, C, w.in_proj_w, C, Acc<T>(0), qkv, C3, w.in_proj_b,
           false);
  ops.gemm(false, true, d.T, C, C, in.x, C, w.in_proj_w + 2 * C * C, C, Acc<T>(0), qkv + 2 * C,
           C3, w.in_proj_b + 2 * C, false);
  T* heads = saved.sa_heads ? saved.sa_heads : b.heads;
  for (int64_t n = 0; n < d.N; ++n) {
    const T* qkv_n = qkv + n * d.Lq * C3;
    T* probs = saved.probs ? saved.probs + n * d.M * LL : b.probs;
    attention_probs(ops, d, qkv_n, b.scores, probs);
    const T* pd = dropped(ops, o, kDropAttn, n, d.M * LL, probs, b.pd);
    // heads_m (Lq, D) = probs_m V_m, written into columns [m D, m D + D) of heads
    ops.gemm_batched(false, false, d.Lq, d.D, d.Lq, pd, d.Lq, LL, qkv_n + 2 * C, C3, d.D, Acc<T>(0),
                     heads + n * d.Lq * C, C, d.D, d.M);
  }
  ops.gemm(false, true, d.T, C, C, heads, C, w.sa_out_w, C, Acc<T>(0), b.a, C, w.sa_out_b, false);
  dropped(ops, o, kDropSaOut, 0, d.T * C, b.a, b.a);
  ops.add_layernorm(d.T, C, in.x, b.a, w.sa_norm_w, w.sa_norm_b, b.y0, saved.xhat_sa,
                    saved.rstd_sa);
}

// The decoder's sampled values of `rows` queries of image n (see the top of the file):
// smem (rows, M, C), coef (rows, M), sampled (rows, M * D).
template <class T, class Ops>
void sample_memory(const Ops& ops, const LayerShape& s, const Dims& d, const LayerParams<T>& w,
                   const ValueMaps<T>& maps, int64_t n, int64_t rows, const Acc<T>* loc,
                   const Acc<T>* attn, T* smem, T* coef, T* sampled) {
  ops.msda_forward(memory_shape(s, rows, d.C), maps.memory + n * d.S * d.C, loc, attn, smem);
  ops.msda_forward(memory_shape(s, rows, 1), maps.ones + n * d.S, loc, attn, coef);
  // per head: sampled_m (rows, D) = smem_m (rows, C) W_v,m^T + coef_m (rows, 1) b_v,m (1, D)
  ops.gemm_batched(false, true, rows, d.D, d.C, smem, d.M * d.C, d.C, w.value_w, d.C, d.D * d.C,
                   Acc<T>(0), sampled, d.C, d.D, d.M);
  ops.gemm_batched(false, false, rows, d.D, 1, coef, d.M, 1, w.value_b, d.D, d.D, Acc<T>(1), sampled,
                   d.C, d.D, d.M);
}

// Rows [r0, r0 + rows) of image n: deformable attention of xin (+ pos) into the values,
// add & norm, FFN, add & norm, into out.
template <class T, class Ops>
void block_forward(const Ops& ops, const LayerShape& s, const Dims& d, const LayerOptions& o,
                   const LayerParams<T>& w, const LayerInputs<T>& in, const T* xin,
                   const ValueMaps<T>& maps, int64_t n, int64_t r0, int64_t rows, T* out,
                   const LayerSaved<T>& saved, const BlockForward<T>& b) {
  const int64_t C = d.C, K = d.K;
  const T* x = xin + r0 * C;
  const T* q = with_pos(ops, rows * C, x, in.pos ? in.pos + r0 * C : nullptr, b.q);
  T* raw = rows_of(saved.raw, r0, 3 * K, b.raw);
  ops.gemm(false, true, rows, 3 * K, C, q, C, w.oa_w, C, Acc<T>(0), raw, 3 * K, w.oa_b, false);
  ops.sampling_forward(sampling_args(s, rows), raw, in.ref + r0 * s.msda.L * s.ref_dim, b.loc,
                       b.attn);
  T* sampled = rows_of(saved.sampled, r0, C, b.sampled);
  if (s.decoder) {
    T* smem = rows_of(saved.smem, r0, d.M * C, b.smem);
    T* coef = saved.smem ? saved_coef(saved, d, r0) : b.coef;
    sample_memory(ops, s, d, w, maps, n, rows, b.loc, b.attn, smem, coef, sampled);
  } else {
    ops.msda_forward(block_shape(s, rows), maps.value + n * d.S * C, b.loc, b.attn, sampled);
  }
  ops.gemm(false, true, rows, C, C, sampled, C, w.out_w, C, Acc<T>(0), b.a, C, w.out_b, false);
  dropped(ops, o, kDropMsdaOut, r0, rows * C, b.a, b.a);
  ops.add_layernorm(rows, C, x, b.a, w.msda_norm_w, w.msda_norm_b, b.y1,
                    rows_of(saved.xhat_msda, r0, C, static_cast<T*>(nullptr)),
                    rows_of(saved.rstd_msda, r0, 1, static_cast<T*>(nullptr)));
  T* hidden = rows_of(saved.hidden, r0, d.F, b.hidden);
  ops.gemm(false, true, rows, d.F, C, b.y1, C, w.lin1_w, C, Acc<T>(0), hidden, d.F, w.lin1_b, true);
  dropped(ops, o, kDropFfn, r0, rows * d.F, hidden, hidden);
  ops.gemm(false, true, rows, C, d.F, hidden, d.F, w.lin2_w, d.F, Acc<T>(0), b.a, C, w.lin2_b, false);
  dropped(ops, o, kDropFfnOut, r0, rows * C, b.a, b.a);
  ops.add_layernorm(rows, C, b.y1, b.a, w.ffn_norm_w, w.ffn_norm_b, out + r0 * C,
                    rows_of(saved.xhat_ffn, r0, C, static_cast<T*>(nullptr)),
                    rows_of(saved.rstd_ffn, r0, 1, static_cast<T*>(nullptr)));
}

// ---------------------------------------------------------------- backward pieces

template <class T> struct BlockBackward {
  T *g, *df, *y1, *h, *dh, *da, *dsampled, *q, *draw, *dq;
  Acc<T> *loc, *attn, *dloc, *dattn;  // MSDA's sampling locations and weights: Acc<T>
  T *sampled;                         // encoder
  T *dsmem, *dcoef;                   // decoder
  Acc<T> *dloc2, *dattn2;
  BlockBackward(Carver& ws, const Dims& d, const LayerSaved<T>& saved, bool decoder) {
    const int64_t k = decoder ? 1 : 0;
    sampled = saved.sampled ? nullptr : ws.take<T>(d.B * d.C);
    dsmem = ws.take<T>(k * d.B * d.M * d.C);
    dcoef = ws.take<T>(k * d.B * d.M);
    dloc2 = ws.take<Acc<T>>(k * d.B * 2 * d.K);
    dattn2 = ws.take<Acc<T>>(k * d.B * d.K);
    g = ws.take<T>(d.B * d.C);
    df = ws.take<T>(d.B * d.C);
    y1 = ws.take<T>(d.B * d.C);
    h = saved.hidden ? nullptr : ws.take<T>(d.B * d.F);
    dh = ws.take<T>(d.B * d.F);
    da = ws.take<T>(d.B * d.C);
    dsampled = ws.take<T>(d.B * d.C);
    q = ws.take<T>(d.B * d.C);
    loc = ws.take<Acc<T>>(d.B * 2 * d.K);
    attn = ws.take<Acc<T>>(d.B * d.K);
    dloc = ws.take<Acc<T>>(d.B * 2 * d.K);
    dattn = ws.take<Acc<T>>(d.B * d.K);
    draw = ws.take<T>(d.B * 3 * d.K);
    dq = ws.take<T>(d.B * d.C);
  }
};

template <class T> struct SelfAttnBackward {
  T *da, *dheads, *dqkv, *probs, *pd, *dp, *qk, *dqk;
  Acc<T>* scores;  // bf16: one image's attention scores, then their gradient, in Acc<T>
  SelfAttnBackward(Carver& ws, const Dims& d, const LayerSaved<T>& saved, bool on) {
    const int64_t k = on ? 1 : 0;
    scores = kAccIsStorage<T> ? nullptr : ws.take<Acc<T>>(k * d.M * d.Lq * d.Lq);
    da = ws.take<T>(k * d.T * d.C);
    dheads = ws.take<T>(k * d.T * d.C);
    dqkv = ws.take<T>(k * d.T * 3 * d.C);
    probs = saved.probs ? nullptr : ws.take<T>(k * d.M * d.Lq * d.Lq);
    pd = ws.take<T>(k * d.M * d.Lq * d.Lq);
    dp = ws.take<T>(k * d.M * d.Lq * d.Lq);
    qk = ws.take<T>(k * d.T * d.C);
    dqk = ws.take<T>(k * d.T * d.C);
  }
};

// dW (+)= dY^T X and db (+)= column sums of dY, for a linear layer Y = X W^T + b over
// `rows` rows; dX = dY W (+ beta * dX) when dX is given.
template <class T, class Ops>
void linear_backward(const Ops& ops, int64_t rows, int64_t in_f, int64_t out_f, const T* x,
                     int64_t ldx, const T* dy, int64_t lddy, const T* weight, Acc<T>* dw,
                     Acc<T>* db,
                     bool accumulate, T* dx, int64_t lddx, Acc<T> dx_beta) {
  ops.gemm(true, false, out_f, in_f, rows, dy, lddy, x, ldx, Acc<T>(accumulate ? 1 : 0), dw,
           in_f, nullptr, false);
  if (db) ops.column_sums(rows, out_f, dy, db, accumulate);  // dy contiguous here
  if (dx)
    ops.gemm(false, false, rows, in_f, out_f, dy, lddy, weight, in_f, dx_beta, dx, lddx, nullptr,
             false);
}

// LayerNorm backward of rows: dx from dy, and the gamma / beta gradients.
template <class T, class Ops>
void norm_backward(const Ops& ops, int64_t rows, int64_t C, const T* dy, const T* xhat,
                   const T* rstd, const T* gamma, T* dx, Acc<T>* dgamma, Acc<T>* dbeta,
                   bool accumulate) {
  ops.column_dots(rows, C, dy, xhat, dgamma, accumulate);
  ops.column_sums(rows, C, dy, dbeta, accumulate);
  ops.layernorm_backward(rows, C, dy, xhat, rstd, gamma, dx);
}

// Backward of sample_memory: from b.dsampled to the value projection's gradients,
// the memory's gradient (accumulated) and b.dloc / b.dattn.
template <class T, class Ops>
void sample_memory_backward(const Ops& ops, const LayerShape& s, const Dims& d,
                            const LayerParams<T>& w, const ValueMaps<T>& maps,
                            const ValueGrads<T>& vg, const LayerSaved<T>& saved,
                            const GradAcc<T>& gw, int64_t n, int64_t r0, int64_t rows,
                            bool acc, const BlockBackward<T>& b, void* msda_ws,
                            size_t msda_ws_bytes) {
  const int64_t C = d.C, D = d.D, M = d.M;
  const T* smem = saved.smem + r0 * M * C;
  const T* coef = saved_coef(saved, d, r0);
  const Acc<T> beta(acc ? 1 : 0);
  // sampled_m = smem_m W_v,m^T + coef_m b_v,m:
  // dsmem_m = dsampled_m W_v,m, dW_v,m = dsampled_m^T smem_m,
  // dcoef_m = dsampled_m b_v,m^T, db_v,m = coef_m^T dsampled_m
  ops.gemm_batched(false, false, rows, C, D, b.dsampled, C, D, w.value_w, C, D * C, Acc<T>(0),
                   b.dsmem, M * C, C, M);
  ops.gemm_batched(true, false, D, C, rows, b.dsampled, C, D, smem, M * C, C, beta, gw.value_w,
                   C, D * C, M);
  ops.gemm_batched(false, true, rows, 1, D, b.dsampled, C, D, w.value_b, D, D, Acc<T>(0), b.dcoef, M,
                   1, M);
  ops.gemm_batched(true, false, 1, D, rows, coef, M, 1, b.dsampled, C, D, beta, gw.value_b, D,
                   D, M);
  ops.msda_backward(memory_shape(s, rows, C), maps.memory + n * d.S * C, b.loc, b.attn, b.dsmem,
                    vg.memory + n * d.S * C, b.dloc, b.dattn, msda_ws, msda_ws_bytes,
                    static_cast<T*>(nullptr));
  ops.msda_backward(memory_shape(s, rows, 1), maps.ones + n * d.S, b.loc, b.attn, b.dcoef,
                    vg.ones + n * d.S, b.dloc2, b.dattn2, msda_ws, msda_ws_bytes,
                    static_cast<T*>(nullptr));
  ops.add(rows * 2 * d.K, b.dloc, b.dloc2, b.dloc);
  ops.add(rows * d.K, b.dattn, b.dattn2, b.dattn);
}

template <class T, class Ops>
void block_backward(const Ops& ops, const LayerShape& s, const Dims& d, const LayerOptions& o,
                    const LayerParams<T>& w, const LayerInputs<T>& in, const T* xin,
                    const LayerSaved<T>& saved, const T* grad_out, int64_t n, int64_t r0,
                    int64_t rows, T* dxin, const ValueMaps<T>& maps, const ValueGrads<T>& vg,
                    const LayerInputGrads<T>& gi,
                    const GradAcc<T>& gw, bool acc, const BlockBackward<T>& b,
                    void* msda_ws, size_t msda_ws_bytes) {
  const int64_t C = d.C, K = d.K, F = d.F;
  const T* dout = grad_out + r0 * C;
  // out = LN_ffn(y1 + drop_ffn_out(f)): g = d(y1 + drop_ffn_out(f)), then df
  norm_backward(ops, rows, C, dout, saved.xhat_ffn + r0 * C, saved.rstd_ffn + r0, w.ffn_norm_w, b.g,
                gw.ffn_norm_w, gw.ffn_norm_b, acc);
  const T* df = dropped(ops, o, kDropFfnOut, r0, rows * C, b.g, b.df);
  // FFN: f = hidden W_2^T + b_2, hidden = drop(relu(y1 W_1^T + b_1))
  ops.layernorm_apply(rows, C, saved.xhat_msda + r0 * C, w.msda_norm_w, w.msda_norm_b, b.y1);
  T* h = saved.hidden ? saved.hidden + r0 * F : b.h;
  if (!saved.hidden) {
    ops.gemm(false, true, rows, F, C, b.y1, C, w.lin1_w, C, Acc<T>(0), h, F, w.lin1_b, true);
    dropped(ops, o, kDropFfn, r0, rows * F, h, h);
  }
  linear_backward(ops, rows, F, C, h, F, df, C, w.lin2_w, gw.lin2_w, gw.lin2_b, acc, b.dh, F,
                  Acc<T>(0));
  DropoutArgs relu_args = drop_args(o, kDropFfn, r0, rows * F);
  ops.relu_dropout_backward(relu_args, h, b.dh, b.dh);
  // dy1 = g + dh W_1 (the residual and the FFN input)
  linear_backward(ops, rows, C, F, b.y1, C, b.dh, F, w.lin1_w, gw.lin1_w, gw.lin1_b, acc, b.g,
                  C, Acc<T>(1));
  // y1 = LN_msda(x + drop_msda_out(a)): the residual's gradient goes straight to dxin
  T* dx = dxin + r0 * C;
  norm_backward(ops, rows, C, b.g, saved.xhat_msda + r0 * C, saved.rstd_msda + r0, w.msda_norm_w, dx,
                gw.msda_norm_w, gw.msda_norm_b, acc);
  const T* da = dropped(ops, o, kDropMsdaOut, r0, rows * C, dx, b.da);
  // sampled = msda(value, loc, attn): loc and attn recomputed from the saved projection
  const T* raw = saved.raw + r0 * 3 * K;
  const SamplingArgs sa = sampling_args(s, rows);
  const Acc<T>* ref = in.ref + r0 * s.msda.L * s.ref_dim;
  ops.sampling_forward(sa, raw, ref, b.loc, b.attn);
  // a = sampled W_o^T + b_o: dsampled = da W_o first, for the MSDA backward; the encoder's
  // sampled features (not stored) come out of that backward, which gathers the same
  // corners, and only then does dW_o = da^T sampled run
  ops.gemm(false, false, rows, C, C, da, C, w.out_w, C, Acc<T>(0), b.dsampled, C,
           static_cast<const T*>(nullptr), false);
  const T* sampled = saved.sampled ? saved.sampled + r0 * C : b.sampled;
  if (s.decoder)
    sample_memory_backward(ops, s, d, w, maps, vg, saved, gw, n, r0, rows, acc, b, msda_ws,
                           msda_ws_bytes);
  else
    ops.msda_backward(block_shape(s, rows), maps.value + n * d.S * C, b.loc, b.attn,
                      b.dsampled, vg.value + n * d.S * C, b.dloc, b.dattn, msda_ws,
                      msda_ws_bytes, saved.sampled ? static_cast<T*>(nullptr) : b.sampled);
  linear_backward(ops, rows, C, C, sampled, C, da, C, w.out_w, gw.out_w, gw.out_b, acc,
                  static_cast<T*>(nullptr), C, Acc<T>(0));
  const T* q = with_pos(ops, rows * C, xin + r0 * C, in.pos ? in.pos + r0 * C : nullptr, b.q);
  ops.sampling_backward(sa, raw, ref, b.attn, b.dloc, b.dattn, b.draw,
                        gi.ref ? gi.ref + r0 * s.msda.L * s.ref_dim : nullptr);
  // raw = q W_oa^T + b_oa; q = x + pos, so dq is also the gradient of pos
  T* dq = gi.pos ? gi.pos + r0 * C : b.dq;
  linear_backward(ops, rows, C, 3 * K, q, C, b.draw, 3 * K, w.oa_w, gw.oa_w, gw.oa_b, acc, dq, C,
                  Acc<T>(0));
  ops.add(rows * C, dx, dq, dx);
}

// The decoder's self-attention stage backward: dy0 (T, C) in, grads of x and pos out
// (dx written, dpos added to), parameter grads written.
template <class T, class Ops>
void self_attention_backward(const Ops& ops, const Dims& d, const LayerOptions& o,
                             const LayerParams<T>& w, const LayerInputs<T>& in,
                             const LayerSaved<T>& saved, const T* dy0,
                             const LayerInputGrads<T>& gi, const GradAcc<T>& gw,
                             const SelfAttnBackward<T>& b) {
  const int64_t C = d.C, C3 = 3 * d.C, LL = d.Lq * d.Lq;
  const Acc<T> scale = Acc<T>(1) / std::sqrt(Acc<T>(d.D));
  // y0 = LN_sa(x + drop_sa_out(a)): the residual's gradient is dx
  norm_backward(ops, d.T, C, dy0, saved.xhat_sa, saved.rstd_sa, w.sa_norm_w, gi.x, gw.sa_norm_w,
                gw.sa_norm_b, false);
  const T* da = dropped(ops, o, kDropSaOut, 0, d.T * C, gi.x, b.da);
  linear_backward(ops, d.T, C, C, saved.sa_heads, C, da, C, w.sa_out_w, gw.sa_out_w, gw.sa_out_b,
                  false, b.dheads, C, Acc<T>(0));
  for (int64_t n = 0; n < d.N; ++n) {
    const T* qkv_n = saved.qkv + n * d.Lq * C3;
    T* dqkv_n = b.dqkv + n * d.Lq * C3;
    const T* dheads_n = b.dheads + n * d.Lq * C;
    T* probs = saved.probs ? saved.probs + n * d.M * LL : b.probs;
    if (!saved.probs) attention_probs(ops, d, qkv_n, b.scores, probs);
    const T* pd = dropped(ops, o, kDropAttn, n, d.M * LL, probs, b.pd);
    // heads_m = pd_m V_m: dV_m = pd_m^T dheads_m, dpd_m = dheads_m V_m^T
    ops.gemm_batched(true, false, d.Lq, d.D, d.Lq, pd, d.Lq, LL, dheads_n, C, d.D, Acc<T>(0),
                     dqkv_n + 2 * C, C3, d.D, d.M);
    // (dpd in Acc<T> until the softmax backward has taken the row sums off it)
    Acc<T>* dpd = acc_or(b.scores, b.dp);
    ops.gemm_batched(false, true, d.Lq, d.Lq, d.D, dheads_n, C, d.D, qkv_n + 2 * C, C3, d.D,
                     Acc<T>(0), dpd, d.Lq, LL, d.M);
    dropped(ops, o, kDropAttn, n, d.M * LL, dpd, dpd);
    // scores = scale Q K^T: ds = scale * softmax backward; dQ = ds K, dK = ds^T Q
    ops.softmax_rows_backward(d.M * d.Lq, d.Lq, scale, probs, dpd, b.dp);
    ops.gemm_batched(false, false, d.Lq, d.D, d.Lq, b.dp, d.Lq, LL, qkv_n + C, C3, d.D, Acc<T>(0),
                     dqkv_n, C3, d.D, d.M);
    ops.gemm_batched(true, false, d.Lq, d.D, d.Lq, b.dp, d.Lq, LL, qkv_n, C3, d.D, Acc<T>(0),
                     dqkv_n + C, C3, d.D, d.M);
  }
  // [Q K] = qk W_qk^T + b_qk with qk = x + pos; V = x W_v^T + b_v
  const T* qk = with_pos(ops, d.T * C, in.x, in.pos, b.qk);
  ops.column_sums(d.T, C3, b.dqkv, gw.in_proj_b, false);
  linear_backward(ops, d.T, C, 2 * C, qk, C, b.dqkv, C3, w.in_proj_w, gw.in_proj_w,
                  static_cast<Acc<T>*>(nullptr), false, b.dqk, C, Acc<T>(0));
  linear_backward(ops, d.T, C, C, in.x, C, b.dqkv + 2 * C, C3, w.in_proj_w + 2 * C * C,
                  gw.in_proj_w + 2 * C * C, static_cast<Acc<T>*>(nullptr), false, gi.x, C, Acc<T>(1));
  ops.add(d.T * C, gi.x, b.dqk, gi.x);
  if (gi.pos) ops.add(d.T * C, gi.pos, b.dqk, gi.pos);
}

// Everything a pass carves from its workspace, in one order for counting and for use.
template <class T> struct ForwardSpace {
  T *value, *memory, *ones;
  SelfAttnForward<T> sa;
  BlockForward<T> blk;
  ForwardSpace(Carver& ws, const LayerShape& s, const Dims& d, const LayerSaved<T>& saved)
      : value(saved.value || s.decoder ? saved.value : ws.take<T>(d.N * d.S * d.C)),
        memory(ws.take<T>(s.decoder ? d.N * d.S * d.C : 0)),
        ones(ws.take<T>(s.decoder ? d.N * d.S : 0)),
        sa(ws, d, saved, s.decoder),
        blk(ws, d, saved, s.decoder) {}
};

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

template <class T> GradAcc<T> grad_accumulators(Carver& ws, const LayerShape& s) {
  GradAcc<T> g;
  if constexpr (!kAccIsStorage<T>) {
    int64_t sizes[GradAcc<T>::kCount];
    param_sizes(s, sizes);
    const auto f = g.fields();
    for (int i = 0; i < GradAcc<T>::kCount; ++i)
      *f[i] = sizes[i] > 0 ? ws.take<Acc<T>>(sizes[i]) : nullptr;
  }
  return g;
}

template <class T> struct BackwardSpace {
  GradAcc<T> grad_w;  // bf16: the Acc<T> accumulators (float and double use the outputs)
  Acc<T> *dvalue, *dmemory, *dones;
  T *dvalue_t, *memory, *ones, *y0, *dy0;
  void* msda;
  size_t msda_bytes;
  SelfAttnBackward<T> sa;
  BlockBackward<T> blk;
  BackwardSpace(Carver& ws, const LayerShape& s, const Dims& d, const LayerSaved<T>& saved,
                size_t msda_ws_bytes)
      : grad_w(grad_accumulators<T>(ws, s)),
        dvalue(ws.take<Acc<T>>(s.decoder ? 0 : d.N * d.S * d.C)),
        dmemory(ws.take<Acc<T>>(s.decoder ? d.N * d.S * d.C : 0)),
        dones(ws.take<Acc<T>>(s.decoder ? d.N * d.S : 0)),
        dvalue_t(s.decoder || kAccIsStorage<T> ? nullptr : ws.take<T>(d.N * d.S * d.C)),
        memory(ws.take<T>(s.decoder ? d.N * d.S * d.C : 0)),
        ones(ws.take<T>(s.decoder ? d.N * d.S : 0)),
        y0(ws.take<T>(s.decoder ? d.T * d.C : 0)),
        dy0(ws.take<T>(s.decoder ? d.T * d.C : 0)),
        msda(ws.take_bytes(msda_ws_bytes)),
        msda_bytes(msda_ws_bytes),
        sa(ws, d, saved, s.decoder),
        blk(ws, d, saved, s.decoder) {}
};

// Scratch of the block's MSDA backward calls (the largest of them).
template <class Ops> size_t msda_scratch(const Ops& ops, const LayerShape& s, const Dims& d) {
  if (!s.decoder) return ops.msda_backward_workspace_bytes(block_shape(s, d.B));
  return std::max(ops.msda_backward_workspace_bytes(memory_shape(s, d.B, d.C)),
                  ops.msda_backward_workspace_bytes(memory_shape(s, d.B, 1)));
}

// The decoder's masked memory and map of ones (see the top of the file).
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

template <class T, class Ops> size_t workspace_bytes(const Ops& ops, const LayerShape& s,
                                                     const LayerOptions& o, bool backward) {
  const Dims d(s);
  Carver ws(nullptr, Ops::kAlign);
  const LayerSaved<T> saved = counting_saved<T>(s, o);
  if (backward)
    BackwardSpace<T>(ws, s, d, saved, msda_scratch(ops, s, d));
  else
    ForwardSpace<T>(ws, s, d, saved);
  return ws.used();
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

inline void check_workspace(size_t need, size_t given) {
  if (given < need)
    throw std::invalid_argument("workspace: the pass needs " + std::to_string(need) +
                                " bytes, got " + std::to_string(given));
}

}  // namespace layer_detail

// Workspace bytes of a pass of the driver; elem_bytes 2 (bf16), 4 (float) or 8 (double).
template <class Ops>
size_t layer_workspace_bytes(const Ops& ops, const LayerShape& s, const LayerOptions& o,
                             bool backward, int elem_bytes) {
  validate(s);
  if (elem_bytes == 2) return layer_detail::workspace_bytes<bf16>(ops, s, o, backward);
  if (elem_bytes == 4) return layer_detail::workspace_bytes<float>(ops, s, o, backward);
  if (elem_bytes == 8) return layer_detail::workspace_bytes<double>(ops, s, o, backward);
  throw std::invalid_argument("layer: bfloat16, float32 or float64 only");
}

template <class T, class Ops>
void layer_forward(const Ops& ops, const LayerShape& s, const LayerOptions& o,
                   const LayerParams<T>& w, const LayerInputs<T>& in, T* out,
                   const LayerSaved<T>& saved, void* workspace, size_t workspace_bytes) {
  using namespace layer_detail;
  check_call(s, o, saved, in);
  const Dims d(s);
  Carver ws(workspace, Ops::kAlign);
  const ForwardSpace<T> sp(ws, s, d, saved);
  check_workspace(ws.used(), workspace_bytes);
  ValueMaps<T> maps{sp.value, nullptr, nullptr};
  if (s.decoder) {
    maps = memory_maps(ops, d, in, sp.memory, sp.ones);
  } else {  // value = mask(src W_v^T + b_v) over all N * S rows
    ops.gemm(false, true, d.N * d.S, d.C, d.C, in.x, d.C, w.value_w, d.C, Acc<T>(0), sp.value, d.C,
             w.value_b, false);
    if (in.mask) ops.mask_rows(d.N * d.S, d.C, in.mask, sp.value);
  }
  const T* xin = in.x;
  if (s.decoder) {
    self_attention_forward(ops, d, o, w, in, saved, sp.sa);
    xin = sp.sa.y0;
  }
  for_each_block(d.N, d.Lq, d.B, [&](int64_t n, int64_t r0, int64_t rows) {
    block_forward(ops, s, d, o, w, in, xin, maps, n, r0, rows, out, saved, sp.blk);
  });
}

template <class T, class Ops>
void layer_backward(const Ops& ops, const LayerShape& s, const LayerOptions& o,
                    const LayerParams<T>& w, const LayerInputs<T>& in, const LayerSaved<T>& saved,
                    const T* grad_out, const LayerInputGrads<T>& gi,
                    const LayerParamGrads<T>& grad_w, void* workspace, size_t workspace_bytes) {
  using namespace layer_detail;
  if (!o.training) throw std::invalid_argument("layer: the backward needs a training forward");
  check_call(s, o, saved, in);
  if (!gi.x) throw std::invalid_argument("layer: the input gradient buffer is missing");
  const Dims d(s);
  Carver ws(workspace, Ops::kAlign);
  const BackwardSpace<T> sp(ws, s, d, saved, msda_scratch(ops, s, d));
  check_workspace(ws.used(), workspace_bytes);
  GradAcc<T> gw;
  if constexpr (kAccIsStorage<T>)
    gw = grad_w;
  else
    gw = sp.grad_w;
  ValueMaps<T> maps{saved.value, nullptr, nullptr};
  ValueGrads<T> vg{sp.dvalue, sp.dmemory, sp.dones};
  if (s.decoder) {
    maps = memory_maps(ops, d, in, sp.memory, sp.ones);
    if constexpr (kAccIsStorage<T>)
      if (gi.memory) vg.memory = gi.memory;  // accumulate in place
  }
  ops.fill_zero(d.N * d.S * d.C, s.decoder ? vg.memory : vg.value);
  // (the ones map's gradient is never used, but the MSDA backward adds into it)
  if (s.decoder) ops.fill_zero(d.N * d.S, vg.ones);
  const T* xin = in.x;
  T* dxin = gi.x;
  if (s.decoder) {
    ops.layernorm_apply(d.T, d.C, saved.xhat_sa, w.sa_norm_w, w.sa_norm_b, sp.y0);
    xin = sp.y0;
    dxin = sp.dy0;
  }
  bool accumulate = false;  // the first block writes the parameter gradients
  for_each_block(d.N, d.Lq, d.B, [&](int64_t n, int64_t r0, int64_t rows) {
    block_backward(ops, s, d, o, w, in, xin, saved, grad_out, n, r0, rows, dxin, maps, vg, gi,
                   gw, accumulate, sp.blk, sp.msda, sp.msda_bytes);
    accumulate = true;
  });
  if (s.decoder) {
    // padded memory tokens were zeroed before sampling: no gradient reaches them
    if (in.mask) ops.mask_rows(d.N * d.S, d.C, in.mask, vg.memory);
    if (gi.memory) storage_copy(ops, d.N * d.S * d.C, vg.memory, gi.memory);
    self_attention_backward(ops, d, o, w, in, saved, sp.dy0, gi, gw, sp.sa);
  } else {  // value = mask(src W_v^T + b_v): padded rows pass no gradient
    if (in.mask) ops.mask_rows(d.N * d.S, d.C, in.mask, vg.value);
    const T* dvalue = storage_copy(ops, d.N * d.S * d.C, vg.value, sp.dvalue_t);
    linear_backward(ops, d.N * d.S, d.C, d.C, in.x, d.C, dvalue, d.C, w.value_w, gw.value_w,
                    gw.value_b, false, gi.x, d.C, Acc<T>(1));
  }
  int64_t sizes[GradAcc<T>::kCount];
  param_sizes(s, sizes);
  LayerParamGrads<T> out = grad_w;
  const auto from = gw.fields();
  const auto to = out.fields();
  for (int i = 0; i < GradAcc<T>::kCount; ++i)
    if (sizes[i] > 0) storage_copy(ops, sizes[i], *from[i], *to[i]);
}

}  // namespace ddetr
