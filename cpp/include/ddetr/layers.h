// The native deformable encoder and decoder layers: one call per layer and pass.
//
// Both layers are post-norm, as in Deformable DETR (python/ddetr/models/
// transformer_layers.py is the reference with the same parameters). Rows are tokens:
// t = n * Lq + q, C = d_model, F = dim_feedforward, K = M * L * P.
//
// Encoder layer (queries src (N, Lq, C); value input = memory (N, S, C), or src itself
// with Lq = S when no memory is given):
//   q      = src + pos
//   value  = mask(memory W_v^T + b_v)                      (N, S, C); padded rows zero
//   raw    = q W_oa^T + b_oa                               (rows, 3K): K*2 offsets, K logits
//   loc    = ref + offset / (W_l, H_l)        (2-d refs)   (rows, M, L, P, 2)
//          = ref_xy + offset / P * ref_wh / 2 (4-d refs)
//   attn   = softmax over L*P of the logits                (rows, M, L, P)
//   a      = msda(value, loc, attn) W_o^T + b_o            (sampled = msda(...) saved)
//   y1     = LN_msda(src + drop_msda_out(a))
//   hidden = drop_ffn(relu(y1 W_1^T + b_1))                (rows, F)
//   out    = LN_ffn(y1 + drop_ffn_out(hidden W_2^T + b_2))
// With memory, src holds the Lq rows of the memory a sparse encoder updates (Sparse
// DETR: the caller gathers them and scatters out back); every memory token stays a
// value. Without it, memory = src: the dense encoder layer.
//
// Decoder layer (queries tgt (N, Lq, C), value input = memory (N, S, C)):
//   qk     = tgt + pos;  [Q K] = qk W_qk^T + b_qk;  V = tgt W_v^T + b_v   (qkv saved)
//   probs  = drop_attn(softmax(Q_m K_m^T / sqrt(D)))       per batch element and head
//   y0     = LN_sa(tgt + drop_sa_out((probs V) W_so^T + b_so))
//   y1     = LN_msda(y0 + drop_msda_out(deformable cross-attention of y0 + pos into
//            memory)), its values sampled from the memory before the projection
//            (layer_driver.h)
//   out    = LN_ffn(y1 + drop_ffn_out(FFN(y1)))
//
// LayerNorms and dropouts are named by their role (a norm or an *_out dropout by the
// sub-layer it follows); a role's checkpoint name depends on the layer kind
// (python/ddetr/models/transformer_layers.py):
//   role           C++ name                    encoder     decoder
//   LN_sa          sa_norm_w, sa_norm_b        -           norm2
//   LN_msda        msda_norm_w, msda_norm_b    norm1       norm1
//   LN_ffn         ffn_norm_w, ffn_norm_b      norm2       norm3
//   drop_attn      kDropAttn                   -           self_attn's own dropout
//   drop_sa_out    kDropSaOut                  -           dropout2
//   drop_msda_out  kDropMsdaOut                dropout1    dropout1
//   drop_ffn       kDropFfn                    dropout2    dropout3
//   drop_ffn_out   kDropFfnOut                 dropout3    dropout4
//
// Dropout: Philox keyed by `seed` (ddetr/dropout.h). Site s of a layer draws its mask
// for rows [r0, r0 + rows) from the counter offset (s << 40) + r0, element index
// counted from the block's first element; the backward regenerates the same masks.
//
// Saved activations (training): written by the forward into buffers the caller
// allocates (sizes from layer_saved_sizes), read by the backward. The encoder does not
// keep its sampled features: its MSDA backward, which gathers the same corners, computes
// them again on the way (on CUDA, one more MSDA forward).
// `recompute` leaves out the FFN hidden activations and the decoder's attention
// probabilities (the backward recomputes them: one more GEMM); LayerNorms keep their
// normalised input and 1/std (the layer output alone cannot give them back when gamma
// has zeros).
//
// Memory: the native code never allocates tensor memory. Every pass also takes a
// workspace of layer_workspace_bytes bytes. Work goes in blocks of query rows (each
// backend's Ops::kBlockRows: kLayerBlockRows on the CPU, where a block's activations
// stay in cache; far more on a GPU, where small blocks mean small launches), so the
// workspace stays bounded whatever the image size.
//
// Types: T = float, double or bf16 for every tensor (parameters, inputs, outputs, saved
// activations, gradients) except the reference points and their gradient, which are in
// Acc<T> (float for bf16, as MSDA's sampling locations: a bf16 location can be off by a
// third of a pixel); arithmetic in Acc<T>; masks one byte per token.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "ddetr/msda.h"

