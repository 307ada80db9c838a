// The native encoder / decoder layers (ddetr/layers.h): one LayerCall, filled by
// python/ddetr/_native/layers.py, for the plan of a pass (saved sizes and workspaces),
// the forward and the backward. Parameters, inputs and saved activations are structs
// with one named pointer field each (0 = none), mapped field by field onto the kernels'
// structs.
#include "common.h"
#include "ddetr/layers.h"

#include <type_traits>

namespace ddetr {
namespace bind {
namespace {

// The parameters (or their gradients), named as in the checkpoint. The decoder's
// self-attention and its norm (the checkpoint's norm2) come first: an encoder leaves
// them 0. norm1 follows the deformable attention in both layers; ffn_norm is the
// encoder's norm2 and the decoder's norm3.
struct NamedParams {
  uintptr_t self_attn_in_proj_weight = 0, self_attn_in_proj_bias = 0,
            self_attn_out_proj_weight = 0, self_attn_out_proj_bias = 0,
            self_attn_norm_weight = 0, self_attn_norm_bias = 0;
  uintptr_t value_proj_weight = 0, value_proj_bias = 0,
            sampling_offsets_attention_weights_weight = 0,  // the two stacked: (3 M L P, C)
            sampling_offsets_attention_weights_bias = 0, output_proj_weight = 0,
            output_proj_bias = 0, norm1_weight = 0, norm1_bias = 0;
  uintptr_t linear1_weight = 0, linear1_bias = 0, linear2_weight = 0, linear2_bias = 0,
            ffn_norm_weight = 0, ffn_norm_bias = 0;
};

struct NamedInputs {
  uintptr_t x = 0, pos = 0, reference_points = 0, memory = 0, mask = 0, sa_bias = 0;
};

struct NamedInputGrads {
  uintptr_t x = 0, pos = 0, reference_points = 0, memory = 0;
};

// The saved activations of ddetr/layers.h's LayerSaved: pointers (V = uintptr_t) or
// element counts (V = int64_t).
template <class V> struct NamedSaved {
  V qkv = 0, probs = 0, sa_heads = 0, xhat_sa = 0, rstd_sa = 0, value = 0, raw = 0, sampled = 0,
    xhat_msda = 0, rstd_msda = 0, hidden = 0, xhat_ffn = 0, rstd_ffn = 0, smem = 0;
};
using SavedPointers = NamedSaved<uintptr_t>;
using SavedSizes = NamedSaved<int64_t>;

struct LayerCall {
  std::string dtype;  // float32, float64 or bfloat16
  Device device;
  bool decoder = false;
  int64_t N = 0, Lq = 0, C = 0, F = 0, ref_dim = 2;
  int64_t S = 0, M = 0, D = 0, L = 0, P = 0;  // the value map and the sampling
  std::vector<Level> levels;
  bool training = false, recompute = false;
  double dropout = 0.0;
  uint64_t seed = 0;
  bool deterministic = false;
  NamedParams params, grad_params;
  NamedInputs inputs;
  NamedInputGrads grad_inputs;
  SavedPointers saved;
  uintptr_t output = 0, grad_output = 0, workspace = 0;
  size_t workspace_bytes = 0;
};

struct LayerPlan {
  SavedSizes saved_sizes;  // elements of each saved activation (0: not kept)
  size_t forward_workspace_bytes = 0, backward_workspace_bytes = 0;
};

LayerShape layer_shape(const LayerCall& c) {
  LayerShape s;
  s.decoder = c.decoder;
  s.N = c.N;
  s.Lq = c.Lq;
  s.C = c.C;
  s.F = c.F;
  s.ref_dim = c.ref_dim;
  s.msda = msda_shape(c);
  validate(s);
  return s;
}

LayerOptions layer_options(const LayerCall& c) {
  LayerOptions r;
  r.training = c.training;
  r.recompute = c.recompute;
  if (!(c.dropout >= 0.0 && c.dropout <= 1.0))
    throw std::invalid_argument("dropout: expected a probability in [0, 1], got " +
                                std::to_string(c.dropout));
  r.p = float(c.dropout);
  r.seed = c.seed;
  return r;
}

// The named parameters as the kernels' struct; `name` prefixes the error of a null
// pointer. Everything is required, except the decoder's self-attention in an encoder.
template <class Ptr>
LayerWeights<Ptr> weights(const NamedParams& p, bool decoder, const std::string& name) {
  using V = std::remove_pointer_t<Ptr>;
  LayerWeights<Ptr> w;
  auto set = [&](Ptr& to, uintptr_t from, const char* field, bool needed) {
    require(from, needed, name + "." + field);
    to = as<V>(from);
  };
  set(w.in_proj_w, p.self_attn_in_proj_weight, "self_attn_in_proj_weight", decoder);
  set(w.in_proj_b, p.self_attn_in_proj_bias, "self_attn_in_proj_bias", decoder);
  set(w.sa_out_w, p.self_attn_out_proj_weight, "self_attn_out_proj_weight", decoder);
  set(w.sa_out_b, p.self_attn_out_proj_bias, "self_attn_out_proj_bias", decoder);
  set(w.sa_norm_w, p.self_attn_norm_weight, "self_attn_norm_weight", decoder);
  set(w.sa_norm_b, p.self_attn_norm_bias, "self_attn_norm_bias", decoder);
  set(w.value_w, p.value_proj_weight, "value_proj_weight", true);
  set(w.value_b, p.value_proj_bias, "value_proj_bias", true);
  set(w.oa_w, p.sampling_offsets_attention_weights_weight,
      "sampling_offsets_attention_weights_weight", true);
  set(w.oa_b, p.sampling_offsets_attention_weights_bias,
      "sampling_offsets_attention_weights_bias", true);
  set(w.out_w, p.output_proj_weight, "output_proj_weight", true);
  set(w.out_b, p.output_proj_bias, "output_proj_bias", true);
  set(w.msda_norm_w, p.norm1_weight, "norm1_weight", true);
  set(w.msda_norm_b, p.norm1_bias, "norm1_bias", true);
  set(w.lin1_w, p.linear1_weight, "linear1_weight", true);
  set(w.lin1_b, p.linear1_bias, "linear1_bias", true);
  set(w.lin2_w, p.linear2_weight, "linear2_weight", true);
  set(w.lin2_b, p.linear2_bias, "linear2_bias", true);
  set(w.ffn_norm_w, p.ffn_norm_weight, "ffn_norm_weight", true);
  set(w.ffn_norm_b, p.ffn_norm_bias, "ffn_norm_bias", true);
  return w;
}

LayerInputs<void> inputs(const LayerCall& c) {
  require(c.inputs.x, true, "inputs.x");
  require(c.inputs.reference_points, true, "inputs.reference_points");
  require(c.inputs.memory, c.decoder, "inputs.memory");
  LayerInputs<void> in;
  in.x = as<const void>(c.inputs.x);
  in.pos = as<const void>(c.inputs.pos);
  in.ref = as<const void>(c.inputs.reference_points);
  in.memory = as<const void>(c.inputs.memory);
  in.mask = as<const uint8_t>(c.inputs.mask);
  if (c.inputs.sa_bias && !c.decoder)
    throw std::invalid_argument("inputs.sa_bias: only a decoder layer has self-attention");
  in.sa_bias = as<const void>(c.inputs.sa_bias);
  return in;
}

LayerSaved<void> saved(const SavedPointers& p) {
  LayerSaved<void> s;
  s.qkv = as<void>(p.qkv);
  s.probs = as<void>(p.probs);
  s.sa_heads = as<void>(p.sa_heads);
  s.xhat_sa = as<void>(p.xhat_sa);
  s.rstd_sa = as<void>(p.rstd_sa);
  s.value = as<void>(p.value);
  s.raw = as<void>(p.raw);
  s.sampled = as<void>(p.sampled);
  s.xhat_msda = as<void>(p.xhat_msda);
  s.rstd_msda = as<void>(p.rstd_msda);
  s.hidden = as<void>(p.hidden);
  s.xhat_ffn = as<void>(p.xhat_ffn);
  s.rstd_ffn = as<void>(p.rstd_ffn);
  s.smem = as<void>(p.smem);
  return s;
}

// layer_saved_sizes writes the counts in LayerSaved's field order: a LayerSaved whose
// fields point at them reads each by its name.
SavedSizes saved_sizes(const LayerShape& s, const LayerOptions& o) {
  int64_t counts[kLayerSavedCount] = {};
  layer_saved_sizes(s, o, counts);
  LayerSaved<int64_t> at;
  const auto fields = at.fields();
  for (int i = 0; i < kLayerSavedCount; ++i) *fields[i] = &counts[i];
  SavedSizes out;
  out.qkv = *at.qkv;
  out.probs = *at.probs;
  out.sa_heads = *at.sa_heads;
  out.xhat_sa = *at.xhat_sa;
  out.rstd_sa = *at.rstd_sa;
  out.value = *at.value;
  out.raw = *at.raw;
  out.sampled = *at.sampled;
  out.xhat_msda = *at.xhat_msda;
  out.rstd_msda = *at.rstd_msda;
  out.hidden = *at.hidden;
  out.xhat_ffn = *at.xhat_ffn;
  out.rstd_ffn = *at.rstd_ffn;
  out.smem = *at.smem;
  return out;
}

// float32, float64 or bfloat16 (float16 has no native layer), on either device
template <class Cpu, class Cuda>
void on_layer_device(const LayerCall& c, Cpu&& cpu, Cuda&& cuda) {
  if (c.dtype == "float16")
    throw std::invalid_argument("the native layers take float32, float64 or bfloat16, got " +
                                c.dtype);
  on_device(c.dtype, c.device, cpu, cuda);
}

LayerPlan plan(const LayerCall& c) {
  const LayerShape s = layer_shape(c);
  const LayerOptions o = layer_options(c);
  const int elem = c.dtype == "float64" ? 8 : c.dtype == "bfloat16" ? 2 : 4;
  LayerPlan p;
  p.saved_sizes = saved_sizes(s, o);
  on_layer_device(
      c,
      [&](auto) {
        const int threads = c.device.threads;
        p.forward_workspace_bytes = layer_workspace_bytes_cpu(s, o, false, elem, threads);
        p.backward_workspace_bytes = layer_workspace_bytes_cpu(s, o, true, elem, threads);
      },
      [&](auto) {
        p.forward_workspace_bytes =
            layer_workspace_bytes_cuda(s, o, false, elem, c.deterministic, c.device.index);
        p.backward_workspace_bytes =
            layer_workspace_bytes_cuda(s, o, true, elem, c.deterministic, c.device.index);
      });
  return p;
}

// By value: Python cannot change the call while the kernels run without the GIL.
void forward(const LayerCall c) {
  const LayerShape s = layer_shape(c);
  const LayerOptions o = layer_options(c);
  const auto w = weights<const void*>(c.params, c.decoder, "params");
  const LayerInputs<void> in = inputs(c);
  const LayerSaved<void> sv = saved(c.saved);
  require(c.output, true, "output");
  require(c.workspace, c.workspace_bytes > 0, "workspace");
  py::gil_scoped_release unlocked;
  on_layer_device(
      c,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        layer_forward_cpu<T>(s, o, typed<T>(w), typed<T>(in), as<T>(c.output), typed<T>(sv),
                             as<void>(c.workspace), c.workspace_bytes, c.device.threads);
      },
      [&](auto dt) {
        layer_forward_cuda(dt, s, o, w, in, as<void>(c.output), sv, as<void>(c.workspace),
                           c.workspace_bytes, c.deterministic, c.device.index,
                           c.device.stream);
      });
}

void backward(const LayerCall c) {
  const LayerShape s = layer_shape(c);
  const LayerOptions o = layer_options(c);
  const auto w = weights<const void*>(c.params, c.decoder, "params");
  const auto gw = weights<void*>(c.grad_params, c.decoder, "grad_params");
  const LayerInputs<void> in = inputs(c);
  const LayerSaved<void> sv = saved(c.saved);
  require(c.grad_output, true, "grad_output");
  require(c.grad_inputs.x, true, "grad_inputs.x");
  require(c.workspace, c.workspace_bytes > 0, "workspace");
  LayerInputGrads<void> gi;
  gi.x = as<void>(c.grad_inputs.x);
  gi.pos = as<void>(c.grad_inputs.pos);
  gi.ref = as<void>(c.grad_inputs.reference_points);
  gi.memory = as<void>(c.grad_inputs.memory);
  py::gil_scoped_release unlocked;
  on_layer_device(
      c,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        layer_backward_cpu<T>(s, o, typed<T>(w), typed<T>(in), typed<T>(sv),
                              as<const T>(c.grad_output), typed<T>(gi), typed<T>(gw),
                              as<void>(c.workspace), c.workspace_bytes, c.device.threads);
      },
      [&](auto dt) {
        layer_backward_cuda(dt, s, o, w, in, sv, as<const void>(c.grad_output), gi, gw,
                            as<void>(c.workspace), c.workspace_bytes, c.deterministic,
                            c.device.index, c.device.stream);
      });
}

bool cublas_ready() {
#ifdef DDETR_WITH_CUDA
  return cublas_loaded();
#else
  return false;
#endif
}

void open_cublas(const std::string& path) {
#ifdef DDETR_WITH_CUDA
  load_cublas(path.c_str());
#else
  (void)path;
  no_cuda();
#endif
}

void bind_params(py::module_& m) {
  using P = NamedParams;
  NamedStruct<P>(m, "LayerParams",
                 "A layer's parameters or their gradients, one pointer each, named as in the "
                 "checkpoint (0: none).")
      .field("self_attn_in_proj_weight", &P::self_attn_in_proj_weight, "decoder: (3C, C)")
      .field("self_attn_in_proj_bias", &P::self_attn_in_proj_bias, "decoder: (3C,)")
      .field("self_attn_out_proj_weight", &P::self_attn_out_proj_weight, "decoder: (C, C)")
      .field("self_attn_out_proj_bias", &P::self_attn_out_proj_bias, "decoder: (C,)")
      .field("self_attn_norm_weight", &P::self_attn_norm_weight, "decoder's norm2: (C,)")
      .field("self_attn_norm_bias", &P::self_attn_norm_bias, "decoder's norm2: (C,)")
      .field("value_proj_weight", &P::value_proj_weight, "(C, C)")
      .field("value_proj_bias", &P::value_proj_bias, "(C,)")
      .field("sampling_offsets_attention_weights_weight",
             &P::sampling_offsets_attention_weights_weight,
             "sampling_offsets.weight over attention_weights.weight: (3 M L P, C)")
      .field("sampling_offsets_attention_weights_bias",
             &P::sampling_offsets_attention_weights_bias,
             "sampling_offsets.bias then attention_weights.bias: (3 M L P,)")
      .field("output_proj_weight", &P::output_proj_weight, "(C, C)")
      .field("output_proj_bias", &P::output_proj_bias, "(C,)")
      .field("norm1_weight", &P::norm1_weight, "after the deformable attention: (C,)")
      .field("norm1_bias", &P::norm1_bias, "(C,)")
      .field("linear1_weight", &P::linear1_weight, "(F, C)")
      .field("linear1_bias", &P::linear1_bias, "(F,)")
      .field("linear2_weight", &P::linear2_weight, "(C, F)")
      .field("linear2_bias", &P::linear2_bias, "(C,)")
      .field("ffn_norm_weight", &P::ffn_norm_weight, "encoder's norm2, decoder's norm3: (C,)")
      .field("ffn_norm_bias", &P::ffn_norm_bias, "(C,)");
}

template <class V> void bind_saved(py::module_& m, const char* name, const char* doc) {
  using S = NamedSaved<V>;
  NamedStruct<S>(m, name, doc)
      .field("qkv", &S::qkv, "decoder: self-attention Q, K, V")
      .field("probs", &S::probs, "decoder: attention probabilities (not with recompute)")
      .field("sa_heads", &S::sa_heads, "decoder: heads before out_proj")
      .field("xhat_sa", &S::xhat_sa, "decoder: norm2's normalised input")
      .field("rstd_sa", &S::rstd_sa, "decoder: norm2's 1/std")
      .field("value", &S::value, "projected values")
      .field("raw", &S::raw, "offsets and attention logits")
      .field("sampled", &S::sampled, "sampled features")
      .field("xhat_msda", &S::xhat_msda, "norm1's normalised input")
      .field("rstd_msda", &S::rstd_msda, "norm1's 1/std")
      .field("hidden", &S::hidden, "FFN hidden activations (not with recompute)")
      .field("xhat_ffn", &S::xhat_ffn, "FFN norm's normalised input")
      .field("rstd_ffn", &S::rstd_ffn, "FFN norm's 1/std")
      .field("smem", &S::smem, "decoder: sampled memory and coefficients");
}

}  // namespace

