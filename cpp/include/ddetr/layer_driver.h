// The layer forward and backward of ddetr/layers.h, written once over the primitives
// of ddetr/layer_ops.h: cpp/layers_cpu.cpp and cuda/layers.cu instantiate it with their
// Ops. The same carve-up of the workspace serves the byte count (null base) and the
// passes, so the two cannot disagree.
//
// Files: ddetr/layer_driver_pass.h (what a pass is given, the LayerPass context every
// stage reads, shared helpers), ddetr/layer_driver_forward.h (layer_forward),
// ddetr/layer_driver_backward.h (layer_backward); this header includes them and sizes
// the workspace.
//
// Order of work. Forward: the encoder's value projection over all (N, S) rows, or the
// decoder's masked memory; the decoder's self-attention stage over all its (N, Lq) rows
// (it mixes the queries of one image); then, per block of at most Ops::kBlockRows query
// rows of one image, deformable attention, add & norm, FFN, add & norm (blocks write
// disjoint rows: Ops::run_blocks may run them side by side). Backward: the
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

#include <stdexcept>

#include "ddetr/layer_driver_backward.h"
#include "ddetr/layer_driver_forward.h"
#include "ddetr/layer_driver_pass.h"

namespace ddetr {

namespace layer_detail {

template <class T, class Ops> size_t workspace_bytes(const Ops& ops, const LayerShape& s,
                                                     const LayerOptions& o, bool backward) {
  const Dims d(s, Ops::kBlockRows);
  Carver ws(nullptr, Ops::kAlign);
  const LayerSaved<T> saved = counting_saved<T>(s, o);
  if (backward)
    BackwardSpace<T>(ws, s, d, saved, msda_scratch(ops, s, d));
  else
    ForwardSpace<T>(ws, s, d, saved, ops.block_slots(block_count(d)));
  return ws.used();
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

}  // namespace ddetr
