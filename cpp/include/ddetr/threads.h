// How many OpenMP threads a CPU kernel uses: torch's choice (passed down from Python,
// torch.get_num_threads()), or one thread for work too small to pay for waking a team.
// On a loaded machine a worker that has to wait for a core can cost a whole scheduler
// slice, so small calls stay on the caller's thread.
#pragma once

#include <cstdint>

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

}  // namespace ddetr
