// The backward pass of the layer driver (ddetr/layer_driver.h): the blocks of rows in
// the forward's order (each block: the FFN half, then the deformable-attention half),
// then the encoder's value projection or the decoder's memory gradient and dense
// self-attention stage. Parameter gradients are summed over the blocks in that fixed
// order, so results are the same bits on every run. Stages read the LayerPass context
// and write through the BackwardState (ddetr/layer_driver_pass.h).
#pragma once

#include "ddetr/layer_driver_pass.h"

namespace ddetr {
namespace layer_detail {

// Workspace of the per-block part of the backward.
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

// Workspace of the decoder's self-attention stage (backward).
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

// Everything the backward carves from its workspace, in one order for counting and for use.
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

// A row-major matrix: `data` and its row stride `ld`, in elements.
template <class E> struct Matrix {
  E* data;
  int64_t ld;
};

// A linear layer y = x W^T + b in the backward: in_f -> out_f features, its weight
// (out_f, in_f) and the accumulators of its gradients (db null: no bias gradient here).
template <class T> struct LinearGrad {
  int64_t in_f, out_f;
  const T* weight;
  Acc<T>* dw;
  Acc<T>* db;
};

// dW (+)= dY^T X and db (+)= column sums of dY over `rows` rows of x (rows, in_f) and
// dy (rows, out_f); accumulate: add to what earlier blocks left. When dx.data is set,
// dX = dY W, or dX += dY W with add_to_dx.
template <class T, class Ops>
void linear_backward(const Ops& ops, int64_t rows, const LinearGrad<T>& lin, Matrix<const T> x,
                     Matrix<const T> dy, bool accumulate, Matrix<T> dx, bool add_to_dx) {
  ops.gemm(true, false, lin.out_f, lin.in_f, rows, dy.data, dy.ld, x.data, x.ld,
           Acc<T>(accumulate ? 1 : 0), lin.dw, lin.in_f, nullptr, false);
  if (lin.db) ops.column_sums(rows, lin.out_f, dy.data, lin.db, accumulate);  // dy contiguous
  if (dx.data)
    ops.gemm(false, false, rows, lin.in_f, lin.out_f, dy.data, dy.ld, lin.weight, lin.in_f,
             Acc<T>(add_to_dx ? 1 : 0), dx.data, dx.ld, nullptr, false);
}

// A LayerNorm in the backward, over some rows: what the forward saved for them (xhat
// (rows, C), rstd (rows)), its gamma, and the accumulators of the gamma / beta gradients.
template <class T> struct NormGrad {
  const T *xhat, *rstd, *gamma;
  Acc<T> *dgamma, *dbeta;
};

// dx from dy, and the gamma / beta gradients (accumulate: added to earlier blocks').
template <class T, class Ops>
void norm_backward(const Ops& ops, int64_t rows, int64_t C, const NormGrad<T>& norm, const T* dy,
                   T* dx, bool accumulate) {
  ops.column_dots(rows, C, dy, norm.xhat, norm.dgamma, accumulate);
  ops.column_sums(rows, C, dy, norm.dbeta, accumulate);
  ops.layernorm_backward(rows, C, dy, norm.xhat, norm.rstd, norm.gamma, dx);
}

// Backward of sample_memory: from b.dsampled to the value projection's gradients,
// the memory's gradient (accumulated) and b.dloc / b.dattn.
template <class T, class Ops>
void sample_memory_backward(const LayerPass<T, Ops>& p, const BackwardState<T>& g,
                            RowBlock blk, bool acc, const BlockBackward<T>& b) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const LayerParams<T>& w = p.w;
  const GradAcc<T>& gw = g.gw;
  const int64_t C = d.C, D = d.D, M = d.M, n = blk.n, r0 = blk.r0, rows = blk.rows;
  const T* smem = p.saved.smem + r0 * M * C;
  const T* coef = saved_coef(p.saved, d, r0);
  const Acc<T> beta(acc ? 1 : 0);
  // sampled_m = smem_m W_v,m^T + coef_m b_v,m:
  // dsmem_m = dsampled_m W_v,m, dW_v,m = dsampled_m^T smem_m,
  // dcoef_m = dsampled_m b_v,m^T, db_v,m = coef_m^T dsampled_m
  ops.gemm_batched(false, false, rows, C, D, b.dsampled, C, D, w.value_w, C, D * C, Acc<T>(0),
                   b.dsmem, M * C, C, M);
  ops.gemm_batched(true, false, D, C, rows, b.dsampled, C, D, smem, M * C, C, beta, gw.value_w,
                   C, D * C, M);
  ops.gemm_batched(false, true, rows, 1, D, b.dsampled, C, D, w.value_b, D, D, Acc<T>(0),
                   b.dcoef, M, 1, M);
  ops.gemm_batched(true, false, 1, D, rows, coef, M, 1, b.dsampled, C, D, beta, gw.value_b, D,
                   D, M);
  T* const no_out = nullptr;
  ops.msda_backward(memory_shape(p.s, rows, C), p.maps.memory + n * d.S * C, b.loc, b.attn,
                    b.dsmem, g.vg.memory + n * d.S * C, b.dloc, b.dattn, g.msda_ws,
                    g.msda_ws_bytes, no_out);
  ops.msda_backward(memory_shape(p.s, rows, 1), p.maps.ones + n * d.S, b.loc, b.attn, b.dcoef,
                    g.vg.ones + n * d.S, b.dloc2, b.dattn2, g.msda_ws, g.msda_ws_bytes, no_out);
  ops.add(rows * 2 * d.K, b.dloc, b.dloc2, b.dloc);
  ops.add(rows * d.K, b.dattn, b.dattn2, b.dattn);
}

// The FFN half of a block's backward: from the layer's output gradient through LN_ffn,
// the FFN and its dropouts to dy1 in b.g (y1 is rebuilt from LN_msda's saved xhat).
template <class T, class Ops>
void ffn_backward(const LayerPass<T, Ops>& p, const BackwardState<T>& g, RowBlock blk, bool acc,
                  const BlockBackward<T>& b) {
  const Ops& ops = p.ops;
  const LayerParams<T>& w = p.w;
  const LayerSaved<T>& saved = p.saved;
  const GradAcc<T>& gw = g.gw;
  const int64_t C = p.d.C, F = p.d.F, r0 = blk.r0, rows = blk.rows;
  // out = LN_ffn(y1 + drop_ffn_out(f)): b.g = d(y1 + drop_ffn_out(f)), then df
  const NormGrad<T> ffn_norm{saved.xhat_ffn + r0 * C, saved.rstd_ffn + r0, w.ffn_norm_w,
                             gw.ffn_norm_w, gw.ffn_norm_b};
  norm_backward(ops, rows, C, ffn_norm, g.grad_out + r0 * C, b.g, acc);
  const T* df = dropped(ops, p.o, kDropFfnOut, r0, rows * C, b.g, b.df);
  // FFN: f = hidden W_2^T + b_2, hidden = drop_ffn(relu(y1 W_1^T + b_1))
  ops.layernorm_apply(rows, C, saved.xhat_msda + r0 * C, w.msda_norm_w, w.msda_norm_b, b.y1);
  T* h = saved.hidden ? saved.hidden + r0 * F : b.h;
  if (!saved.hidden) {
    ops.gemm(false, true, rows, F, C, b.y1, C, w.lin1_w, C, Acc<T>(0), h, F, w.lin1_b, true);
    dropped(ops, p.o, kDropFfn, r0, rows * F, h, h);
  }
  const LinearGrad<T> lin2{F, C, w.lin2_w, gw.lin2_w, gw.lin2_b};
  linear_backward(ops, rows, lin2, {h, F}, {df, C}, acc, {b.dh, F}, false);
  ops.relu_dropout_backward(drop_args(p.o, kDropFfn, r0, rows * F), h, b.dh, b.dh);
  // dy1 = g + dh W_1 (the residual and the FFN input)
  const LinearGrad<T> lin1{C, F, w.lin1_w, gw.lin1_w, gw.lin1_b};
  linear_backward(ops, rows, lin1, {b.y1, C}, {b.dh, F}, acc, {b.g, C}, true);
}

// The deformable-attention half of a block's backward: from dy1 in b.g through LN_msda
// to the block's rows of g.dxin (written), the sampling and projection parameters, the
// sampled maps (accumulated), and pos / ref where asked for.
template <class T, class Ops>
void msda_backward_block(const LayerPass<T, Ops>& p, const BackwardState<T>& g, RowBlock blk,
                         bool acc, const BlockBackward<T>& b) {
  const Ops& ops = p.ops;
  const LayerShape& s = p.s;
  const LayerParams<T>& w = p.w;
  const LayerSaved<T>& saved = p.saved;
  const GradAcc<T>& gw = g.gw;
  const int64_t C = p.d.C, K = p.d.K, r0 = blk.r0, rows = blk.rows;
  // y1 = LN_msda(x + drop_msda_out(a)): the residual's gradient goes straight to dxin
  T* dx = g.dxin + r0 * C;
  const NormGrad<T> msda_norm{saved.xhat_msda + r0 * C, saved.rstd_msda + r0, w.msda_norm_w,
                              gw.msda_norm_w, gw.msda_norm_b};
  norm_backward(ops, rows, C, msda_norm, b.g, dx, acc);
  const T* da = dropped(ops, p.o, kDropMsdaOut, r0, rows * C, dx, b.da);
  // sampled = msda(value, loc, attn): loc and attn recomputed from the saved projection
  const T* raw = saved.raw + r0 * 3 * K;
  const SamplingArgs sa = sampling_args(s, rows);
  const Acc<T>* ref = p.in.ref + r0 * s.msda.L * s.ref_dim;
  ops.sampling_forward(sa, raw, ref, b.loc, b.attn);
  // a = sampled W_o^T + b_o: dsampled = da W_o first, for the MSDA backward; the encoder's
  // sampled features (not stored) come out of that backward, which gathers the same
  // corners, and only then does dW_o = da^T sampled run
  ops.gemm(false, false, rows, C, C, da, C, w.out_w, C, Acc<T>(0), b.dsampled, C,
           static_cast<const T*>(nullptr), false);
  const T* sampled = saved.sampled ? saved.sampled + r0 * C : b.sampled;
  if (s.decoder)
    sample_memory_backward(p, g, blk, acc, b);
  else
    ops.msda_backward(block_shape(s, rows), p.maps.value + blk.n * p.d.S * C, b.loc, b.attn,
                      b.dsampled, g.vg.value + blk.n * p.d.S * C, b.dloc, b.dattn, g.msda_ws,
                      g.msda_ws_bytes, saved.sampled ? static_cast<T*>(nullptr) : b.sampled);
  const LinearGrad<T> out_proj{C, C, w.out_w, gw.out_w, gw.out_b};
  linear_backward(ops, rows, out_proj, {sampled, C}, {da, C}, acc, {nullptr, C}, false);
  const T* q = with_pos(ops, rows * C, p.xin + r0 * C, p.in.pos ? p.in.pos + r0 * C : nullptr,
                        b.q);
  ops.sampling_backward(sa, raw, ref, b.attn, b.dloc, b.dattn, b.draw,
                        g.gi.ref ? g.gi.ref + r0 * s.msda.L * s.ref_dim : nullptr);
  // raw = q W_oa^T + b_oa; q = x + pos, so dq is also the gradient of pos
  T* dq = g.gi.pos ? g.gi.pos + r0 * C : b.dq;
  const LinearGrad<T> oa{C, 3 * K, w.oa_w, gw.oa_w, gw.oa_b};
  linear_backward(ops, rows, oa, {q, C}, {b.draw, 3 * K}, acc, {dq, C}, false);
  ops.add(rows * C, dx, dq, dx);
}

// Image n's part of the self-attention backward: from its rows of b.dheads to its rows of
// b.dqkv, through probs V, the probabilities' dropout and the softmax.
template <class T, class Ops>
void attention_backward_image(const LayerPass<T, Ops>& p, int64_t n, const SelfAttnBackward<T>& b) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const int64_t C = d.C, C3 = 3 * d.C, LL = d.Lq * d.Lq;
  const Acc<T> scale = Acc<T>(1) / std::sqrt(Acc<T>(d.D));
  const T* qkv_n = p.saved.qkv + n * d.Lq * C3;
  T* dqkv_n = b.dqkv + n * d.Lq * C3;
  const T* dheads_n = b.dheads + n * d.Lq * C;
  T* probs = p.saved.probs ? p.saved.probs + n * d.M * LL : b.probs;
  if (!p.saved.probs) attention_probs(ops, d, qkv_n, p.in.sa_bias, b.scores, probs);
  const T* pd = dropped(ops, p.o, kDropAttn, n, d.M * LL, probs, b.pd);
  // heads_m = pd_m V_m: dV_m = pd_m^T dheads_m, dpd_m = dheads_m V_m^T
  ops.gemm_batched(true, false, d.Lq, d.D, d.Lq, pd, d.Lq, LL, dheads_n, C, d.D, Acc<T>(0),
                   dqkv_n + 2 * C, C3, d.D, d.M);
  // (dpd in Acc<T> until the softmax backward has taken the row sums off it)
  Acc<T>* dpd = acc_or(b.scores, b.dp);
  ops.gemm_batched(false, true, d.Lq, d.Lq, d.D, dheads_n, C, d.D, qkv_n + 2 * C, C3, d.D,
                   Acc<T>(0), dpd, d.Lq, LL, d.M);
  dropped(ops, p.o, kDropAttn, n, d.M * LL, dpd, dpd);
  // scores = scale Q K^T: ds = scale * softmax backward; dQ = ds K, dK = ds^T Q
  ops.softmax_rows_backward(d.M * d.Lq, d.Lq, scale, probs, dpd, b.dp);
  ops.gemm_batched(false, false, d.Lq, d.D, d.Lq, b.dp, d.Lq, LL, qkv_n + C, C3, d.D, Acc<T>(0),
                   dqkv_n, C3, d.D, d.M);
  ops.gemm_batched(true, false, d.Lq, d.D, d.Lq, b.dp, d.Lq, LL, qkv_n, C3, d.D, Acc<T>(0),
                   dqkv_n + C, C3, d.D, d.M);
}

