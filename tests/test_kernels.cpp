// Every CPU kernel against its naive reference (src/kernels/ref/ref.h), with edge shapes.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <utility>
#include <vector>

#include "kernels/ref/ref.h"
#include "moe/cpu.h"
#include "moe/kernels.h"
#include "moe/rng.h"
#include "moe/threading.h"
#include "moe/weights.h"

namespace moe {

namespace {

template <class T>
std::vector<T> randn(Rng& rng, int64_t n, double scale = 1.0) {
  std::vector<T> v(static_cast<size_t>(n));
  for (T& x : v) x = static_cast<T>(scale * rng.normal());
  return v;
}

template <class T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

}  // namespace

template <class T>
class KernelTest : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(KernelTest, FloatTypes);

TYPED_TEST(KernelTest, GemmMatchesReferenceForEveryTranspose) {
  using T = TypeParam;
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-13;
  Rng rng(1);
  // Besides small shapes, products of several tiles (256 x 256 of C; 1024 rows of a gemv) and
  // small outputs over a long k (cut into chunks of 512, summed in order).
  const int64_t shapes[][3] = {{1, 1, 1},       {7, 5, 3},      {33, 17, 65}, {1, 64, 9},
                               {64, 1, 31},     {300, 530, 19}, {1, 2100, 5}, {513, 3, 4},
                               {40, 300, 1100}, {257, 9, 1537}};
  for (const auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        // Leading dimensions larger than the minimum, to exercise strided access.
        const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 1;
        auto a = randn<T>(rng, (ta ? k : m) * lda);
        auto b = randn<T>(rng, (tb ? n : k) * ldb);
        auto c0 = randn<T>(rng, m * ldc);
        auto c1 = c0;
        cpu::gemm<T>(ta, tb, m, n, k, T(0.5), a.data(), lda, b.data(), ldb, T(2), c0.data(), ldc);
        ref::gemm<T>(ta, tb, m, n, k, T(0.5), a.data(), lda, b.data(), ldb, T(2), c1.data(), ldc);
        EXPECT_LE(max_abs_diff(c0, c1), tol * static_cast<double>(k + 1))
            << "m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb;
      }
  }
}

// A few rows through a weight [n, k] (C = A B^T, alpha 1, beta 0: a decoding step of up to
// kF32DotMaxRows sequences) take the one-pass dot kernels: against the reference, with rows of A
// and C strided, and each row the same bits as alone.
TEST(KernelTest, FewRowsThroughAWeightMatchTheReference) {
  Rng rng(3);
  for (const int64_t m : {2, 3, 5, 8, 9}) {
    for (const auto& [n, k] :
         std::vector<std::pair<int64_t, int64_t>>{{7, 9}, {130, 33}, {64, 128}}) {
      const int64_t lda = k + 3, ldc = n + 1;
      auto a = randn<float>(rng, m * lda);
      auto b = randn<float>(rng, n * k);
      std::vector<float> c0(static_cast<size_t>(m * ldc), 7.0f), c1 = c0;
      cpu::gemm<float>(false, true, m, n, k, 1.0f, a.data(), lda, b.data(), k, 0.0f, c0.data(),
                       ldc);
      ref::gemm<float>(false, true, m, n, k, 1.0f, a.data(), lda, b.data(), k, 0.0f, c1.data(),
                       ldc);
      EXPECT_LE(max_abs_diff(c0, c1), 2e-5 * static_cast<double>(k + 1))
          << "m=" << m << " n=" << n << " k=" << k;
      if (m > cpu::kF32DotMaxRows) continue;
      for (int64_t i = 0; i < m; ++i) {
        std::vector<float> one(static_cast<size_t>(n));
        cpu::gemm<float>(false, true, 1, n, k, 1.0f, a.data() + i * lda, lda, b.data(), k, 0.0f,
                         one.data(), n);
        for (int64_t j = 0; j < n; ++j) ASSERT_EQ(one[j], c0[i * ldc + j]) << "row " << i;
      }
    }
  }
}

// One row (decoding a token) runs as a matrix-vector product: the same bits on 1 and 2 threads,
// for both layouts of B, on shapes large enough for the BLAS to split the work.
TEST(KernelTest, OneRowGemmIsTheSameOnAnyThreadCount) {
  Rng rng(3);
  const int64_t n = 3000, k = 1500;
  auto a = randn<float>(rng, k);
  auto b = randn<float>(rng, n * k);
  for (int tb = 0; tb < 2; ++tb) {
    std::vector<float> c[2];
    for (int threads = 1; threads <= 2; ++threads) {
      set_num_threads(threads);
      c[threads - 1].assign(static_cast<size_t>(n), 1.0f);
      cpu::gemm<float>(false, tb, 1, n, k, 1.0f, a.data(), k, b.data(), tb ? k : n, 0.5f,
                       c[threads - 1].data(), n);
    }
    set_num_threads(0);
    EXPECT_EQ(c[0], c[1]) << "tb=" << tb;
  }
}

