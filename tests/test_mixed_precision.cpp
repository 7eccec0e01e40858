// bf16 operands with float32 accumulation (moe/kernels.h: gemm_bf16, Bf16Operands; moe/weights.h:
// round_to_bf16): the rounding against the scalar reference on every path, the products against
// a float64 sum of the same bf16 values within the bound of float32 accumulation, and the same
// bits on any thread count. The ctest entries kernels_on_path_* run these again in processes
// capped below AVX-512, where the exact fallback (widened operands, float32 GEMM) computes them.
#include <gtest/gtest.h>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moe/cpu.h"
#include "moe/error.h"
#include "moe/kernels.h"
#include "moe/rng.h"
#include "moe/weights.h"

namespace moe {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // float32's unit roundoff

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

std::vector<float> normals(int64_t n, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(rng.normal());
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> h;
  for (float x : v) h.push_back(f32_to_bf16(x));
  return h;
}

// op(A)[i, p] of a row-major A with leading dimension ld.
template <class T>
T at(const std::vector<T>& a, bool trans, int64_t ld, int64_t i, int64_t p) {
  return trans ? a[static_cast<size_t>(p * ld + i)] : a[static_cast<size_t>(i * ld + p)];
}

}  // namespace

TEST(MixedPrecision, RoundToBf16GivesTheScalarBitsOnEveryPath) {
  Rng rng(11);
  std::vector<float> x;
  for (int i = 0; i < 5000; ++i)
    x.push_back(static_cast<float>(rng.normal() * std::exp(rng.normal() * 20)));
  // Ties (even and odd), the largest finite values (one rounds to infinity), subnormals,
  // infinities, NaNs of both signs and payloads, zeros.
  for (uint32_t b : {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7f7fffffu, 0x7f7f7fffu, 0x00000001u,
                     0x00008000u, 0x80018000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u,
                     0xffbfffffu, 0x00000000u, 0x80000000u})
    x.push_back(from_bits(b));
  const int64_t rows = 37, cols = static_cast<int64_t>(x.size()) / rows, ld = cols + 5;
  std::vector<float> strided(static_cast<size_t>(rows * ld), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(&strided[static_cast<size_t>(r * ld)], &x[static_cast<size_t>(r * cols)],
                static_cast<size_t>(cols) * 4);
  for (CpuPath p : cpu_paths_here()) {
    set_cpu_path_cap(p);
    std::vector<uint16_t> flat(x.size()), rect(static_cast<size_t>(rows * cols));
    cpu::round_to_bf16(x.data(), 1, static_cast<int64_t>(x.size()), 0, flat.data());
    cpu::round_to_bf16(strided.data(), rows, cols, ld, rect.data());
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(flat[i], f32_to_bf16(x[i])) << cpu_path_name(p) << " x " << x[i];
    for (size_t i = 0; i < rect.size(); ++i)
      ASSERT_EQ(rect[i], f32_to_bf16(x[i])) << cpu_path_name(p) << " strided, x " << x[i];
  }
  reset_cpu_path_cap();
  EXPECT_EQ(f32_to_bf16(from_bits(0x7f7fffffu)), 0x7f80u);                    // rounds to infinity
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(from_bits(0x7f800001u)))));  // stays a NaN
}

// Odd shapes, every transpose, alpha and beta: C against the float64 sum of the same bf16
// products, |C - ref| <= (k+2) u sum |a b| + 2u |beta c| (float32 accumulation, then alpha and
// beta applied once each).
TEST(MixedPrecision, GemmBf16WithinTheFloat32Bound) {
  Rng rng(12);
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (int64_t m : {1, 3, 70, 300})
        for (int64_t n : {1, 17, 259})
          for (int64_t k : {1, 2, 31, 513, 1500}) {  // 1500: k in chunks where C is small
            const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
            const std::vector<uint16_t> a = to_bf16(normals((ta ? k : m) * lda, rng));
            const std::vector<uint16_t> b = to_bf16(normals((tb ? n : k) * ldb, rng));
            std::vector<float> c = normals(m * ldc, rng);
            const std::vector<float> c0 = c;
            const float alpha = 0.75f, beta = m % 2 ? 0.5f : 0.0f;
            cpu::gemm_bf16(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(),
                           ldc);
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < ldc; ++j) {
                const size_t o = static_cast<size_t>(i * ldc + j);
                if (j >= n) {  // the padding is untouched
                  ASSERT_EQ(c[o], c0[o]);
                  continue;
                }
                double ref = 0, mag = 0;
                for (int64_t p = 0; p < k; ++p) {
                  const double t = static_cast<double>(bf16_to_f32(at(a, ta, lda, i, p))) *
                                   bf16_to_f32(at(b, tb, ldb, p, j));
                  ref += t;
                  mag += std::fabs(t);
                }
                const double bc = beta == 0.0f ? 0.0 : static_cast<double>(beta) * c0[o];
                const double want = alpha * ref + bc;
                const double bound = (static_cast<double>(k) + 2) * kU * alpha * mag +
                                     2 * kU * std::fabs(bc) + 2 * kU * std::fabs(want) + 1e-30;
                ASSERT_LE(std::fabs(c[o] - want), bound)
                    << "ta " << ta << " tb " << tb << " m " << m << " n " << n << " k " << k
                    << " at " << i << "," << j << " (" << cpu::gemm_bf16_backend_info() << ")";
              }
          }
}

