// Multi-scale deformable attention (ddetr/msda.h): one MsdaCall, filled by
// python/ddetr/_native/msda.py, for the forward, the backward and the backward's
// workspace size. Layouts and element types are those of ddetr/msda.h.
#include "common.h"

namespace ddetr {
namespace bind {
namespace {

struct MsdaCall {
  std::string dtype;  // of value and output: float32, float64, bfloat16 (float16 on CUDA)
  Device device;
  int64_t N = 0, S = 0, M = 0, D = 0, Lq = 0, L = 0, P = 0;
  std::vector<Level> levels;  // L entries
  uintptr_t value = 0, sampling_locations = 0, attention_weights = 0, output = 0;
  // backward
  uintptr_t grad_output = 0, grad_value = 0, grad_sampling_locations = 0,
            grad_attention_weights = 0;
  uintptr_t workspace = 0;
  size_t workspace_bytes = 0;
  bool deterministic = false;  // the CUDA backward without atomics
};

// By value: Python cannot change the call while the kernels run without the GIL.
void forward(const MsdaCall c) {
  const MsdaShape s = msda_shape(c);
  const bool work = s.N * s.Lq * s.M * s.D > 0;
  require(c.output, work, "output");
  require(c.value, work && s.S > 0, "value");
  require(c.sampling_locations, work && s.L * s.P > 0, "sampling_locations");
  require(c.attention_weights, work && s.L * s.P > 0, "attention_weights");
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        using A = Acc<T>;
        msda_forward_cpu<T>(s, as<const T>(c.value), as<const A>(c.sampling_locations),
                            as<const A>(c.attention_weights), as<T>(c.output),
                            c.device.threads);
      },
      [&](auto dt) {
        msda_forward_cuda(dt, s, as<const void>(c.value), as<const void>(c.sampling_locations),
                          as<const void>(c.attention_weights), as<void>(c.output),
                          c.device.index, c.device.stream);
      });
}

size_t workspace_bytes(const MsdaCall& c) {
  const MsdaShape s = msda_shape(c);
  if (c.device.kind != "cuda") return 0;
#ifdef DDETR_WITH_CUDA
  return msda_backward_workspace_bytes_cuda(s, c.deterministic, c.device.index);
#else
  (void)s;
  no_cuda();
#endif
}

void backward(const MsdaCall c) {
  const MsdaShape s = msda_shape(c);
  const bool work = s.N * s.Lq * s.M > 0 && s.L * s.P > 0;
  require(c.grad_output, work && s.D > 0, "grad_output");
  require(c.value, work && s.S * s.D > 0, "value");
  require(c.grad_value, work && s.S * s.D > 0, "grad_value");
  require(c.sampling_locations, work, "sampling_locations");
  require(c.attention_weights, work, "attention_weights");
  require(c.grad_sampling_locations, work, "grad_sampling_locations");
  require(c.grad_attention_weights, work, "grad_attention_weights");
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        using A = Acc<T>;
        msda_backward_cpu<T>(s, as<const T>(c.value), as<const A>(c.sampling_locations),
                             as<const A>(c.attention_weights), as<const T>(c.grad_output),
                             as<A>(c.grad_value), as<A>(c.grad_sampling_locations),
                             as<A>(c.grad_attention_weights), c.device.threads,
                             c.output ? as<T>(c.output) : nullptr);
      },
      [&](auto dt) {
        msda_backward_cuda(dt, s, as<const void>(c.value), as<const void>(c.sampling_locations),
                           as<const void>(c.attention_weights), as<const void>(c.grad_output),
                           as<void>(c.grad_value), as<void>(c.grad_sampling_locations),
                           as<void>(c.grad_attention_weights), as<void>(c.workspace),
                           c.workspace_bytes, c.deterministic, c.device.index,
                           c.device.stream);
      });
}

py::dict tuning() {
  const MsdaCpuTuning t = msda_cpu_tuning();
  py::dict d;
  d["corners_ahead_forward"] = t.corners_ahead_forward;
  d["corners_ahead_backward"] = t.corners_ahead_backward;
  d["queries_ahead"] = t.queries_ahead;
  d["vector_pass"] = t.vector_pass;
  return d;
}

void set_tuning(int corners_ahead_forward, int corners_ahead_backward, int queries_ahead,
                int vector_pass) {
  set_msda_cpu_tuning({corners_ahead_forward, corners_ahead_backward, queries_ahead,
                       vector_pass});
}

}  // namespace

void bind_msda(py::module_& m) {
  using C = MsdaCall;
  NamedStruct<C>(m, "MsdaCall", "One multi-scale deformable attention pass (ddetr/msda.h).")
      .field("dtype", &C::dtype, "storage dtype of value and output")
      .field("device", &C::device, "where it runs")
      .field("N", &C::N, "batch")
      .field("S", &C::S, "value rows: sum of H * W over the levels")
      .field("M", &C::M, "heads")
      .field("D", &C::D, "channels per head")
      .field("Lq", &C::Lq, "queries")
      .field("L", &C::L, "levels")
      .field("P", &C::P, "points per head and level")
      .field("levels", &C::levels, "list of L Level")
      .field("value", &C::value, "(N, S, M, D)")
      .field("sampling_locations", &C::sampling_locations, "(N, Lq, M, L, P, 2), Acc<T>")
      .field("attention_weights", &C::attention_weights, "(N, Lq, M, L, P), Acc<T>")
      .field("output", &C::output,
             "(N, Lq, M, D), written by the forward; by the CPU backward too when not 0 "
             "(the forward's rows, from the corners it gathers)")
      .field("grad_output", &C::grad_output, "(N, Lq, M, D)")
      .field("grad_value", &C::grad_value, "(N, S, M, D), Acc<T>, zeroed by the caller")
      .field("grad_sampling_locations", &C::grad_sampling_locations, "like the locations")
      .field("grad_attention_weights", &C::grad_attention_weights, "like the weights")
      .field("workspace", &C::workspace, "scratch of the CUDA backward")
      .field("workspace_bytes", &C::workspace_bytes, "its size")
      .field("deterministic", &C::deterministic, "the CUDA backward without atomics");
  m.def("msda_forward", &forward, py::arg("call"), "Writes call.output.");
  m.def("msda_backward", &backward, py::arg("call"),
        "Adds into call.grad_value; writes the location and weight gradients.");
  m.def("msda_cpu_tuning", &tuning,
        "The CPU kernels' run-time settings (ddetr/msda.h MsdaCpuTuning) as a dict.");
  m.def("set_msda_cpu_tuning", &set_tuning, py::arg("corners_ahead_forward"),
        py::arg("corners_ahead_backward"), py::arg("queries_ahead"), py::arg("vector_pass"),
        "Sets them (ValueError naming a field out of range or a pass this build lacks).");
  m.def("msda_cpu_widest_pass", &msda_cpu_widest_pass,
        "The vector pass 'auto' runs: 3 AVX-512, 2 AVX2, 1 generic.");
  m.def("msda_backward_workspace_bytes", &workspace_bytes, py::arg("call"),
        "Workspace bytes msda_backward needs for this call (0 on the CPU).");
}

}  // namespace bind
}  // namespace ddetr