// Every product: the same bits on 1 and 2 threads, and called from a thread of a parallel
// region (as the MoE layer runs its experts) or not, for every transpose, on shapes smaller and
// larger than a tile and cut unevenly by them (the BLAS's own threading would round the edges
// of its pieces differently).
TEST(KernelTest, GemmIsTheSameOnAnyThreadCount) {
  Rng rng(4);
  const int64_t shapes[][3] = {
      {64, 96, 64}, {37, 200, 64}, {600, 300, 70}, {130, 1000, 33}, {200, 130, 2000}};
  for (const auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        const int64_t lda = ta ? m : k, ldb = tb ? k : n;
        auto a = randn<float>(rng, m * k);
        auto b = randn<float>(rng, k * n);
        std::vector<float> c[3];
        const auto run = [&](std::vector<float>& out) {
          out.assign(static_cast<size_t>(m * n), 1.0f);
          cpu::gemm<float>(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.5f, out.data(),
                           n);
        };
        set_num_threads(1);
        run(c[0]);
        set_num_threads(2);
        run(c[1]);
#pragma omp parallel num_threads(2)
        {
          if (omp_get_thread_num() == 1) run(c[2]);
        }
        set_num_threads(0);
        EXPECT_EQ(c[0], c[1]) << "m=" << m << " n=" << n << " k=" << k << " ta=" << ta
                              << " tb=" << tb;
        EXPECT_EQ(c[0], c[2]) << "in a parallel region: m=" << m << " n=" << n << " k=" << k
                              << " ta=" << ta << " tb=" << tb;
      }
  }
}

TYPED_TEST(KernelTest, GemmEmptyShapes) {
  using T = TypeParam;
  std::vector<T> c = {1, 2, 3, 4};
  std::vector<T> a(4, T(1)), b(4, T(1));
  cpu::gemm<T>(false, false, 2, 2, 0, T(1), a.data(), 1, b.data(), 2, T(3), c.data(), 2);
  EXPECT_EQ(c, (std::vector<T>{3, 6, 9, 12}));  // k = 0: C = beta * C
  cpu::gemm<T>(false, false, 2, 2, 0, T(1), a.data(), 1, b.data(), 2, T(0), c.data(), 2);
  EXPECT_EQ(c, (std::vector<T>{0, 0, 0, 0}));
  cpu::gemm<T>(false, false, 0, 2, 2, T(1), a.data(), 2, b.data(), 2, T(0), c.data(), 2);
  cpu::gemm<T>(false, false, 2, 0, 2, T(1), a.data(), 2, b.data(), 2, T(0), c.data(), 2);
}

TYPED_TEST(KernelTest, SoftmaxMatchesReference) {
  using T = TypeParam;
  Rng rng(2);
  for (int64_t cols : {1, 2, 7, 64, 300}) {
    const int64_t rows = 37;
    auto x = randn<T>(rng, rows * cols, 5.0);
    x[3 % x.size()] = T(80);  // large values must not overflow
    std::vector<T> p0(x.size()), p1(x.size()), l0(rows), l1(rows);
    cpu::softmax_rows<T>(p0.data(), l0.data(), x.data(), rows, cols);
    ref::softmax_rows<T>(p1.data(), l1.data(), x.data(), rows, cols);
    const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
    EXPECT_LE(max_abs_diff(p0, p1), tol);
    EXPECT_LE(max_abs_diff(l0, l1), tol * 100);
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c)
        s += static_cast<double>(p0[static_cast<size_t>(r * cols + c)]);
      EXPECT_NEAR(s, 1.0, 10 * tol);
    }
  }
}

TYPED_TEST(KernelTest, TopkMatchesReferenceIncludingTiesAndKEqualsCols) {
  using T = TypeParam;
  Rng rng(3);
  const int64_t rows = 50;
  for (int64_t cols : {1, 2, 8, 64}) {
    for (int64_t k : {int64_t(1), int64_t(2), cols}) {
      if (k > cols) continue;
      // Values drawn from a few levels so that rows have many exact ties.
      std::vector<T> x(static_cast<size_t>(rows * cols));
      for (T& v : x) v = static_cast<T>(rng.randint(0, 4)) * T(0.25);
      std::vector<int32_t> i0(static_cast<size_t>(rows * k)), i1(i0.size());
      std::vector<T> v0(i0.size()), v1(i0.size());
      cpu::topk_rows<T>(i0.data(), v0.data(), x.data(), rows, cols, k);
      ref::topk_rows<T>(i1.data(), v1.data(), x.data(), rows, cols, k);
      EXPECT_EQ(i0, i1) << "cols=" << cols << " k=" << k;
      EXPECT_EQ(v0, v1);
    }
  }
  // All equal: the lowest indices win, in order.
  std::vector<T> same(8, T(0.125));
  std::vector<int32_t> idx(3);
  std::vector<T> val(3);
  cpu::topk_rows<T>(idx.data(), val.data(), same.data(), 1, 8, 3);
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1, 2}));
}

