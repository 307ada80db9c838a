// The forward pass of the layer driver (ddetr/layer_driver.h): the decoder's dense
// self-attention stage over all its rows, then, per block of rows, deformable attention,
// add & norm, FFN, add & norm. Stages read the LayerPass context
// (ddetr/layer_driver_pass.h) and write into the workspace pieces carved for them here.
#pragma once

#include <vector>

#include "ddetr/layer_driver_pass.h"

namespace ddetr {
namespace layer_detail {

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

// Everything the forward carves from its workspace, in one order for counting and for
// use: one block workspace per slot of Ops::run_blocks (ops.block_slots(block count)).
template <class T> struct ForwardSpace {
  T *value, *memory, *ones;
  SelfAttnForward<T> sa;
  std::vector<BlockForward<T>> blk;
  ForwardSpace(Carver& ws, const LayerShape& s, const Dims& d, const LayerSaved<T>& saved,
               int slots)
      : value(saved.value || s.decoder ? saved.value : ws.take<T>(d.N * d.S * d.C)),
        memory(ws.take<T>(s.decoder ? d.N * d.S * d.C : 0)),
        ones(ws.take<T>(s.decoder ? d.N * d.S : 0)),
        sa(ws, d, saved, s.decoder) {
    for (int i = 0; i < slots; ++i) blk.emplace_back(ws, d, saved, s.decoder);
  }
};

// The decoder's self-attention stage: Q K V projections, per-head
// softmax(Q K^T / sqrt(D)), dropout, probs V, out_proj, add & norm into b.y0 (T, C).
template <class T, class Ops>
void self_attention_forward(const LayerPass<T, Ops>& p, const SelfAttnForward<T>& b) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const LayerParams<T>& w = p.w;
  const LayerSaved<T>& saved = p.saved;
  const int64_t C = d.C, C3 = 3 * d.C, LL = d.Lq * d.Lq;
  const T* qk = with_pos(ops, d.T * C, p.in.x, p.in.pos, b.qk);
  T* qkv = saved.qkv ? saved.qkv : b.qkv;
  // [Q K] from x + pos, V from x; rows of qkv are (Q | K | V), each (M, D)
  ops.gemm(false, true, d.T, 2 * C, C, qk, C, w.in_proj_w, C, Acc<T>(0), qkv, C3, w.in_proj_b,
           false);
  ops.gemm(false, true, d.T, C, C, p.in.x, C, w.in_proj_w + 2 * C * C, C, Acc<T>(0),
           qkv + 2 * C, C3, w.in_proj_b + 2 * C, false);
  T* heads = saved.sa_heads ? saved.sa_heads : b.heads;
  for (int64_t n = 0; n < d.N; ++n) {
    const T* qkv_n = qkv + n * d.Lq * C3;
    T* probs = saved.probs ? saved.probs + n * d.M * LL : b.probs;
    attention_probs(ops, d, qkv_n, p.in.sa_bias, b.scores, probs);
    const T* pd = dropped(ops, p.o, kDropAttn, n, d.M * LL, probs, b.pd);
    // heads_m (Lq, D) = probs_m V_m, written into columns [m D, m D + D) of heads
    ops.gemm_batched(false, false, d.Lq, d.D, d.Lq, pd, d.Lq, LL, qkv_n + 2 * C, C3, d.D,
                     Acc<T>(0), heads + n * d.Lq * C, C, d.D, d.M);
  }
  ops.gemm(false, true, d.T, C, C, heads, C, w.sa_out_w, C, Acc<T>(0), b.a, C, w.sa_out_b, false);
  dropped(ops, p.o, kDropSaOut, 0, d.T * C, b.a, b.a);
  ops.add_layernorm(d.T, C, p.in.x, b.a, w.sa_norm_w, w.sa_norm_b, b.y0, saved.xhat_sa,
                    saved.rstd_sa);
}

// The decoder's sampled values of block `blk` (see ddetr/layer_driver.h):
// smem (rows, M, C), coef (rows, M), sampled (rows, M * D).
template <class T, class Ops>
void sample_memory(const LayerPass<T, Ops>& p, RowBlock blk, const Acc<T>* loc,
                   const Acc<T>* attn, T* smem, T* coef, T* sampled) {
  const Ops& ops = p.ops;
  const Dims& d = p.d;
  const int64_t rows = blk.rows;
  ops.msda_forward(memory_shape(p.s, rows, d.C), p.maps.memory + blk.n * d.S * d.C, loc, attn,
                   smem);
  ops.msda_forward(memory_shape(p.s, rows, 1), p.maps.ones + blk.n * d.S, loc, attn, coef);
  // per head: sampled_m (rows, D) = smem_m (rows, C) W_v,m^T + coef_m (rows, 1) b_v,m (1, D)
  ops.gemm_batched(false, true, rows, d.D, d.C, smem, d.M * d.C, d.C, p.w.value_w, d.C,
                   d.D * d.C, Acc<T>(0), sampled, d.C, d.D, d.M);
  ops.gemm_batched(false, false, rows, d.D, 1, coef, d.M, 1, p.w.value_b, d.D, d.D, Acc<T>(1),
                   sampled, d.C, d.D, d.M);
}

// Block `blk`: deformable attention of xin (+ pos) into the values, add & norm (LN_msda),
// FFN, add & norm (LN_ffn), into its rows of out.
template <class T, class Ops>
void block_forward(const LayerPass<T, Ops>& p, RowBlock blk, T* out, const BlockForward<T>& b) {
  const Ops& ops = p.ops;
  const LayerShape& s = p.s;
  const Dims& d = p.d;
  const LayerParams<T>& w = p.w;
  const LayerSaved<T>& saved = p.saved;
  const int64_t C = d.C, K = d.K, r0 = blk.r0, rows = blk.rows;
  T* const no_save = nullptr;
  const T* x = p.xin + r0 * C;
  const T* q = with_pos(ops, rows * C, x, p.in.pos ? p.in.pos + r0 * C : nullptr, b.q);
  T* raw = rows_of(saved.raw, r0, 3 * K, b.raw);
  ops.gemm(false, true, rows, 3 * K, C, q, C, w.oa_w, C, Acc<T>(0), raw, 3 * K, w.oa_b, false);
  ops.sampling_forward(sampling_args(s, rows), raw, p.in.ref + r0 * s.msda.L * s.ref_dim,
                       b.loc, b.attn);
  T* sampled = rows_of(saved.sampled, r0, C, b.sampled);
  if (s.decoder) {
    T* smem = rows_of(saved.smem, r0, d.M * C, b.smem);
    T* coef = saved.smem ? saved_coef(saved, d, r0) : b.coef;
    sample_memory(p, blk, b.loc, b.attn, smem, coef, sampled);
  } else {
    ops.msda_forward(block_shape(s, rows), p.maps.value + blk.n * d.S * C, b.loc, b.attn,
                     sampled);
  }
  ops.gemm(false, true, rows, C, C, sampled, C, w.out_w, C, Acc<T>(0), b.a, C, w.out_b, false);
  dropped(ops, p.o, kDropMsdaOut, r0, rows * C, b.a, b.a);
  ops.add_layernorm(rows, C, x, b.a, w.msda_norm_w, w.msda_norm_b, b.y1,
                    rows_of(saved.xhat_msda, r0, C, no_save),
                    rows_of(saved.rstd_msda, r0, 1, no_save));
  T* hidden = rows_of(saved.hidden, r0, d.F, b.hidden);
  ops.gemm(false, true, rows, d.F, C, b.y1, C, w.lin1_w, C, Acc<T>(0), hidden, d.F, w.lin1_b,
           true);
  dropped(ops, p.o, kDropFfn, r0, rows * d.F, hidden, hidden);
  ops.gemm(false, true, rows, C, d.F, hidden, d.F, w.lin2_w, d.F, Acc<T>(0), b.a, C, w.lin2_b,
           false);
  dropped(ops, p.o, kDropFfnOut, r0, rows * C, b.a, b.a);
  ops.add_layernorm(rows, C, b.y1, b.a, w.ffn_norm_w, w.ffn_norm_b, out + r0 * C,
                    rows_of(saved.xhat_ffn, r0, C, no_save),
                    rows_of(saved.rstd_ffn, r0, 1, no_save));
}

}  // namespace layer_detail

