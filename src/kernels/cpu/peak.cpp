// The machine's floating-point limit: independent chains of fused multiply-adds, as wide as the
// kernel path allows, on every thread (see moe/kernels.h).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "moe/cpu.h"
#include "moe/error.h"
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

// Sums n floats (n a multiple of 32) with independent accumulators.
#if defined(__x86_64__)
__attribute__((target("avx2"))) float sum_avx2(const float* p, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_load_ps(p + i));
    s1 = _mm256_add_ps(s1, _mm256_load_ps(p + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_load_ps(p + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float r[8];
  _mm256_store_ps(r, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  return r[0] + r[1] + r[2] + r[3] + r[4] + r[5] + r[6] + r[7];
}
#endif

float sum_generic(const float* p, int64_t n) {
  float acc[32] = {};
  for (int64_t i = 0; i < n; i += 32)
    for (int j = 0; j < 32; ++j) acc[j] += p[i + j];
  float t = 0;
  for (float v : acc) t += v;
  return t;
}

}  // namespace

double read_bandwidth_gbs(int64_t bytes) {
  const int64_t n = std::max<int64_t>(1024, bytes / 4 / 1024 * 1024);
  float* p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * 4));
  MOE_CHECK(p != nullptr, "bandwidth", "cannot allocate {} bytes", n * 4);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(i & 1023);
  float (*sum)(const float*, int64_t) = sum_generic;
#if defined(__x86_64__)
  if (cpu_path() >= CpuPath::avx2) sum = sum_avx2;
#endif
  double best = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 9; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      // Each thread sums its contiguous share (in blocks of 1024 floats).
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num(), blocks = n / 1024;
      const int64_t b0 = blocks * id / nt, b1 = blocks * (id + 1) / nt;
      total += sum(p + b0 * 1024, (b1 - b0) * 1024);
    }
    sink = sink + total;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) best = std::min(best, s);  // the first pass warms up
  }
  std::free(p);
  return static_cast<double>(n) * 4.0 / best / 1e9;
}

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
    fn(n);  // wake the wide units (the clock settles after some milliseconds of them)
    double best = 0;
    for (int rep = 0; rep < 10; ++rep) {
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