// The decoder's self-attention stage backward: from dy0 (g.dxin, the blocks' output) to
// the gradients of x (written) and pos (added to), and the stage's parameter gradients.
template <class T, class Ops>
void self_attention_backward(const LayerPass<T, Ops>& p, const BackwardState<T>& g,
                             const SelfAttnBackward<T>& b) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const LayerParams<T>& w = p.w;
  const GradAcc<T>& gw = g.gw;
  const LayerInputGrads<T>& gi = g.gi;
  const int64_t C = d.C, C3 = 3 * d.C;
  // y0 = LN_sa(x + drop_sa_out(a)): the residual's gradient is dx
  const NormGrad<T> sa_norm{p.saved.xhat_sa, p.saved.rstd_sa, w.sa_norm_w, gw.sa_norm_w,
                            gw.sa_norm_b};
  norm_backward(ops, d.T, C, sa_norm, g.dxin, gi.x, false);
  const T* da = dropped(ops, p.o, kDropSaOut, 0, d.T * C, gi.x, b.da);
  const LinearGrad<T> sa_out{C, C, w.sa_out_w, gw.sa_out_w, gw.sa_out_b};
  linear_backward(ops, d.T, sa_out, {p.saved.sa_heads, C}, {da, C}, false, {b.dheads, C}, false);
  for (int64_t n = 0; n < d.N; ++n) attention_backward_image(p, n, b);
  // [Q K] = qk W_qk^T + b_qk with qk = x + pos; V = x W_v^T + b_v
  const T* qk = with_pos(ops, d.T * C, p.in.x, p.in.pos, b.qk);
  ops.column_sums(d.T, C3, b.dqkv, gw.in_proj_b, false);
  const LinearGrad<T> in_proj_qk{C, 2 * C, w.in_proj_w, gw.in_proj_w, nullptr};
  linear_backward(ops, d.T, in_proj_qk, {qk, C}, {b.dqkv, C3}, false, {b.dqk, C}, false);
  const LinearGrad<T> in_proj_v{C, C, w.in_proj_w + 2 * C * C, gw.in_proj_w + 2 * C * C,
                                nullptr};
  linear_backward(ops, d.T, in_proj_v, {p.in.x, C}, {b.dqkv + 2 * C, C3}, false, {gi.x, C},
                  true);
  ops.add(d.T * C, gi.x, b.dqk, gi.x);
  if (gi.pos) ops.add(d.T * C, gi.pos, b.dqk, gi.pos);
}