// The forward of one layer on `ops` into out (T, C); `workspace` holds at least
// layer_workspace_bytes(ops, a.s, a.o, false, sizeof(T)) bytes.
template <class T, class Ops>
void layer_forward(const Ops& ops, const LayerArgs<T>& a, T* out, void* workspace,
                   size_t workspace_bytes) {
  using namespace layer_detail;
  const LayerShape& s = a.s;
  check_call(a);
  const Dims d(s, Ops::kBlockRows);
  Carver ws(workspace, Ops::kAlign);
  const ForwardSpace<T> sp(ws, s, d, a.saved, ops.block_slots(block_count(d)));
  check_workspace(ws.used(), workspace_bytes);
  ValueMaps<T> maps{sp.value, nullptr, nullptr};
  if (s.decoder) {
    maps = memory_maps(ops, d, a.in, sp.memory, sp.ones);
  } else {  // value = mask(memory W_v^T + b_v) over all N * S rows (memory: x if dense)
    ops.gemm(false, true, d.N * d.S, d.C, d.C, encoder_values_in(a.in), d.C, a.w.value_w, d.C,
             Acc<T>(0), sp.value, d.C, a.w.value_b, false);
    if (a.in.mask) ops.mask_rows(d.N * d.S, d.C, a.in.mask, sp.value);
  }
  // the blocks start from x (encoder) or from y0, the self-attention stage's output
  const LayerPass<T, Ops> p(ops, a, d, maps, s.decoder ? sp.sa.y0 : a.in.x);
  if (s.decoder) self_attention_forward(p, sp.sa);
  // every block writes its own rows: the backend may run them side by side
  ops.run_blocks(block_count(d), [&](int64_t i, int slot, const Ops& block_ops) {
    block_forward(LayerPass<T, Ops>(p, block_ops), block_at(d, i), out, sp.blk[size_t(slot)]);
  });
}

}  // namespace ddetr
