// Multi-scale flattening and the encoder reference points (ddetr/flatten.h): one
// FlattenCall, filled by python/ddetr/_native/flatten.py, for the forward, the backward,
// its workspace size and the reference points. Per-level tensors arrive as lists of
// pointers, one per level; the level table is the (H, W) of every level (the starts and
// S are derived natively).
#include "common.h"
#include "ddetr/flatten.h"

namespace ddetr {
namespace bind {
namespace {

struct LevelSize {
  int64_t H = 0, W = 0;
};

using Pointers = std::vector<uintptr_t>;

struct FlattenCall {
  std::string dtype;  // of the maps (reference points: of valid_ratios)
  Device device;
  int64_t N = 0, C = 0;
  std::vector<LevelSize> levels;
  // forward
  Pointers features, masks, pos_embeds;  // one per level; masks empty: no padding
  uintptr_t level_embed = 0, src = 0, pos = 0, mask = 0, valid_ratios = 0;
  // backward
  uintptr_t grad_src = 0, grad_pos = 0;
  Pointers grad_features, grad_pos_embeds;  // one per level, or empty: not wanted
  uintptr_t grad_level_embed = 0;           // 0: not wanted
  uintptr_t workspace = 0;
  size_t workspace_bytes = 0;
  // encoder reference points (reads N, levels and valid_ratios)
  uintptr_t reference_points = 0;
};

FlattenShape flatten_shape(int64_t N, int64_t C, const std::vector<LevelSize>& levels) {
  if (int64_t(levels.size()) > kMaxLevels)
    throw std::invalid_argument("at most " + std::to_string(kMaxLevels) +
                                " levels are supported, got " + std::to_string(levels.size()));
  int64_t h[kMaxLevels] = {}, w[kMaxLevels] = {};
  for (size_t l = 0; l < levels.size(); ++l) {
    h[l] = levels[l].H;
    w[l] = levels[l].W;
  }
  return make_flatten_shape(N, C, int64_t(levels.size()), h, w);
}

// One pointer per level into `out`. An empty list (when `optional`) means "none";
// `needed`: the level tensors hold data, so a null pointer is an error.
template <class P>
void level_pointers(const Pointers& ptrs, const FlattenShape& s, bool optional, bool needed,
                    const std::string& name, P* out) {
  if (ptrs.empty() && optional) return;
  if (int64_t(ptrs.size()) != s.L)
    throw std::invalid_argument(name + ": " + std::to_string(ptrs.size()) +
                                " pointers for a pyramid of " + std::to_string(s.L) + " levels");
  for (int64_t l = 0; l < s.L; ++l) {
    require(ptrs[l], needed, name + "[" + std::to_string(l) + "]");
    out[l] = reinterpret_cast<P>(ptrs[l]);
  }
}

// By value: Python cannot change the call while the kernels run without the GIL.
void forward(const FlattenCall c) {
  const FlattenShape s = flatten_shape(c.N, c.C, c.levels);
  const bool data = c.N * c.C > 0;
  FlattenForwardArgs a;
  level_pointers(c.features, s, false, data, "features", a.features);
  level_pointers(c.pos_embeds, s, false, data, "pos_embeds", a.pos_embeds);
  level_pointers(c.masks, s, true, c.N > 0, "masks", a.masks);
  a.level_embed = as<const void>(c.level_embed);
  require(c.src, data, "src");
  require(c.pos, data, "pos");
  require(c.mask, c.N > 0, "mask");
  require(c.valid_ratios, c.N > 0, "valid_ratios");
  a.src = as<void>(c.src);
  a.pos = as<void>(c.pos);
  a.mask = as<uint8_t>(c.mask);
  a.valid_ratios = as<void>(c.valid_ratios);
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        flatten_forward_cpu<typename decltype(tag)::type>(s, a, c.device.threads);
      },
      [&](auto dt) { flatten_forward_cuda(dt, s, a, c.device.index, c.device.stream); });
}

// For grad_level_embed (call.grad_level_embed not 0), on call.device.
size_t workspace_bytes(const FlattenCall& c) {
  return flatten_backward_workspace_bytes(flatten_shape(c.N, c.C, c.levels),
                                          c.grad_level_embed != 0, c.device.kind == "cuda");
}

void backward(const FlattenCall c) {
  const FlattenShape s = flatten_shape(c.N, c.C, c.levels);
  const bool data = c.N * c.C > 0;
  FlattenBackwardArgs a;
  level_pointers(c.grad_features, s, true, data, "grad_features", a.grad_features);
  level_pointers(c.grad_pos_embeds, s, true, data, "grad_pos_embeds", a.grad_pos_embeds);
  const bool embed = c.grad_level_embed != 0;
  const size_t needed = flatten_backward_workspace_bytes(s, embed, c.device.kind == "cuda");
  require(c.grad_src, !c.grad_features.empty() && data, "grad_src");
  require(c.grad_pos, (!c.grad_pos_embeds.empty() || embed) && data, "grad_pos");
  require(c.workspace, needed > 0, "workspace");
  if (c.workspace_bytes < needed)
    throw std::invalid_argument("workspace: " + std::to_string(c.workspace_bytes) +
                                " bytes, the backward needs " + std::to_string(needed));
  a.grad_src = as<const void>(c.grad_src);
  a.grad_pos = as<const void>(c.grad_pos);
  a.grad_level_embed = as<void>(c.grad_level_embed);
  a.workspace = as<void>(c.workspace);
  a.workspace_bytes = c.workspace_bytes;
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        flatten_backward_cpu<typename decltype(tag)::type>(s, a, c.device.threads);
      },
      [&](auto dt) { flatten_backward_cuda(dt, s, a, c.device.index, c.device.stream); });
}