// gemm<float> under Bf16Operands is gemm_bf16 of the rounded operands, bit for bit, and within
// the mixed-precision bound of the float32 product; the scope restores float32.
TEST(MixedPrecision, Bf16OperandsRoundThenMultiply) {
  Rng rng(13);
  const int64_t m = 300, n = 130, k = 200;
  const std::vector<float> a = normals(k * m, rng), b = normals(k * n, rng);  // A^T, B
  std::vector<float> mixed(static_cast<size_t>(m * n)), direct(mixed.size()), f32(mixed.size());
  EXPECT_FALSE(cpu::Bf16Operands::active());
  {
    const cpu::Bf16Operands on;
    EXPECT_TRUE(cpu::Bf16Operands::active());
    cpu::gemm<float>(true, false, m, n, k, 1.0f, a.data(), m, b.data(), n, 0.0f, mixed.data(), n);
  }
  EXPECT_FALSE(cpu::Bf16Operands::active());
  const std::vector<uint16_t> ha = to_bf16(a), hb = to_bf16(b);
  cpu::gemm_bf16(true, false, m, n, k, 1.0f, ha.data(), m, hb.data(), n, 0.0f, direct.data(), n);
  EXPECT_EQ(std::memcmp(mixed.data(), direct.data(), mixed.size() * 4), 0);
  cpu::gemm<float>(true, false, m, n, k, 1.0f, a.data(), m, b.data(), n, 0.0f, f32.data(), n);
  double worst = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double t = static_cast<double>(a[static_cast<size_t>(p * m + i)]) *
                         b[static_cast<size_t>(p * n + j)];
        ref += t;
        mag += std::fabs(t);
      }
      const double err = std::fabs(mixed[static_cast<size_t>(i * n + j)] - ref);
      ASSERT_LE(err, (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) +
                      (static_cast<double>(k) + 2) * std::ldexp(1.0, -23)) *
                         mag);
      worst = std::max(worst, err / mag);
    }
  // The bound is not loose by orders of magnitude: bf16 rounding shows (about 2^-9 of sum |ab|
  // on random data), and float32 alone is far more exact.
  EXPECT_GT(worst, std::ldexp(1.0, -12));
  EXPECT_NE(std::memcmp(mixed.data(), f32.data(), mixed.size() * 4), 0);
}