namespace ddetr {

constexpr int64_t kLayerBlockRows = 2048;

// Dropout sites (the high bits of the Philox offset), named as in the table above.
enum DropSite : int {
  kDropAttn = 0,     // the decoder's attention probabilities
  kDropSaOut = 1,    // the decoder's self-attention output
  kDropMsdaOut = 2,  // the deformable attention's output
  kDropFfn = 3,      // the FFN's hidden activations
  kDropFfnOut = 4,   // the FFN's output
};

struct LayerShape {
  bool decoder = false;
  int64_t N = 0, Lq = 0, C = 0, F = 0, ref_dim = 2;
  MsdaShape msda;  // N, S, M, D, L, P and the level table of the value maps; msda.Lq = Lq
};

struct LayerOptions {
  bool training = false;  // dropout on and saved activations written
  bool recompute = false; // see above
  float p = 0.f;          // dropout probability of every site
  uint64_t seed = 0;
};

// Parameters (Ptr = const T*) or their gradients (Ptr = T*, fully written by the
// backward), row-major like torch's nn.Linear weights (out_features, in_features).
// The LayerNorms' checkpoint names per layer kind are in the table at the top.
template <class Ptr> struct LayerWeights {
  // decoder self-attention (nn.MultiheadAttention: in_proj (3C, C), out_proj) and the
  // LayerNorm after it (the decoder's norm2)
  Ptr in_proj_w = nullptr, in_proj_b = nullptr, sa_out_w = nullptr, sa_out_b = nullptr,
      sa_norm_w = nullptr, sa_norm_b = nullptr;
  // deformable attention; oa = [sampling_offsets; attention_weights] stacked (3K, C);
  // then the LayerNorm after it (norm1 in both layer kinds)
  Ptr value_w = nullptr, value_b = nullptr, oa_w = nullptr, oa_b = nullptr, out_w = nullptr,
      out_b = nullptr, msda_norm_w = nullptr, msda_norm_b = nullptr;
  // FFN (linear1, linear2) and the LayerNorm after it (encoder norm2, decoder norm3)
  Ptr lin1_w = nullptr, lin1_b = nullptr, lin2_w = nullptr, lin2_b = nullptr,
      ffn_norm_w = nullptr, ffn_norm_b = nullptr;

  static constexpr int kCount = 20;
  // every field in the order above, for code that treats them alike
  std::array<Ptr*, kCount> fields() {
    return {&in_proj_w,   &in_proj_b,   &sa_out_w, &sa_out_b, &sa_norm_w,  &sa_norm_b,
            &value_w,     &value_b,     &oa_w,     &oa_b,     &out_w,      &out_b,
            &msda_norm_w, &msda_norm_b, &lin1_w,   &lin1_b,   &lin2_w,     &lin2_b,
            &ffn_norm_w,  &ffn_norm_b};
  }
};

template <class T> using LayerParams = LayerWeights<const T*>;
template <class T> using LayerParamGrads = LayerWeights<T*>;

template <class T> struct LayerInputs {
  const T* x = nullptr;          // src (encoder) or tgt (decoder): (N, Lq, C)
  const T* pos = nullptr;        // (N, Lq, C) or null
  const Acc<T>* ref = nullptr;   // (N, Lq, L, ref_dim), in Acc<T> like MSDA's locations
  const T* memory = nullptr;     // (N, S, C): the value input; an encoder may leave it
                                 // null, x (Lq = S) is then the value input
  const uint8_t* mask = nullptr; // (N, S), nonzero on padding, or null
  // decoder: (Lq, Lq) added to every image's and head's self-attention scores before the
  // softmax (0 where query i may attend to query j, -inf where not: DINO's denoising
  // groups), or null
  const Acc<T>* sa_bias = nullptr;
};

constexpr int kLayerSavedCount = 14;

// Saved activations; the element counts are given by layer_saved_sizes. xhat_* and
// rstd_* are a LayerNorm's normalised input and 1/std, named by its role (see the top).
template <class T> struct LayerSaved {
  T *qkv = nullptr, *probs = nullptr, *sa_heads = nullptr, *xhat_sa = nullptr,
    *rstd_sa = nullptr;                                           // decoder only
  T *value = nullptr, *raw = nullptr, *sampled = nullptr, *xhat_msda = nullptr,
    *rstd_msda = nullptr;                                         // deformable attention
  T *hidden = nullptr, *xhat_ffn = nullptr, *rstd_ffn = nullptr;  // FFN
  T* smem = nullptr;  // decoder: sampled memory (T, M, C) then coefficients (T, M)

  // every field in the order above (layer_saved_sizes' order)
  std::array<T**, kLayerSavedCount> fields() {
    return {&qkv,       &probs,     &sa_heads, &xhat_sa,  &rstd_sa,  &value,    &raw,
            &sampled,   &xhat_msda, &rstd_msda, &hidden,  &xhat_ffn, &rstd_ffn, &smem};
  }
};

// Input gradients: dx always; the others may be null when not wanted.
template <class T> struct LayerInputGrads {
  T *x = nullptr, *pos = nullptr;
  Acc<T>* ref = nullptr;
  T* memory = nullptr;
};

// Element counts of the saved buffers, in LayerSaved's order (0: not used).
void layer_saved_sizes(const LayerShape& s, const LayerOptions& o,
                       int64_t sizes[kLayerSavedCount]);

// Throws std::invalid_argument naming an inconsistent size.
void validate(const LayerShape& s);

// Workspace bytes of a forward (backward = false) or backward pass.
// On the CPU it depends on num_threads (torch's setting; 0: OpenMP's): the forward gives
// each thread a block workspace.
size_t layer_workspace_bytes_cpu(const LayerShape& s, const LayerOptions& o, bool backward,
                                 int elem_bytes, int num_threads);
size_t layer_workspace_bytes_cuda(const LayerShape& s, const LayerOptions& o, bool backward,
                                  int elem_bytes, bool deterministic, int device);

template <class T>
void layer_forward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                       const LayerInputs<T>& in, T* out, const LayerSaved<T>& saved,
                       void* workspace, size_t workspace_bytes, int num_threads);

