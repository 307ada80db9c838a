// The structs every family's call carries: Device and Level (bindings/common.h).
#include "common.h"

namespace ddetr {
namespace bind {

void bind_common(py::module_& m) {
  NamedStruct<Device>(m, "Device", "Where a native call runs.")
      .field("kind", &Device::kind, "\"cpu\" or \"cuda\"")
      .field("index", &Device::index, "CUDA device index the pointers live on (-1 on the CPU)")
      .field("stream", &Device::stream, "torch's current cudaStream_t there (0 on the CPU)")
      .field("threads", &Device::threads, "CPU threads of the kernels (torch's setting)");
  NamedStruct<Level>(m, "Level", "One level of a multi-scale value map.")
      .field("H", &Level::H, "rows of the level")
      .field("W", &Level::W, "columns of the level")
      .field("start", &Level::start, "its first row in the flattened map: sum of earlier H * W");
}

}  // namespace bind
}  // namespace ddetr