// Ranges kept in a store are rounded once and read from there: the same bits as rounding them
// again, found only where a product's whole operand lies inside one, forgotten with a Bf16Kept,
// cleared with the scope; a range changed after it was kept is caught in verify mode.
TEST(MixedPrecision, KeptOperandsAreTheSameBits) {
  Rng rng(21);
  const int64_t m = 90, n = 70, k = 80;
  const std::vector<float> a = normals(m * k + 8, rng), b = normals(n * k, rng);
  std::vector<float> plain(static_cast<size_t>(m * n)), kept(plain.size());
  cpu::Bf16Store store;
  {
    const cpu::Bf16Operands on;
    cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data() + 3, k, b.data(), k, 0.0f, plain.data(),
                     n);
  }
  {
    const cpu::Bf16Operands on(true, &store);
    cpu::bf16_keep(a.data(), static_cast<int64_t>(a.size()));
    EXPECT_FALSE(store.keep(a.data() + 5, 10));  // overlaps: not kept twice
    EXPECT_EQ(store.kept_values(), static_cast<int64_t>(a.size()));
    const uint16_t* in = cpu::Bf16Operands::rounded(a.data() + 3, (m - 1) * k + k);
    ASSERT_NE(in, nullptr);
    EXPECT_EQ(in[0], f32_to_bf16(a[3]));
    EXPECT_EQ(cpu::Bf16Operands::rounded(b.data(), 4), nullptr);                  // not kept
    EXPECT_EQ(cpu::Bf16Operands::rounded(a.data() + 4, m * k + 8 - 3), nullptr);  // runs past
    {
      const cpu::Bf16Kept kb(b.data(), static_cast<int64_t>(b.size()));
      EXPECT_NE(cpu::Bf16Operands::rounded(b.data() + 1, 4), nullptr);
      cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data() + 3, k, b.data(), k, 0.0f, kept.data(),
                       n);
    }
    EXPECT_EQ(cpu::Bf16Operands::rounded(b.data(), 4), nullptr);  // forgotten
  }
  EXPECT_EQ(std::memcmp(plain.data(), kept.data(), plain.size() * 4), 0);
  EXPECT_EQ(store.kept_values(), 0);  // cleared with the scope
  EXPECT_EQ(cpu::Bf16Operands::store(), nullptr);

  std::vector<float> changing = normals(k * n, rng);
  cpu::Bf16Store::set_verify(true);
  {
    const cpu::Bf16Operands on(true, &store);
    cpu::bf16_keep(changing.data(), k * n);
    changing[7] += 1.0f;
    try {
      cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data(), k, changing.data(), k, 0.0f,
                       kept.data(), n);
      ADD_FAILURE() << "a kept range that changed was read";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("changed after it was rounded"), std::string::npos)
          << e.what();
    }
  }
  cpu::Bf16Store::set_verify(false);
}

// A product with a dimension of 32 or less stays float32 under Bf16Operands.
TEST(MixedPrecision, NarrowProductsStayFloat32) {
  Rng rng(22);
  for (const auto [m, n, k] :
       {std::array<int64_t, 3>{128, 128, 32}, {300, 8, 128}, {24, 100, 90}}) {
    const std::vector<float> a = normals(m * k, rng), b = normals(n * k, rng);
    std::vector<float> mixed(static_cast<size_t>(m * n)), f32(mixed.size());
    {
      const cpu::Bf16Operands on;
      cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, mixed.data(), n);
    }
    cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, f32.data(), n);
    EXPECT_EQ(std::memcmp(mixed.data(), f32.data(), f32.size() * 4), 0)
        << m << "x" << n << "x" << k;
  }
}

TEST(MixedPrecision, SameBitsForAnyThreadCount) {
  Rng rng(14);
  const int saved = omp_get_max_threads();
  for (const auto [m, n, k] : {std::array<int64_t, 3>{700, 600, 300}, {200, 130, 2000}}) {
    const std::vector<uint16_t> a = to_bf16(normals(m * k, rng)), b = to_bf16(normals(n * k, rng));
    std::vector<float> c1(static_cast<size_t>(m * n), 1.0f), c2(c1.size(), 1.0f);
    omp_set_num_threads(1);
    cpu::gemm_bf16(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.5f, c1.data(), n);
    omp_set_num_threads(2);
    cpu::gemm_bf16(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.5f, c2.data(), n);
    EXPECT_EQ(std::memcmp(c1.data(), c2.data(), c1.size() * 4), 0) << m << "x" << n << "x" << k;
  }
  omp_set_num_threads(saved);
}

// The float32 exponential of softmax and cross-entropy on every path: each value within 2 ulp of
// exp in float64 (Highway's exp is within 1 ulp; x - shift is rounded once), the sum within the
// float32 bound of its terms, in place too, with tails after every vector width.
TEST(KernelPaths, ExpShiftedWithinTwoUlpOnEveryPath) {
  Rng rng(15);
  for (CpuPath p : cpu_paths_here()) {
    set_cpu_path_cap(p);
    for (int64_t n : {1, 5, 16, 37, 259}) {
      std::vector<float> x = normals(n, rng);
      for (float& v : x) v *= 8.0f;
      x[0] = -100.0f;  // underflows to 0 or a subnormal
      const float shift = 3.5f;
      std::vector<float> y(x.size());
      const float sum = cpu::exp_shifted(y.data(), x.data(), n, shift);
      double ref_sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double want = std::exp(static_cast<double>(x[j] - shift));
        ASSERT_LE(std::fabs(y[j] - want), 2 * std::ldexp(want, -23) + 1e-44)
            << cpu_path_name(p) << " exp(" << x[j] << " - " << shift << ")";
        ref_sum += y[j];
      }
      EXPECT_LE(std::fabs(sum - ref_sum), (static_cast<double>(n) + 1) * kU * ref_sum);
      std::vector<float> inplace = x;
      EXPECT_EQ(cpu::exp_shifted(inplace.data(), inplace.data(), n, shift), sum);
      EXPECT_EQ(inplace, y);
    }
  }
  reset_cpu_path_cap();
}

