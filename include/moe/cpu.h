// moe/cpu.h: what this CPU can compute, read from CPUID and the OS (never from model numbers),
// and the kernel path the engine runs on it.
//
// The path is the highest level every feature of which the CPU has and the OS has enabled,
// capped by MOE_CPU_PATH (environment) or set_cpu_path_cap (the CLI's --cpu-path, the tests).
// Kernel tables (src/kernels/cpu/dispatch.h) choose their functions from cpu_path() alone, so a
// capped run computes exactly what a CPU of that level would.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace moe {

// Kernel paths, lowest first. Each level requires the features of the ones below it.
enum class CpuPath {
  generic,      // x86-64 baseline (SSE2) or any other CPU: portable C++
  avx2,         // AVX2 + FMA + F16C
  avx512,       // AVX-512 F, BW, DQ, VL
  avx512_vnni,  // + AVX512-VNNI (int8 dot products)
  avx512_bf16,  // + AVX512-BF16 (bf16 dot products, vdpbf16ps)
  amx,          // + AMX tiles with BF16 and INT8, enabled by the OS for this process
};

struct CpuFeatures {
  std::string vendor, brand;
  bool sse2 = false, sse41 = false, sse42 = false;
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx512_fp16 = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  // The OS saves the registers: XMM/YMM, the AVX-512 state, and (after the permission request
  // Linux requires) the AMX tile data.
  bool os_avx = false, os_avx512 = false, os_amx = false;
  // The highest path all of the above allow.
  CpuPath best() const;
  std::string str() const;  // "avx2 fma f16c avx512f ... (os: avx avx512 amx)"
};

// Read once (thread-safe).
const CpuFeatures& cpu_features();

const char* cpu_path_name(CpuPath p);
std::optional<CpuPath> parse_cpu_path(const std::string& name);
std::vector<std::string> cpu_path_names();
// The paths this machine can run: generic up to cpu_features().best(), lowest first.
std::vector<CpuPath> cpu_paths_here();

// The path kernels run: min(best, cap). The cap starts from MOE_CPU_PATH when set (an unknown
// name is an error naming the valid ones). Capping above what the CPU has changes nothing.
CpuPath cpu_path();
void set_cpu_path_cap(CpuPath cap);
// Restores the cap of the environment (or none).
void reset_cpu_path_cap();

}  // namespace moe
