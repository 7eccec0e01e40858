// The per-ISA kernels of the avx512 path (isa_kernels_impl.h). Compiler flags (CMakeLists.txt):
// AVX2's and -mavx512f -mavx512bw -mavx512dq -mavx512vl.
#define MOE_ISA_NS avx512
#define MOE_ISA_TABLE kIsaKernelsAvx512
#include "kernels/cpu/isa/isa_kernels_impl.h"
