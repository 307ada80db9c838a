// The primitives the layer driver (ddetr/layer_driver.h) is written in.
//
// The driver is one template over an `Ops` class; the CPU (cpp/layers_cpu.cpp) and CUDA
// (cuda/layers.cu) each provide one. An Ops<T> (T = the storage type: float, double or
// bf16) has these const members; every pointer is device memory of that backend, every
// matrix row-major with its row stride (`ld`) in elements, and `out` may alias an input
// only where stated. A = Acc<T> (ddetr/scalar.h): float for float and bf16, double for
// double. Arithmetic happens in A; T buffers are read into A and rounded back once.
// MSDA's sampling locations and weights and their gradients, and the gradients of the
// sampled maps, are A buffers (as in ddetr/msda.h); everything else is T. U below is
// either T or A (member templates).
//
//   static constexpr size_t kAlign;   // alignment of workspace carve-outs, in bytes
//   static constexpr int64_t kBlockRows;  // query rows per block of the per-row stages
//   block_slots(count)     how many of a forward's `count` blocks may run at once (each
//                          gets its own block workspace)
//   run_blocks(count, fn)  calls fn(i, slot, block_ops) once for each i in [0, count):
//                          block i on ops `block_ops`, with workspace `slot` in
//                          [0, block_slots(count)), which no other call running at the
//                          same time has. The forward's blocks write disjoint rows, so
//                          they may run side by side (the CPU: a block per thread, on
//                          one-thread ops); block_ops must give the same bits as the ops.
//
//   gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc, bias, relu)
//       C (M, N) = op(A) op(B) + beta * C, then C[m, n] += bias[n] (bias may be null),
//       then ReLU when relu; op(X) = X^T when its flag is set (A is (K, M) then).
//       A, B, bias: T; beta: A; C: U (T, or A for the parameter-gradient accumulators).
//       Products and sums in float (double for double), C rounded to U once.
//   gemm_batched(ta, tb, M, N, K, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch)
//       `batch` independent GEMMs as above without epilogue; GEMM i uses A + i * sa,
//       B + i * sb, C + i * sc.
//   add(n, a, b, out)                    (U) out = a + b elementwise; out may alias a or b
//   fill_zero(n, x)                      (U)
//   fill(n, value, x)                    x[i] = value (A value, T x)
//   copy_rows(rows, cols, x, ldx, out, ldo)   (U) out[r, :cols] = x[r, :cols]
//   mask_rows(rows, cols, mask, x)       (U) x[r, :] = 0 where mask[r] != 0
//   to_storage(n, x, out)                out[i] = x[i] rounded to T (A x, T out); only
//                                        called when T is not A (bf16)
//   dropout(args, x, out, relu)          (U) ddetr/dropout.h; out may alias x
//   relu_dropout_backward(args, out, grad_out, grad_x)   grad_x may alias grad_out
//   add_layernorm(rows, C, base, branch, gamma, beta, y, xhat, rstd)
//       x = base + branch; per row mean, rstd = 1 / sqrt(var + 1e-5) (biased variance),
//       xhat = (x - mean) * rstd, y = xhat * gamma + beta. xhat and rstd may be null
//       (not saved); y may alias base or branch.
//   layernorm_apply(rows, C, xhat, gamma, beta, y)      y = xhat * gamma + beta
//   layernorm_backward(rows, C, dy, xhat, rstd, gamma, dx)
//       g = dy * gamma; dx = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat));
//       dx may alias dy.
//   column_sums(rows, cols, x, out, accumulate)      out[j] (+)= sum_r x[r, j]
//   column_dots(rows, cols, x, y, out, accumulate)   out[j] (+)= sum_r x[r, j] * y[r, j]
//       (x, y: T; out: U; both deterministic: the same bits on every run)
//   sampling_forward(args, raw, ref, loc, attn)       see SamplingArgs (ref, loc, attn: A)
//   sampling_backward(args, raw, ref, attn, grad_loc, grad_attn, grad_raw, grad_ref)
//       ref, attn, grad_loc, grad_attn, grad_ref: A; grad_raw (rows, 3K) written (T);
//       grad_ref written when not null
//   msda_forward(shape, value, loc, attn, out)                       ddetr/msda.h
//   msda_backward_workspace_bytes(shape)
//   msda_backward(shape, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
//                 workspace, workspace_bytes, out)
//       grad_value ACCUMULATES (+=); grad_loc and grad_attn are written; out, when not
//       null, gets msda_forward's output too (the CPU computes it from the corners the
//       backward gathers anyway).
//   softmax_rows(rows, cols, scale, x, out)   out[r, :] = softmax(scale * x[r, :])
//       x: U, out: T (may alias x when U is T); scale: A
//   softmax_rows_backward(rows, cols, scale, p, g, out)
//       out[r, :] = scale * p[r, :] * (g[r, :] - sum_j p[r, j] * g[r, j])
//       p, out: T; g: U (out may alias g when U is T); scale: A
#pragma once

#include <cstdint>

#include "ddetr/core.h"

namespace ddetr {

// Sampling locations and attention weights from the offset/logit projection.
//   raw  (rows, 3K), K = M * L * P: columns [0, 2K) the offsets (M, L, P, 2), columns
//        [2K, 3K) the attention logits (M, L, P); row stride 3K
//   ref  (rows, L, ref_dim): normalised (x, y) or (cx, cy, w, h)
//   loc  (rows, M, L, P, 2) = ref + offset / (W_l, H_l)            (ref_dim 2)
//                           = ref_xy + offset / P * ref_wh * 0.5   (ref_dim 4)
//   attn (rows, M, L, P)    = softmax of the logits over (L, P) for each (row, m)
// Backward: grad_raw's offset columns from grad_loc, its logit columns from the
// softmax backward of grad_attn; grad_ref[r, l, :] sums grad_loc over (m, p) (and, for
// boxes, grad_ref_wh = sum grad_loc * offset / P * 0.5).
struct SamplingArgs {
  int64_t rows = 0, M = 0, L = 0, P = 0, ref_dim = 2;
  int64_t level_h[kMaxLevels] = {};  // by value, so the struct can go to a kernel
  int64_t level_w[kMaxLevels] = {};
};

}  // namespace ddetr