template <class T>
void layer_backward_cpu(const LayerShape& s, const LayerOptions& o, const LayerParams<T>& w,
                        const LayerInputs<T>& in, const LayerSaved<T>& saved,
                        const T* grad_out, const LayerInputGrads<T>& grad_in,
                        const LayerParamGrads<T>& grad_w, void* workspace,
                        size_t workspace_bytes, int num_threads);

// The void-pointer structs the bindings fill, as typed ones.
template <class T> LayerParams<T> typed(LayerParams<void> p) {
  LayerParams<T> t;
  const auto from = p.fields();
  const auto to = t.fields();
  for (int i = 0; i < LayerParams<T>::kCount; ++i) *to[i] = static_cast<const T*>(*from[i]);
  return t;
}

template <class T> LayerParamGrads<T> typed(LayerParamGrads<void> p) {
  LayerParamGrads<T> t;
  const auto from = p.fields();
  const auto to = t.fields();
  for (int i = 0; i < LayerParamGrads<T>::kCount; ++i) *to[i] = static_cast<T*>(*from[i]);
  return t;
}

template <class T> LayerInputs<T> typed(const LayerInputs<void>& p) {
  return {static_cast<const T*>(p.x), static_cast<const T*>(p.pos),
          static_cast<const Acc<T>*>(p.ref), static_cast<const T*>(p.memory), p.mask,
          static_cast<const Acc<T>*>(p.sa_bias)};
}

template <class T> LayerSaved<T> typed(LayerSaved<void> p) {
  LayerSaved<T> t;
  const auto from = p.fields();
  const auto to = t.fields();
  for (int i = 0; i < kLayerSavedCount; ++i) *to[i] = static_cast<T*>(*from[i]);
  return t;
}

template <class T> LayerInputGrads<T> typed(const LayerInputGrads<void>& p) {
  return {static_cast<T*>(p.x), static_cast<T*>(p.pos), static_cast<Acc<T>*>(p.ref),
          static_cast<T*>(p.memory)};
}

// CUDA (cuda/layers.cu): dtype bf16, f32 or f64, pointers as void* of that type, on `stream`.
// Needs cuBLAS, loaded at run time (load_cublas); throws std::runtime_error otherwise.
void load_cublas(const char* path);
bool cublas_loaded();
void layer_forward_cuda(DType dtype, const LayerShape& s, const LayerOptions& o,
                        const LayerParams<void>& w, const LayerInputs<void>& in, void* out,
                        const LayerSaved<void>& saved, void* workspace,
                        size_t workspace_bytes, bool deterministic, int device,
                        uintptr_t stream);
void layer_backward_cuda(DType dtype, const LayerShape& s, const LayerOptions& o,
                         const LayerParams<void>& w, const LayerInputs<void>& in,
                         const LayerSaved<void>& saved, const void* grad_out,
                         const LayerInputGrads<void>& grad_in,
                         const LayerParamGrads<void>& grad_w, void* workspace,
                         size_t workspace_bytes, bool deterministic, int device,
                         uintptr_t stream);

}  // namespace ddetr
