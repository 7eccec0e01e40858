// moe/threading.h: one thread count for OpenMP and OpenBLAS.
//
// OpenBLAS is linked in its OpenMP build, so both draw on one OpenMP pool; inside one of our
// parallel regions a BLAS call runs on the calling thread, so they never oversubscribe.
#pragma once

namespace moe {

// Sets the number of threads for OpenMP regions and BLAS calls. n <= 0 means all cores.
void set_num_threads(int n);
int num_threads();
int num_cores();

}  // namespace moe
