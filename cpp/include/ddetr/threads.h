// How many OpenMP threads a CPU kernel uses: torch's choice (passed down from Python,
// torch.get_num_threads()), or one thread for work too small to pay for waking a team.
// On a loaded machine a worker that has to wait for a core can cost a whole scheduler
// slice, so small calls stay on the caller's thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

// How a loop's iterations are shared by a team: dynamically, chunk by chunk, so that a
// thread that starts late or runs slowly (another process holds its core) takes fewer
// chunks instead of making the team wait for a fixed share (with static shares one busy
// core slowed every call to the pace of its half). Each iteration computes the same
// thing whichever thread runs it, so results stay bitwise the same at any thread count.
// Used inside `#pragma omp` lines, which are macro-expanded.
#define DDETR_SHARE_ITEMS schedule(dynamic, 1)      // items of real work (a GEMM chunk, a panel)
#define DDETR_SHARE_ROWS schedule(dynamic, 16)      // rows of a few hundred elements
#define DDETR_SHARE_ELEMENTS schedule(dynamic, 8192)  // single elements

namespace ddetr {

inline int resolve_threads(int requested, int64_t work, int64_t serial_below) {
#ifdef _OPENMP
  if (work < serial_below) return 1;
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  (void)work;
  (void)serial_below;
  return 1;
#endif
}

// Inside a parallel region: this thread's number in its team (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Inside a parallel region: this thread's share [begin, end) of `total` items, in
// contiguous slices that are multiples of `align` (the last may be shorter or empty).
inline std::pair<int64_t, int64_t> thread_slice(int64_t total, int64_t align) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  const int64_t per = ((total + nt - 1) / nt + align - 1) / align * align;
  const int64_t begin = std::min(total, t * per);
  return {begin, std::min(total, begin + per)};
}

}  // namespace ddetr
