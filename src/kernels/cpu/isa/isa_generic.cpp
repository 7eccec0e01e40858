// The per-ISA kernels of the generic path (isa_kernels_impl.h). Compiler flags (CMakeLists.txt):
// none (the x86-64 baseline; Highway's SCALAR target).
#define MOE_ISA_NS generic
#define MOE_ISA_TABLE kIsaKernelsGeneric
#include "kernels/cpu/isa/isa_kernels_impl.h"