// One query row's attention over a strided cache (cpu::attend_row) on every path against the
// float64 reference on the same values: the scores within float32's dot-product bound, so each
// probability within twice that plus the exponential's and the sum's rounding, and the output
// (a convex combination of the values) within that times the largest value. Windows (lo > 0),
// sinks, head widths below, at and past every vector width, and the same bits in place of the
// rows around it.
TEST(KernelPaths, AttendRowWithinTheFloat32BoundOnEveryPath) {
  Rng rng(16);
  for (CpuPath p : cpu_paths_here()) {
    set_cpu_path_cap(p);
    for (const auto& [dk, dv, n, lo] : std::vector<std::array<int64_t, 4>>{
             {8, 8, 1, 0}, {32, 32, 7, 0}, {37, 5, 40, 3}, {64, 64, 130, 17}, {128, 80, 9, 1}}) {
      for (bool with_sink : {false, true}) {
        const int64_t hi = lo + n, ldk = dk + 3, ldv = dv + 5;
        std::vector<float> q = normals(dk, rng), k = normals(hi * ldk, rng),
                           v = normals(hi * ldv, rng);
        const float sink = 0.7f, scale = 1.0f / std::sqrt(static_cast<float>(dk));
        std::vector<float> out(static_cast<size_t>(dv)), s(static_cast<size_t>(n));
        cpu::attend_row<float>(out.data(), q.data(), k.data(), ldk, dk, v.data(), ldv, dv, lo, hi,
                               scale, with_sink ? &sink : nullptr, s.data());
        std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end()),
            want(static_cast<size_t>(dv)), sd(static_cast<size_t>(n));
        const double sink_d = sink;
        cpu::attend_row<double>(want.data(), qd.data(), kd.data(), ldk, dk, vd.data(), ldv, dv, lo,
                                hi, scale, with_sink ? &sink_d : nullptr, sd.data());
        double score_err = 0, vmax = 0;
        for (int64_t j = lo; j < hi; ++j) {
          double a = 0;
          for (int64_t c = 0; c < dk; ++c) a += std::fabs(qd[c] * kd[j * ldk + c]);
          score_err = std::max(score_err, (dk + 2) * kU * scale * a);
          for (int64_t c = 0; c < dv; ++c) vmax = std::max(vmax, std::fabs(vd[j * ldv + c]));
        }
        const double bound = (2 * score_err + (n + 8) * kU) * vmax + (n + 2) * kU * vmax;
        for (int64_t c = 0; c < dv; ++c)
          ASSERT_LE(std::fabs(out[c] - want[c]), bound)
              << cpu_path_name(p) << " dk " << dk << " dv " << dv << " n " << n << " sink "
              << with_sink << " column " << c;
        // The same query against a longer cache whose keys outside [lo, hi) differ: the same bits.
        std::vector<float> k2 = k, v2 = v, out2(static_cast<size_t>(dv));
        k2.resize(static_cast<size_t>((hi + 4) * ldk), 9.0f);
        v2.resize(static_cast<size_t>((hi + 4) * ldv), 9.0f);
        for (int64_t i = 0; i < lo * ldk; ++i) k2[i] = -k2[i];
        cpu::attend_row<float>(out2.data(), q.data(), k2.data(), ldk, dk, v2.data(), ldv, dv, lo,
                               hi, scale, with_sink ? &sink : nullptr, s.data());
        EXPECT_EQ(out2, out) << cpu_path_name(p);
      }
    }
  }
  reset_cpu_path_cap();
}

TEST(MixedPrecision, BackendIsNamed) {
  const std::string info = cpu::gemm_bf16_backend_info();
  if (cpu_path() >= CpuPath::avx512)
    EXPECT_NE(info.find("oneDNN"), std::string::npos) << info;
  else
    EXPECT_NE(info.find("widened"), std::string::npos) << info;
  EXPECT_EQ(cpu::bf16_native(), cpu_path() >= CpuPath::avx512_bf16);
}

}  // namespace moe
