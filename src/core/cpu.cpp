// CPU features from CPUID and XGETBV, and the kernel path (see moe/cpu.h).
#include "moe/cpu.h"

#include <fmt/format.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "moe/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define MOE_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace moe {

namespace {

#ifdef MOE_X86
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

unsigned long long xgetbv0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return ((v >> i) & 1u) != 0; }

// Linux gives a process the AMX tile state only after it asks (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile instruction faults.
bool request_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  const Regs v = cpuid(0, 0);
  char vendor[13] = {};
  std::memcpy(vendor, &v.b, 4);
  std::memcpy(vendor + 4, &v.d, 4);
  std::memcpy(vendor + 8, &v.c, 4);
  f.vendor = vendor;
  const unsigned max_leaf = v.a;
  if (cpuid(0x80000000u, 0).a >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i, &r, 16);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
    f.brand.erase(0, f.brand.find_first_not_of(' '));
  }
  const Regs l1 = cpuid(1, 0);
  f.sse2 = bit(l1.d, 26);
  f.sse41 = bit(l1.c, 19);
  f.sse42 = bit(l1.c, 20);
  f.fma = bit(l1.c, 12);
  f.avx = bit(l1.c, 28);
  f.f16c = bit(l1.c, 29);
  const bool osxsave = bit(l1.c, 27);
  if (max_leaf >= 7) {
    const Regs l7 = cpuid(7, 0);
    f.avx2 = bit(l7.b, 5);
    f.avx512f = bit(l7.b, 16);
    f.avx512dq = bit(l7.b, 17);
    f.avx512bw = bit(l7.b, 30);
    f.avx512vl = bit(l7.b, 31);
    f.avx512_vnni = bit(l7.c, 11);
    f.amx_bf16 = bit(l7.d, 22);
    f.avx512_fp16 = bit(l7.d, 23);
    f.amx_tile = bit(l7.d, 24);
    f.amx_int8 = bit(l7.d, 25);
    if (l7.a >= 1) {
      const Regs l71 = cpuid(7, 1);
      f.avx_vnni = bit(l71.a, 4);
      f.avx512_bf16 = bit(l71.a, 5);
    }
  }
  if (osxsave) {
    const unsigned long long xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;                          // XMM and YMM state
    f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;         // opmask, ZMM_Hi256, Hi16_ZMM
    const bool tiles_in_xcr0 = (xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
    f.os_amx = f.os_avx512 && tiles_in_xcr0 && f.amx_tile && request_amx();
  }
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

constexpr const char* kNames[] = {"generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
constexpr int kLevels = 6;

// -1: no cap.
std::atomic<int> g_cap{-2};  // -2: not read from the environment yet

int env_cap() {
  const char* e = std::getenv("MOE_CPU_PATH");
  if (!e || !*e) return -1;
  const auto p = parse_cpu_path(e);
  MOE_CHECK(p.has_value(), "cpu", "MOE_CPU_PATH={} is not a kernel path; one of: {}", e,
            fmt::join(cpu_path_names(), ", "));
  return static_cast<int>(*p);
}

}  // namespace

CpuPath CpuFeatures::best() const {
  const bool l_avx2 = os_avx && avx && avx2 && fma && f16c;
  const bool l_avx512 = l_avx2 && os_avx512 && avx512f && avx512bw && avx512dq && avx512vl;
  const bool l_vnni = l_avx512 && avx512_vnni;
  const bool l_bf16 = l_vnni && avx512_bf16;
  const bool l_amx = l_bf16 && os_amx && amx_bf16 && amx_int8;
  return l_amx      ? CpuPath::amx
         : l_bf16   ? CpuPath::avx512_bf16
         : l_vnni   ? CpuPath::avx512_vnni
         : l_avx512 ? CpuPath::avx512
         : l_avx2   ? CpuPath::avx2
                    : CpuPath::generic;
}

std::string CpuFeatures::str() const {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(sse2, "sse2");
  add(sse42, "sse4.2");
  add(avx, "avx");
  add(avx2, "avx2");
  add(fma, "fma");
  add(f16c, "f16c");
  add(avx512f, "avx512f");
  add(avx512bw, "avx512bw");
  add(avx512dq, "avx512dq");
  add(avx512vl, "avx512vl");
  add(avx512_vnni, "avx512_vnni");
  add(avx512_bf16, "avx512_bf16");
  add(avx512_fp16, "avx512_fp16");
  add(avx_vnni, "avx_vnni");
  add(amx_tile, "amx_tile");
  add(amx_bf16, "amx_bf16");
  add(amx_int8, "amx_int8");
  std::string os;
  auto add_os = [&](bool on, const char* name) {
    if (on) os += os.empty() ? name : fmt::format(" {}", name);
  };
  add_os(os_avx, "avx");
  add_os(os_avx512, "avx512");
  add_os(os_amx, "amx");
  return fmt::format("{} (enabled by the OS: {})", s.empty() ? "none" : s,
                     os.empty() ? "none" : os);
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* cpu_path_name(CpuPath p) { return kNames[static_cast<int>(p)]; }

std::optional<CpuPath> parse_cpu_path(const std::string& name) {
  for (int i = 0; i < kLevels; ++i)
    if (name == kNames[i]) return static_cast<CpuPath>(i);
  return std::nullopt;
}

std::vector<std::string> cpu_path_names() { return {std::begin(kNames), std::end(kNames)}; }

std::vector<CpuPath> cpu_paths_here() {
  std::vector<CpuPath> out;
  for (const std::string& name : cpu_path_names()) {
    const CpuPath p = *parse_cpu_path(name);
    if (p <= cpu_features().best()) out.push_back(p);
  }
  return out;
}

CpuPath cpu_path() {
  int cap = g_cap.load(std::memory_order_relaxed);
  if (cap == -2) {
    cap = env_cap();
    g_cap.store(cap, std::memory_order_relaxed);
  }
  const int best = static_cast<int>(cpu_features().best());
  return static_cast<CpuPath>(cap < 0 ? best : std::min(best, cap));
}

void set_cpu_path_cap(CpuPath cap) { g_cap.store(static_cast<int>(cap)); }

void reset_cpu_path_cap() { g_cap.store(-2); }

}  // namespace moe
