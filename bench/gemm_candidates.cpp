// gemm_candidates: the float32 GEMM libraries of Debian 12 on the engine's shapes, one thread
// (each tile of the engine's GEMM is one single-threaded call) and two threads their own way.
// Built when BLIS and libxsmm are installed (libblis-openmp-dev, libxsmm-dev); run it twice, the
// second time with OPENBLAS_CORETYPE=SkylakeX, to see what OpenBLAS's CPU detection costs.
// docs/results/gemm.md holds the figures that chose oneDNN.
#include <cblas.h>
#include <fmt/core.h>
#include <libxsmm.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "blis.h"
#include "moe/kernels.h"

namespace {

using Clock = std::chrono::steady_clock;

// Best of five rounds of at least 0.2 s each, in GFLOP/s.
double gflops(const std::function<void()>& f, double flop) {
  f();
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = Clock::now();
    int calls = 0;
    double s = 0;
    do {
      f();
      ++calls;
      s = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (s < 0.2);
    best = std::min(best, s / calls);
  }
  return flop / best / 1e9;
}

struct Case {
  const char* what;
  int m, n, k;
};

}  // namespace

int main() {
  const Case cases[] = {
      {"small model expert FFN, 512 rows", 512, 256, 128},
      {"small model expert down", 512, 128, 256},
      {"small model dense FFN, 2048 rows", 2048, 512, 128},
      {"small model attention q,k,v", 2048, 384, 128},
      {"Qwen3-30B-A3B expert, 32 rows", 32, 768, 2048},
      {"Qwen3-30B-A3B expert down, 32 rows", 32, 2048, 768},
      {"Qwen3-30B-A3B q projection, 512 rows", 512, 4096, 2048},
      {"one 256 x 256 tile, k = 2048", 256, 256, 2048},
      {"2048 cubed", 2048, 2048, 2048},
  };
  fmt::print("OpenBLAS kernels: {}; BLIS configuration: {}; oneDNN: {}\n", openblas_get_corename(),
             bli_arch_string(bli_arch_query_id()), moe::cpu::gemm_f32_backend_info());
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    bli_thread_set_num_threads(threads);
    fmt::print("\n{} thread(s), C[m, n] = A[m, k] B[n, k]^T, GFLOP/s (libxsmm: B stored [k, n])\n",
               threads);
    fmt::print(
        "| shape | m | n | k | OpenBLAS | BLIS | oneDNN | libxsmm "
        "|\n|---|---|---|---|---|---|---|---|\n");
    for (const Case& c : cases) {
      std::vector<float> a(static_cast<size_t>(c.m) * c.k), b(static_cast<size_t>(c.n) * c.k),
          out(static_cast<size_t>(c.m) * c.n);
      for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) * 0.1f;
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.1f;
      const double flop = 2.0 * c.m * c.n * c.k;
      const double ob = gflops(
          [&] {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c.m, c.n, c.k, 1.f, a.data(), c.k,
                        b.data(), c.k, 0.f, out.data(), c.n);
          },
          flop);
      float one = 1, zero = 0;
      const double bl = gflops(
          [&] {
            bli_sgemm(BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, c.m, c.n, c.k, &one, a.data(), c.k, 1,
                      b.data(), c.k, 1, &zero, out.data(), c.n, 1);
          },
          flop);
      const double dn = gflops(
          [&] {
            dnnl_sgemm('N', 'T', c.m, c.n, c.k, 1.f, a.data(), c.k, b.data(), c.k, 0.f, out.data(),
                       c.n);
          },
          flop);
      // libxsmm's JIT kernels are for the untransposed form: row-major C = A B with B [k, n] is
      // column-major C^T = B^T A^T.
      const libxsmm_blasint m = c.m, n = c.n, k = c.k;
      const double xs = gflops(
          [&] {
            libxsmm_sgemm("N", "N", &n, &m, &k, &one, b.data(), &n, a.data(), &k, &zero, out.data(),
                          &n);
          },
          flop);
      fmt::print("| {} | {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |\n", c.what, c.m, c.n,
                 c.k, ob, bl, dn, xs);
    }
  }
  return 0;
}
