// The per-ISA kernels of the avx2 path (isa_kernels_impl.h). Compiler flags (CMakeLists.txt):
// -mavx2 -mfma -mf16c -mbmi -mbmi2 ....
#define MOE_ISA_NS avx2
#define MOE_ISA_TABLE kIsaKernelsAvx2
#include "kernels/cpu/isa/isa_kernels_impl.h"
