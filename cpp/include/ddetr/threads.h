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
