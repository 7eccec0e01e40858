// The machine's floating-point limit: independent chains of fused multiply-adds, as wide as the
// kernel path allows, on every thread (see moe/kernels.h).
#include <omp.h>

#include <chrono>

#include "moe/cpu.h"
#include "moe/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moe::cpu {

namespace {

// Twelve independent accumulators cover the latency of two FMA units (4 cycles x 2 per cycle,
// with room to spare); the result is returned so the loop is not removed.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) float fma_chains_avx512(int64_t n) {
  __m512 a[12];
  for (auto& v : a) v = _mm512_set1_ps(1.0f);
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
  for (int64_t i = 0; i < n; ++i)
#pragma GCC unroll 12
    for (auto& v : a) v = _mm512_fmadd_ps(v, b, c);
  __m512 s = a[0];
  for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, a[j]);
  alignas(64) float r[16];  // (GCC 12 warns falsely inside _mm512_reduce_add_ps)
  _mm512_store_ps(r, s);
  float t = 0;
  for (float x : r) t += x;
  return t;
}

__attribute__((target("avx2,fma"))) float fma_chains_avx2(int64_t n) {
  __m256 a[12];
  for (auto& v : a) v = _mm256_set1_ps(1.0f);
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
  for (int64_t i = 0; i < n; ++i)
#pragma GCC unroll 12
    for (auto& v : a) v = _mm256_fmadd_ps(v, b, c);
  __m256 s = a[0];
  for (int j = 1; j < 12; ++j) s = _mm256_add_ps(s, a[j]);
  alignas(32) float r[8];
  _mm256_store_ps(r, s);
  return r[0] + r[1] + r[2] + r[3] + r[4] + r[5] + r[6] + r[7];
}
#endif

// Baseline: a multiply and an add on 4 lanes (SSE2 has no fused form).
float fma_chains_generic(int64_t n) {
  float a[12][4];
  for (auto& v : a)
    for (float& x : v) x = 1.0f;
  for (int64_t i = 0; i < n; ++i)
    for (auto& v : a)
      for (float& x : v) x = x * 0.999999f + 1e-6f;
  float s = 0;
  for (auto& v : a)
    for (float x : v) s += x;
  return s;
}

}  // namespace

double fma_peak_gflops() {
  const CpuPath p = cpu_path();
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    int64_t n = 1 << 24;
    double flops_per_iter = 12.0 * 2 * 4;
    float (*fn)(int64_t) = fma_chains_generic;
#if defined(__x86_64__)
    if (p >= CpuPath::avx512) {
      fn = fma_chains_avx512;
      flops_per_iter = 12.0 * 2 * 16;
    } else if (p >= CpuPath::avx2) {
      fn = fma_chains_avx2;
      flops_per_iter = 12.0 * 2 * 8;
    }
#endif
    fn(n / 16);  // wake the wide units
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      volatile float sink = fn(n);
      (void)sink;
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, static_cast<double>(n) * flops_per_iter / s / 1e9);
    }
    total += best;
  }
  return total;
}

}  // namespace moe::cpu