TYPED_TEST(KernelTest, ActivationsMatchReferenceAndFiniteDifferences) {
  using T = TypeParam;
  Rng rng(4);
  const int64_t n = 70000;  // above the parallel threshold
  auto x = randn<T>(rng, n, 3.0);
  auto dout = randn<T>(rng, n);
  x[0] = T(0.5);
  x[1] = T(-0.5);
  for (Activation a : {Activation::relu, Activation::gelu, Activation::silu}) {
    std::vector<T> y0(static_cast<size_t>(n)), y1(y0.size()), g0(y0.size()), g1(y0.size());
    cpu::act_forward<T>(a, y0.data(), x.data(), n);
    ref::act_forward<T>(a, y1.data(), x.data(), n);
    cpu::act_backward<T>(a, g0.data(), dout.data(), x.data(), n);
    ref::act_backward<T>(a, g1.data(), dout.data(), x.data(), n);
    const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
    EXPECT_LE(max_abs_diff(y0, y1), tol * 10) << activation_name(a);
    EXPECT_LE(max_abs_diff(g0, g1), tol * 10) << activation_name(a);
    if (sizeof(T) == 8) {  // the reference derivative against central differences
      for (size_t i = 0; i < 200; ++i) {
        const double xi = static_cast<double>(x[i]);
        if (a == Activation::relu && std::abs(xi) < 1e-3) continue;
        const double h = 1e-6;
        const double fd = (ref::act(a, xi + h) - ref::act(a, xi - h)) / (2 * h);
        EXPECT_NEAR(ref::act_grad(a, xi), fd, 1e-8) << activation_name(a) << " x=" << xi;
      }
    }
  }
}

TYPED_TEST(KernelTest, SwigluMatchesReferenceAndMayRunInPlace) {
  using T = TypeParam;
  Rng rng(5);
  const int64_t n = 1003;  // a tail after any vector width
  auto g = randn<T>(rng, n, 2.0), u = randn<T>(rng, n), dh = randn<T>(rng, n);
  // Gates far out on both sides (the float32 kernel caps exp's argument at 88).
  const T far[] = {T(-90), T(-40), T(-17.5), T(17.5), T(40), T(90)};
  for (size_t i = 0; i < std::size(far); ++i) g[i * 97] = far[i];
  std::vector<T> h0(static_cast<size_t>(n)), h1(h0.size());
  cpu::swiglu_forward<T>(h0.data(), g.data(), u.data(), n);
  ref::swiglu_forward<T>(h1.data(), g.data(), u.data(), n);
  const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
  EXPECT_LE(max_abs_diff(h0, h1), tol * 10);
  std::vector<T> dg0(h0.size()), du0(h0.size()), dg1(h0.size()), du1(h0.size());
  cpu::swiglu_backward<T>(dg0.data(), du0.data(), dh.data(), g.data(), u.data(), n);
  ref::swiglu_backward<T>(dg1.data(), du1.data(), dh.data(), g.data(), u.data(), n);
  EXPECT_LE(max_abs_diff(dg0, dg1), tol * 10);
  EXPECT_LE(max_abs_diff(du0, du1), tol * 10);
  // In place: da_up over dh, da_gate over a_gate (what the expert backward relies on).
  auto gi = g, dhi = dh;
  cpu::swiglu_backward<T>(gi.data(), dhi.data(), dhi.data(), gi.data(), u.data(), n);
  EXPECT_EQ(gi, dg0);
  EXPECT_EQ(dhi, du0);
}

}  // namespace moe

namespace moe {

TEST(CpuPathTest, FeaturesAndCap) {
  const CpuFeatures& f = cpu_features();
  const CpuPath best = f.best();
  // Each level needs the features of the ones below it.
  EXPECT_TRUE(best < CpuPath::avx2 || (f.avx2 && f.fma && f.os_avx));
  EXPECT_TRUE(best < CpuPath::avx512 || (f.avx512f && f.avx512bw && f.os_avx512));
  EXPECT_TRUE(best < CpuPath::avx512_bf16 || (f.avx512_bf16 && f.avx512_vnni));
  EXPECT_TRUE(best < CpuPath::amx || (f.amx_bf16 && f.amx_int8 && f.os_amx));
  for (const std::string& name : cpu_path_names()) {
    const auto p = parse_cpu_path(name);
    ASSERT_TRUE(p.has_value()) << name;
    EXPECT_EQ(name, cpu_path_name(*p));
    set_cpu_path_cap(*p);
    EXPECT_EQ(cpu_path(), std::min(*p, best)) << name;  // a cap above the CPU changes nothing
  }
  EXPECT_FALSE(parse_cpu_path("avx1024").has_value());
  reset_cpu_path_cap();
  EXPECT_LE(cpu_path(), best);
}

TEST(CpuPathTest, PeakIsPositive) { EXPECT_GT(cpu::fma_peak_gflops(), 0.1); }

}  // namespace moe