// The gradients of the sampled maps, zeroed: Acc<T> workspace, except that float and
// double accumulate the decoder's memory gradient straight into the caller's buffer.
template <class T, class Ops>
ValueGrads<T> zeroed_value_grads(const Ops& ops, const LayerShape& s, const Dims& d,
                                 const LayerInputGrads<T>& gi, const BackwardSpace<T>& sp) {
  ValueGrads<T> vg{sp.dvalue, sp.dmemory, sp.dones};
  if constexpr (kAccIsStorage<T>)
    if (s.decoder && gi.memory) vg.memory = gi.memory;
  ops.fill_zero(d.N * d.S * d.C, s.decoder ? vg.memory : vg.value);
  // (the ones map's gradient is never used, but the MSDA backward adds into it)
  if (s.decoder) ops.fill_zero(d.N * d.S, vg.ones);
  return vg;
}

// After the blocks: the decoder's memory gradient and self-attention stage, or the
// encoder's value projection.
template <class T, class Ops>
void dense_backward(const LayerPass<T, Ops>& p, const BackwardState<T>& g,
                    const BackwardSpace<T>& sp) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const LayerInputGrads<T>& gi = g.gi;
  if (p.s.decoder) {
    // padded memory tokens were zeroed before sampling: no gradient reaches them
    if (p.in.mask) ops.mask_rows(d.N * d.S, d.C, p.in.mask, g.vg.memory);
    if (gi.memory) storage_copy(ops, d.N * d.S * d.C, g.vg.memory, gi.memory);
    self_attention_backward(p, g, sp.sa);
  } else {  // value = mask(memory W_v^T + b_v): padded rows pass no gradient
    if (p.in.mask) ops.mask_rows(d.N * d.S, d.C, p.in.mask, g.vg.value);
    const T* dvalue = storage_copy(ops, d.N * d.S * d.C, g.vg.value, sp.dvalue_t);
    const LinearGrad<T> value_proj{d.C, d.C, p.w.value_w, g.gw.value_w, g.gw.value_b};
    // the value input's gradient: written into memory's (where wanted), or, dense, added
    // to x's, which the blocks wrote
    const bool sparse = p.in.memory != nullptr;
    linear_backward(ops, d.N * d.S, value_proj, {encoder_values_in(p.in), d.C}, {dvalue, d.C},
                    false, {sparse ? gi.memory : gi.x, d.C}, !sparse);
  }
}