void bind_layers(py::module_& m) {
  bind_params(m);
  NamedStruct<NamedInputs>(m, "LayerInputs", "A layer's inputs (0: none).")
      .field("x", &NamedInputs::x, "src (encoder) or tgt (decoder): (N, Lq, C)")
      .field("pos", &NamedInputs::pos, "(N, Lq, C) or 0")
      .field("reference_points", &NamedInputs::reference_points, "(N, Lq, L, ref_dim), Acc<T>")
      .field("memory", &NamedInputs::memory,
             "(N, S, C) value input; decoder: required; encoder: 0 = x (Lq = S)")
      .field("mask", &NamedInputs::mask, "(N, S) bytes, nonzero on padding, or 0")
      .field("sa_bias", &NamedInputs::sa_bias,
             "decoder: (Lq, Lq) Acc<T> added to the self-attention scores (0 / -inf), or 0");
  NamedStruct<NamedInputGrads>(m, "LayerInputGrads",
                               "Gradients of a layer's inputs (0: not wanted; x always).")
      .field("x", &NamedInputGrads::x, "(N, Lq, C)")
      .field("pos", &NamedInputGrads::pos, "(N, Lq, C) or 0")
      .field("reference_points", &NamedInputGrads::reference_points, "Acc<T>, or 0")
      .field("memory", &NamedInputGrads::memory, "(N, S, C) where memory is given, or 0");
  bind_saved<uintptr_t>(m, "LayerSaved", "The activations a training forward saves (0: none).");
  bind_saved<int64_t>(m, "LayerSavedSizes", "Elements of each saved activation (0: not kept).");
  NamedStruct<LayerPlan>(m, "LayerPlan", "What a layer call needs allocated.")
      .field("saved_sizes", &LayerPlan::saved_sizes, "LayerSavedSizes")
      .field("forward_workspace_bytes", &LayerPlan::forward_workspace_bytes, "of layer_forward")
      .field("backward_workspace_bytes", &LayerPlan::backward_workspace_bytes,
             "of layer_backward");
  using C = LayerCall;
  NamedStruct<C>(m, "LayerCall", "One encoder or decoder layer pass (ddetr/layers.h).")
      .field("dtype", &C::dtype, "float32, float64 or bfloat16")
      .field("device", &C::device, "where it runs")
      .field("decoder", &C::decoder, "a decoder layer (else an encoder layer)")
      .field("N", &C::N, "batch")
      .field("Lq", &C::Lq, "queries (the updated tokens for an encoder: S without memory)")
      .field("C", &C::C, "d_model")
      .field("F", &C::F, "dim_feedforward")
      .field("ref_dim", &C::ref_dim, "2 (points) or 4 (boxes)")
      .field("S", &C::S, "value rows: sum of H * W over the levels")
      .field("M", &C::M, "heads")
      .field("D", &C::D, "channels per head: C / M")
      .field("L", &C::L, "levels")
      .field("P", &C::P, "points per head and level")
      .field("levels", &C::levels, "list of L Level")
      .field("training", &C::training, "dropout on and saved activations written")
      .field("recompute", &C::recompute, "the backward recomputes the FFN / attention probs")
      .field("dropout", &C::dropout, "probability of every dropout site")
      .field("seed", &C::seed, "Philox seed of the dropout masks")
      .field("deterministic", &C::deterministic, "the CUDA backward without atomics")
      .field("params", &C::params, "LayerParams")
      .field("grad_params", &C::grad_params, "LayerParams of the gradients (backward)")
      .field("inputs", &C::inputs, "LayerInputs")
      .field("grad_inputs", &C::grad_inputs, "LayerInputGrads (backward)")
      .field("saved", &C::saved, "LayerSaved: written by a training forward, read back")
      .field("output", &C::output, "(N, Lq, C), written by the forward")
      .field("grad_output", &C::grad_output, "(N, Lq, C), read by the backward")
      .field("workspace", &C::workspace, "scratch of the pass")
      .field("workspace_bytes", &C::workspace_bytes, "its size (see layer_plan)");
  m.def("layer_plan", &plan, py::arg("call"),
        "The saved activations' sizes and both passes' workspace bytes of this call.");
  m.def("layer_forward", &forward, py::arg("call"), "Writes call.output (and call.saved).");
  m.def("layer_backward", &backward, py::arg("call"),
        "Writes the wanted input gradients and every parameter gradient.");
  m.def("load_cublas", &open_cublas, py::arg("path"));
  m.def("cublas_loaded", &cublas_ready);
}

}  // namespace bind
}  // namespace ddetr
