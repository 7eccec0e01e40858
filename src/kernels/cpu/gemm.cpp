// GEMM through OpenBLAS (its OpenMP build: single-threaded when called inside a parallel region).
#include <cblas.h>
#include <omp.h>

#include "moe/error.h"
#include "moe/kernels.h"

namespace moe::cpu {

namespace {
blasint to_blas(int64_t v) { return static_cast<blasint>(v); }

template <class T>
void scale(T* c, int64_t m, int64_t n, int64_t ldc, T beta) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
}
}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale(c, m, n, ldc, beta);
  if (m == 1) {
    // One row (decoding a token): a matrix-vector product streams B once, where GEMM would first
    // pack all of it. Each output is computed whole by one thread, so the bits do not depend on
    // the thread count (OpenBLAS splits the sums of its transposed product across threads).
    const int64_t inc_a = trans_a ? lda : 1;
    if (trans_b) {  // B [n, k]: c = B a
      cblas_sgemv(CblasRowMajor, CblasNoTrans, to_blas(n), to_blas(k), alpha, b, to_blas(ldb), a,
                  to_blas(inc_a), beta, c, 1);
      return;
    }
    // B [k, n]: c = B^T a, rows of B streamed in order, each thread owning a range of columns.
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t j0 = n * id / nt, j1 = n * (id + 1) / nt;
      for (int64_t j = j0; j < j1; ++j) c[j] = beta == 0.0f ? 0.0f : beta * c[j];
      for (int64_t i = 0; i < k; ++i) {
        const float ai = alpha * a[i * inc_a];
        const float* row = b + i * ldb;
        for (int64_t j = j0; j < j1; ++j) c[j] += ai * row[j];
      }
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, to_blas(m), to_blas(n), to_blas(k), alpha, a,
              to_blas(lda), b, to_blas(ldb), beta, c, to_blas(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                  const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                  double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale(c, m, n, ldc, beta);
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, to_blas(m), to_blas(n), to_blas(k), alpha, a,
              to_blas(lda), b, to_blas(ldb), beta, c, to_blas(ldc));
}

}  // namespace moe::cpu
