// The weight kernels of the avx2 path (weight_kernels_impl.h). Compiler flags (CMakeLists.txt):
// -mavx2 -mfma -mf16c -mbmi -mbmi2 ....
#define MOE_ISA_NS avx2
#define MOE_ISA_TABLE kWeightKernelsAvx2
#include "kernels/cpu/isa/weight_kernels_impl.h"