void reference_points(const FlattenCall c) {
  const FlattenShape s = flatten_shape(c.N, 0, c.levels);
  if (c.dtype != "float32" && c.dtype != "float64")
    throw std::invalid_argument("valid_ratios must be float32 or float64, got " + c.dtype);
  require(c.valid_ratios, c.N > 0, "valid_ratios");
  require(c.reference_points, c.N > 0, "reference_points");
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        using A = Acc<typename decltype(tag)::type>;
        encoder_reference_points_cpu<A>(s, as<const A>(c.valid_ratios),
                                        as<A>(c.reference_points), c.device.threads);
      },
      [&](auto dt) {
        encoder_reference_points_cuda(dt, s, as<const void>(c.valid_ratios),
                                      as<void>(c.reference_points), c.device.index,
                                      c.device.stream);
      });
}

}  // namespace

void bind_flatten(py::module_& m) {
  NamedStruct<LevelSize>(m, "LevelSize", "One level of a feature pyramid: H x W pixels.")
      .field("H", &LevelSize::H, "rows")
      .field("W", &LevelSize::W, "columns");
  using C = FlattenCall;
  NamedStruct<C>(m, "FlattenCall",
                 "One flattening pass or reference-points call (ddetr/flatten.h).")
      .field("dtype", &C::dtype, "of the maps; of valid_ratios for the reference points")
      .field("device", &C::device, "where it runs")
      .field("N", &C::N, "batch")
      .field("C", &C::C, "channels")
      .field("levels", &C::levels, "list of LevelSize, one per level")
      .field("features", &C::features, "one (N, C, H, W) per level")
      .field("masks", &C::masks, "one (N, H, W) byte map per level, or empty (no padding)")
      .field("pos_embeds", &C::pos_embeds, "one (N, C, H, W) per level")
      .field("level_embed", &C::level_embed, "(L, C) or 0")
      .field("src", &C::src, "(N, S, C), written")
      .field("pos", &C::pos, "(N, S, C), written")
      .field("mask", &C::mask, "(N, S) bytes, written")
      .field("valid_ratios", &C::valid_ratios, "(N, L, 2) Acc<T>: written, or read")
      .field("grad_src", &C::grad_src, "(N, S, C)")
      .field("grad_pos", &C::grad_pos, "(N, S, C)")
      .field("grad_features", &C::grad_features, "one per level, or empty: not wanted")
      .field("grad_pos_embeds", &C::grad_pos_embeds, "one per level, or empty: not wanted")
      .field("grad_level_embed", &C::grad_level_embed, "(L, C), or 0: not wanted")
      .field("workspace", &C::workspace, "scratch of the backward")
      .field("workspace_bytes", &C::workspace_bytes, "its size")
      .field("reference_points", &C::reference_points, "(N, S, L, 2) Acc<T>, written");
  m.def("flatten_forward", &forward, py::arg("call"),
        "Writes src, pos, mask and valid_ratios.");
  m.def("flatten_backward", &backward, py::arg("call"),
        "Writes the wanted gradients of the features, pos_embeds and level_embed.");
  m.def("flatten_backward_workspace_bytes", &workspace_bytes, py::arg("call"),
        "Workspace bytes flatten_backward needs for this call.");
  m.def("encoder_reference_points", &reference_points, py::arg("call"),
        "Writes the encoder's reference points from valid_ratios.");
}

}  // namespace bind
}  // namespace ddetr
