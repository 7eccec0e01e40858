// moe/threading.h: one thread count for OpenMP and OpenBLAS.
//
// OpenBLAS is linked in its OpenMP build, so both draw on one OpenMP pool; inside one of our
// parallel regions a BLAS call runs on the calling thread, so they never oversubscribe.
#pragma once

#include <cstdint>

namespace moe {

// A loop over fewer elements of work than this stays on one thread: forking and joining the
// threads would cost more than it saves, and far more when other processes share the cores.
// (Each element is computed the same way on any thread, so this changes no bits.)
constexpr int64_t kParallelMin = int64_t{1} << 15;

// Sets the number of threads for OpenMP regions and BLAS calls. n <= 0 means all cores.
void set_num_threads(int n);
int num_threads();
int num_cores();

}  // namespace moe
