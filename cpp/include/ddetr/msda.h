// The native contract of multi-scale deformable attention (MSDA).
//
// Layouts (all contiguous, row-major):
//   value       (N, S, M, D)          S = sum over levels of H_l * W_l
//   loc         (N, Lq, M, L, P, 2)   normalised (x, y), see bilinear.h
//   attn        (N, Lq, M, L, P)
//   out         (N, Lq, M, D)         = (N, Lq, M * D) for the caller
//   grad_value  (N, S, M, D)          zeroed by the caller
//   grad_loc    like loc, grad_attn like attn: fully written by the kernels
//
// Types: value and out (and grad_out) are in the storage type T (float, double,
// bf16, or __half on CUDA); everything else is in the accumulation type Acc<T>
// (double for double, float otherwise). Locations stay in float because a bf16
// location on a 167-pixel-wide map is off by up to ~0.3 pixel; grad_value is
// accumulated in float because many samples add into each element.
//
// out[n, q, m, :] = sum over l, p of attn[n, q, m, l, p] *
//                   bilinear(value[n, start_l : start_l + H_l*W_l, m, :], loc[n, q, m, l, p])
//
// The native code never allocates tensor memory: the caller hands it every buffer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ddetr/core.h"

namespace ddetr {

struct MsdaShape {
  int64_t N = 0, S = 0, M = 0, D = 0, Lq = 0, L = 0, P = 0;
  int64_t level_h[kMaxLevels] = {};
  int64_t level_w[kMaxLevels] = {};
  int64_t level_start[kMaxLevels] = {};
};

// Throws std::invalid_argument naming the inconsistent size: negative sizes,
// L outside [1, kMaxLevels], non-positive level sizes, level starts that are not
// the running sum of H_l * W_l, a total that differs from S.
void validate(const MsdaShape& shape);

template <class T>
void msda_forward_cpu(const MsdaShape& shape, const T* value, const Acc<T>* loc,
                      const Acc<T>* attn, T* out, int num_threads);

// `out`, when not null, also receives the forward's output (the backward gathers the
// same corners, so a caller that needs both saves the forward's gathers).
template <class T>
void msda_backward_cpu(const MsdaShape& shape, const T* value, const Acc<T>* loc,
                       const Acc<T>* attn, const T* grad_out, Acc<T>* grad_value,
                       Acc<T>* grad_loc, Acc<T>* grad_attn, int num_threads,
                       T* out = nullptr);

// Run-time settings of the CPU kernels, process-wide (read once at the start of each
// call). The prefetch distances never change a result bit, so they may be tuned per
// machine (python/ddetr/ops/msda_tuning.py measures them): how many samples ahead the
// forward and the backward prefetch the corners they gather (and scatter), and how many
// queries ahead the backward prefetches its loc, attn and grad_out rows; 0 = none.
// `vector_pass` picks the copy of the kernels a call runs (each compiled for its
// instruction set, with its own per-sample channel loops): kPassAuto (the widest this
// build has and this CPU runs), kPassGeneric (the portable loops, the build's flags),
// kPassAvx2, kPassAvx512; a pass the build lacks or the CPU cannot run is refused by
// set_msda_cpu_tuning. The passes add
// the corners in a different order, so forcing one is for tests; each is bitwise the
// same at any thread count, and its forward equals its backward's forward row.
enum MsdaPass : int { kPassAuto = 0, kPassGeneric = 1, kPassAvx2 = 2, kPassAvx512 = 3 };
struct MsdaCpuTuning {
  int corners_ahead_forward = 32;
  int corners_ahead_backward = 16;
  int queries_ahead = 4;
  int vector_pass = kPassAuto;
};
MsdaCpuTuning msda_cpu_tuning();
// Throws std::invalid_argument naming the field: distances outside [0, 256], a pass
// that is not one of the above or that this build does not have.
void set_msda_cpu_tuning(const MsdaCpuTuning& tuning);
// The pass kPassAuto resolves to here: the widest this build has and this CPU runs
// (kPassAvx512, kPassAvx2 or kPassGeneric).
int msda_cpu_widest_pass();
// Whether the CPU kernels were compiled once per instruction set (GCC on x86), so that
// the passes a CPU runs do not depend on the build's -march; otherwise a build has the
// passes its flags allow.
bool msda_cpu_per_isa();

// CUDA launchers (cuda/msda_forward.cu, cuda/msda_backward*.cu). `stream` is a
// cudaStream_t passed as an integer so this header stays free of CUDA includes; `device`
// is the CUDA device index the pointers live on. Both throw std::runtime_error on CUDA errors.
// loc, attn, grad_value, grad_loc and grad_attn are float for f32/f16/bf16 and
// double for f64.
void msda_forward_cuda(DType dtype, const MsdaShape& shape, const void* value, const void* loc,
                       const void* attn, void* out, int device, uintptr_t stream);

// Scratch bytes the backward needs on `device` (0 for the fast, atomic path).
size_t msda_backward_workspace_bytes_cuda(const MsdaShape& shape, bool deterministic,
                                          int device);

void msda_backward_cuda(DType dtype, const MsdaShape& shape, const void* value,
                        const void* loc, const void* attn, const void* grad_out,
                        void* grad_value, void* grad_loc, void* grad_attn, void* workspace,
                        size_t workspace_bytes, bool deterministic, int device,
                        uintptr_t stream);

}  // namespace ddetr
