// Dropout with regenerated masks (ddetr/dropout.h) on flat arrays of n elements: one
// DropoutCall, filled by python/ddetr/_native/dropout.py, for dropout / relu_dropout and
// relu_dropout's backward.
#include "common.h"
#include "ddetr/dropout.h"

namespace ddetr {
namespace bind {
namespace {

struct DropoutCall {
  std::string dtype;
  Device device;
  int64_t n = 0;
  double p = 0.0;
  uint64_t seed = 0, offset = 0;
  bool relu = false;
  uintptr_t x = 0, out = 0;       // dropout: reads x, writes out (may be x)
  uintptr_t grad_out = 0, grad_x = 0;  // relu_dropout_backward: reads out and grad_out
};

DropoutArgs dropout_args(int64_t n, double p, uint64_t seed, uint64_t offset) {
  DropoutArgs a;
  a.n = n;
  a.p = float(p);
  a.seed = seed;
  a.offset = offset;
  validate_dropout(a);
  return a;
}

// By value: Python cannot change the call while the kernels run without the GIL.
void dropout(const DropoutCall c) {
  const DropoutArgs a = dropout_args(c.n, c.p, c.seed, c.offset);
  require(c.x, c.n > 0, "x");
  require(c.out, c.n > 0, "out");
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        dropout_cpu<T>(a, as<const T>(c.x), as<T>(c.out), c.relu, c.device.threads);
      },
      [&](auto dt) {
        dropout_cuda(dt, a, as<const void>(c.x), as<void>(c.out), c.relu, c.device.index,
                     c.device.stream);
      });
}

// Needs no mask: seed and offset are not read.
void relu_dropout_backward(const DropoutCall c) {
  const DropoutArgs a = dropout_args(c.n, c.p, 0, 0);
  require(c.out, c.n > 0, "out");
  require(c.grad_out, c.n > 0, "grad_out");
  require(c.grad_x, c.n > 0, "grad_x");
  py::gil_scoped_release unlocked;
  on_device(
      c.dtype, c.device,
      [&](auto tag) {
        using T = typename decltype(tag)::type;
        relu_dropout_backward_cpu<T>(a, as<const T>(c.out), as<const T>(c.grad_out),
                                     as<T>(c.grad_x), c.device.threads);
      },
      [&](auto dt) {
        relu_dropout_backward_cuda(dt, a, as<const void>(c.out), as<const void>(c.grad_out),
                                   as<void>(c.grad_x), c.device.index, c.device.stream);
      });
}

}  // namespace

void bind_dropout(py::module_& m) {
  using C = DropoutCall;
  NamedStruct<C>(m, "DropoutCall", "Philox dropout on n contiguous elements (ddetr/dropout.h).")
      .field("dtype", &C::dtype, "of x, out and the gradients")
      .field("device", &C::device, "where it runs")
      .field("n", &C::n, "elements")
      .field("p", &C::p, "drop probability in [0, 1]")
      .field("seed", &C::seed, "Philox key")
      .field("offset", &C::offset, "high half of the Philox counter")
      .field("relu", &C::relu, "relu_dropout: ReLU before dropping")
      .field("x", &C::x, "input of dropout")
      .field("out", &C::out, "output of dropout; input of relu_dropout_backward")
      .field("grad_out", &C::grad_out, "gradient of out")
      .field("grad_x", &C::grad_x, "gradient of x, written by relu_dropout_backward");
  m.def("dropout", &dropout, py::arg("call"), "Writes call.out.");
  m.def("relu_dropout_backward", &relu_dropout_backward, py::arg("call"),
        "Writes call.grad_x from call.out and call.grad_out.");
}

}  // namespace bind
}  // namespace ddetr
