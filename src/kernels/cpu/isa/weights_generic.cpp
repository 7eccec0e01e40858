// The weight kernels of the generic path (weight_kernels_impl.h). Compiler flags (CMakeLists.txt):
// none (the x86-64 baseline; Highway's SCALAR target).
#define MOE_ISA_NS generic
#define MOE_ISA_TABLE kWeightKernelsGeneric
#include "kernels/cpu/isa/weight_kernels_impl.h"
