// Thread count, shared by OpenMP and OpenBLAS.
#include "moe/threading.h"

#include <cblas.h>
#include <omp.h>

namespace moe {

int num_cores() { return omp_get_num_procs(); }

void set_num_threads(int n) {
  if (n <= 0) n = num_cores();
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace moe
