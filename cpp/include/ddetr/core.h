// What every native family (msda, flatten, dropout, blas, layers) shares, and nothing
// more: the element-type tag the launchers dispatch on, the capacity of the level
// table, and (through scalar.h) the storage types and their accumulation types.
//
// Framework-free C++17, usable from host and device code: the CUDA files include it
// too (cuda/common.cuh), so one DType and one kMaxLevels serve both sides.
#pragma once

#include <cstdint>

#include "ddetr/scalar.h"  // bf16, Acc<T>, to_acc / from_acc

namespace ddetr {

// Element types understood by the launchers: the CPU takes f32, f64 and bf16, CUDA
// also f16. Which types a given entry point accepts is stated at its declaration.
enum class DType { f32, f64, f16, bf16 };

// The level table (H_l, W_l, start_l per level) travels by value into kernels, so it
// has a fixed capacity.
constexpr int kMaxLevels = 64;

}  // namespace ddetr