// The parameter gradients into the caller's buffers: bf16 rounds its Acc<T> accumulators
// once; float and double accumulated in those buffers already.
template <class T, class Ops>
void write_param_grads(const Ops& ops, const LayerShape& s, GradAcc<T> gw,
                       LayerParamGrads<T> out) {
  int64_t sizes[GradAcc<T>::kCount];
  param_sizes(s, sizes);
  const auto from = gw.fields();
  const auto to = out.fields();
  for (int i = 0; i < GradAcc<T>::kCount; ++i)
    if (sizes[i] > 0) storage_copy(ops, sizes[i], *from[i], *to[i]);
}

}  // namespace layer_detail

// The backward of one layer on `ops` after a training forward with the same arguments:
// grad_in.x and every parameter gradient written, grad_in.pos / ref / memory where not
// null; `workspace` holds at least layer_workspace_bytes(ops, a.s, a.o, true, sizeof(T)).
template <class T, class Ops>
void layer_backward(const Ops& ops, const LayerArgs<T>& a, const T* grad_out,
                    const LayerInputGrads<T>& gi, const LayerParamGrads<T>& grad_w,
                    void* workspace, size_t workspace_bytes) {
  using namespace layer_detail;
  const LayerShape& s = a.s;
  if (!a.o.training) throw std::invalid_argument("layer: the backward needs a training forward");
  check_call(a);
  if (!gi.x) throw std::invalid_argument("layer: the input gradient buffer is missing");
  const Dims d(s, Ops::kBlockRows);
  Carver ws(workspace, Ops::kAlign);
  const BackwardSpace<T> sp(ws, s, d, a.saved, msda_scratch(ops, s, d));
  check_workspace(ws.used(), workspace_bytes);
  GradAcc<T> gw;
  if constexpr (kAccIsStorage<T>)
    gw = grad_w;
  else
    gw = sp.grad_w;
  ValueMaps<T> maps{a.saved.value, nullptr, nullptr};
  if (s.decoder) maps = memory_maps(ops, d, a.in, sp.memory, sp.ones);
  const ValueGrads<T> vg = zeroed_value_grads(ops, s, d, gi, sp);
  // the decoder's blocks start from y0 = LN_sa(...), rebuilt from its saved xhat
  if (s.decoder)
    ops.layernorm_apply(d.T, d.C, a.saved.xhat_sa, a.w.sa_norm_w, a.w.sa_norm_b, sp.y0);
  const LayerPass<T, Ops> p(ops, a, d, maps, s.decoder ? sp.y0 : a.in.x);
  const BackwardState<T> g{grad_out, s.decoder ? sp.dy0 : gi.x, gi, gw, vg, sp.msda,
                           sp.msda_bytes};
  bool accumulate = false;  // the first block writes the parameter gradients
  for_each_block(d, [&](RowBlock blk) {
    ffn_backward(p, g, blk, accumulate, sp.blk);
    msda_backward_block(p, g, blk, accumulate, sp.blk);
    accumulate = true;
  });
  dense_backward(p, g, sp);
  write_param_grads(ops, s, gw, grad_w);
}

}  // namespace ddetr
