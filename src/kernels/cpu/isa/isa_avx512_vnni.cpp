// The per-ISA kernels of the avx512_vnni path (isa_kernels_impl.h): the avx512 path's with
// VNNI's vpdpbusd and vpdpwssd summing the int8 products of the quantized weights (the same exact
// integer sums, in fewer instructions). Compiler flags (CMakeLists.txt): the avx512 path's and
// -mavx512vnni.
#define MOE_ISA_NS avx512_vnni
#define MOE_ISA_TABLE kIsaKernelsAvx512Vnni
#include "kernels/cpu/isa/isa_kernels_impl.h"
