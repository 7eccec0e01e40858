// GEMM in tiles that make the bits independent of the thread count: float32 through oneDNN's
// sgemm where the CPU has AVX2 or better, OpenBLAS otherwise and for float64 (docs/results/gemm.md
// has the measurements that chose them).
#include <cblas.h>
#include <fmt/format.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cpu/isa/isa_kernels.h"
#include "moe/arena.h"
#include "moe/cpu.h"
#include "moe/error.h"
#include "moe/kernels.h"
#include "moe/weights.h"

// oneDNN's bf16 GEMM: bf16 A and B, float32 C, row-major like dnnl_sgemm. libdnnl 2.x exports it
// (DNNL_API, C linkage) but declares it only in an internal header (src/cpu/gemm/gemm.hpp), so it
// is declared here; its bf16 type is a 16-bit struct, passed by pointer.
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t m, dnnl_dim_t n,
                                               dnnl_dim_t k, float alpha, const uint16_t* a,
                                               dnnl_dim_t lda, const uint16_t* b, dnnl_dim_t ldb,
                                               float beta, float* c, dnnl_dim_t ldc);

namespace moe::cpu {

// Same bits whatever the thread count. OpenBLAS's OpenMP build threads a call made outside a
// parallel region over omp_get_max_threads() threads, and where it cuts the product decides
// which elements its edge kernels compute, with another order of the sums: the bits of a
// product change with the thread count (and with the CPU's kernels). So OpenBLAS only ever runs
// single-threaded here: a product is cut into tiles fixed by its shape alone, each tile one
// single-threaded call, and the tiles are spread over the threads.
namespace {

constexpr int64_t kRowTile = 256, kColTile = 256;  // of C; gemv: rows of its matrix
constexpr int64_t kGemvTile = 1024;

blasint to_blas(int64_t v) { return static_cast<blasint>(v); }

template <class T>
void scale(T* c, int64_t m, int64_t n, int64_t ldc, T beta) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
}

// Outside a parallel region OpenBLAS threads over omp_get_max_threads(); one thread while this
// lives.
class OneBlasThread {
 public:
  OneBlasThread() : saved_(omp_get_max_threads()) {
    if (saved_ > 1) omp_set_num_threads(1);
  }
  ~OneBlasThread() {
    if (saved_ > 1) omp_set_num_threads(saved_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int saved_;
};

// Runs tile(i0, i1, j0, j1) over the tiles of an m x n output, rows in blocks of rt and
// columns of ct; each tile single-threaded in OpenBLAS.
template <class Tile>
void tiled(int64_t m, int64_t n, int64_t rt, int64_t ct, const Tile& tile) {
  const int64_t tm = (m + rt - 1) / rt, tn = (n + ct - 1) / ct, tiles = tm * tn;
  const auto run = [&](int64_t t) {
    const int64_t bi = t / tn, bj = t % tn;
    tile(bi * rt, std::min(m, (bi + 1) * rt), bj * ct, std::min(n, (bj + 1) * ct));
  };
  if (omp_in_parallel()) {  // a thread of a team: OpenBLAS runs single-threaded
    for (int64_t t = 0; t < tiles; ++t) run(t);
  } else if (tiles == 1 || omp_get_max_threads() == 1) {
    const OneBlasThread one;
    for (int64_t t = 0; t < tiles; ++t) run(t);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) run(t);
  }
}

// A product whose output is a tile or two but whose k is long (a weight gradient, [D, F] summed
// over the tokens) would run on one thread. Such a k is cut into chunks fixed by the shape; each
// (tile, chunk) product goes into a buffer of its chunk, in parallel, and the chunks are summed
// in order: the same bits on any thread count.
constexpr int64_t kKChunk = 512;

int64_t k_chunks(int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = ((m + kRowTile - 1) / kRowTile) * ((n + kColTile - 1) / kColTile);
  return tiles >= 4 || k < 2 * kKChunk ? 1 : (k + kKChunk - 1) / kKChunk;
}

// C = alpha op(A) op(B) + beta C in tiles, and in k chunks where k_chunks says so.
// part(i0, i1, j0, j1, p0, p1, alpha, beta, c, ldc) computes rows [i0, i1) and columns [j0, j1)
// of alpha op(A)[:, p0:p1] op(B)[p0:p1, :] + beta c into c (the tile's corner, stride ldc).
template <class T, class Part>
void tiled_k(int64_t m, int64_t n, int64_t k, T alpha, T beta, T* c, int64_t ldc,
             const Part& part) {
  const int64_t chunks = k_chunks(m, n, k);
  if (chunks == 1) {
    tiled(m, n, kRowTile, kColTile, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      part(i0, i1, j0, j1, int64_t{0}, k, alpha, beta, c + i0 * ldc + j0, ldc);
    });
    return;
  }
  thread_local std::vector<T> buf;
  buf.resize(static_cast<size_t>(chunks * m * n));
  T* parts = buf.data();
  tiled(m, n * chunks, kRowTile, kColTile, [&](int64_t i0, int64_t i1, int64_t q0, int64_t q1) {
    // Columns of the virtual [m, n * chunks] output: chunk q / n, column q % n; a tile of kColTile
    // columns may span two chunks, so it is cut at their border.
    for (int64_t q = q0; q < q1;) {
      const int64_t ch = q / n, j0 = q % n, j1 = std::min(n, j0 + (q1 - q));
      const int64_t p0 = ch * kKChunk, p1 = std::min(k, p0 + kKChunk);
      part(i0, i1, j0, j1, p0, p1, T(1), T(0), parts + ch * m * n + i0 * n + j0, n);
      q += j1 - j0;
    }
  });
  const auto reduce = [&](int64_t i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = parts[i * n + j];
      for (int64_t ch = 1; ch < chunks; ++ch) sum += parts[ch * m * n + i * n + j];
      T& cij = c[i * ldc + j];
      cij = beta == T(0) ? alpha * sum : alpha * sum + beta * cij;
    }
  };
  if (omp_in_parallel()) {
    for (int64_t i = 0; i < m; ++i) reduce(i);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) reduce(i);
  }
}

template <class T, class Gemm, class Gemv>
void gemm_tiled(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc, Gemm blas_gemm,
                Gemv blas_gemv) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale(c, m, n, ldc, beta);
  if (m == 1) {
    // One row (decoding a token): a matrix-vector product streams B once, where GEMM would first
    // pack all of it.
    const int64_t inc_a = trans_a ? lda : 1;
    if (trans_b) {  // B [n, k]: c = B a, in tiles of B's rows
      tiled(n, 1, kGemvTile, 1, [&](int64_t j0, int64_t j1, int64_t, int64_t) {
        blas_gemv(CblasRowMajor, CblasNoTrans, to_blas(j1 - j0), to_blas(k), alpha, b + j0 * ldb,
                  to_blas(ldb), a, to_blas(inc_a), beta, c + j0, 1);
      });
      return;
    }
    // B [k, n]: c = B^T a, rows of B streamed in order, each thread owning a range of columns
    // (every c_j summed in the same order whatever the thread count).
#pragma omp parallel if (!omp_in_parallel())
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t j0 = n * id / nt, j1 = n * (id + 1) / nt;
      for (int64_t j = j0; j < j1; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
      for (int64_t i = 0; i < k; ++i) {
        const T ai = alpha * a[i * inc_a];
        const T* row = b + i * ldb;
        for (int64_t j = j0; j < j1; ++j) c[j] += ai * row[j];
      }
    }
    return;
  }
  tiled_k(m, n, k, alpha, beta, c, ldc,
          [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t p0, int64_t p1, T al, T be,
              T* ct, int64_t ldct) {
            // op(A) rows i0..i1 and columns p0..p1: of A [m, k], or of A^T with A [k, m]; op(B)
            // rows p0..p1 and columns j0..j1 likewise.
            const T* ta = trans_a ? a + p0 * lda + i0 : a + i0 * lda + p0;
            const T* tb = trans_b ? b + j0 * ldb + p0 : b + p0 * ldb + j0;
            blas_gemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                      trans_b ? CblasTrans : CblasNoTrans, to_blas(i1 - i0), to_blas(j1 - j0),
                      to_blas(p1 - p0), al, ta, to_blas(lda), tb, to_blas(ldb), be, ct,
                      to_blas(ldct));
          });
}

// oneDNN's sgemm with OpenBLAS's CBLAS signature. oneDNN picks its kernels from the CPU's
// features (CPUID, like ours); its ISA is capped once, before its first kernel, at our path.
dnnl_cpu_isa_t onednn_isa(CpuPath p) {
  switch (p) {
    case CpuPath::generic: return dnnl_cpu_isa_sse41;
    case CpuPath::avx2: return dnnl_cpu_isa_avx2;
    case CpuPath::avx512: return dnnl_cpu_isa_avx512_core;
    case CpuPath::avx512_vnni: return dnnl_cpu_isa_avx512_core_vnni;
    case CpuPath::avx512_bf16: return dnnl_cpu_isa_avx512_core_bf16;
    case CpuPath::amx: return dnnl_cpu_isa_avx512_core_amx;
  }
  return dnnl_cpu_isa_all;
}

void onednn_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
                  blasint k, float alpha, const float* a, blasint lda, const float* b, blasint ldb,
                  float beta, float* c, blasint ldc) {
  const dnnl_status_t st = dnnl_sgemm(ta == CblasTrans ? 'T' : 'N', tb == CblasTrans ? 'T' : 'N', m,
                                      n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  MOE_CHECK(st == dnnl_success, "gemm", "oneDNN sgemm failed (status {}) on {}x{}x{}",
            static_cast<int>(st), m, n, k);
}

const char* onednn_isa_name() {
  switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "?";
  }
}

// OpenBLAS's sgemv (no transpose) on the path's dot kernel, a row of B at a time at any stride:
// OpenBLAS takes its kernels from the CPU's model number and runs generic SSE3 ones on a CPU
// newer than its build. c[r] = alpha sum_p b[r, p] a[p inc_a] + beta c[r] (c[r] alone where beta
// is 0, as BLAS does).
void dot_sgemv(CBLAS_ORDER, CBLAS_TRANSPOSE, blasint rows, blasint k, float alpha, const float* b,
               blasint ldb, const float* a, blasint inc_a, float beta, float* c, blasint inc_c) {
  thread_local std::vector<float> packed;
  const float* x = a;
  if (inc_a != 1) {
    packed.resize(static_cast<size_t>(k));
    for (blasint p = 0; p < k; ++p) packed[static_cast<size_t>(p)] = a[p * inc_a];
    x = packed.data();
  }
  const auto dot = path_kernels().dot_f32;
  for (blasint r = 0; r < rows; ++r) {
    float s = 0;
    dot(b + static_cast<int64_t>(r) * ldb, k, x, k, 1, 0, 1, &s, 1);
    float& cr = c[static_cast<int64_t>(r) * inc_c];
    cr = beta == 0.0f ? alpha * s : alpha * s + beta * cr;
  }
}

using SgemmFn = decltype(&onednn_sgemm);

SgemmFn sgemm_backend() {
  static std::once_flag once;
  static SgemmFn fn = nullptr;
  std::call_once(once, [] {
    const CpuPath p = cpu_path();
    if (p >= CpuPath::avx2) {
      dnnl_set_max_cpu_isa(onednn_isa(p));  // fails harmlessly if oneDNN already ran
      fn = onednn_sgemm;
    } else {
      fn = [](CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
              blasint k, float alpha, const float* a, blasint lda, const float* b, blasint ldb,
              float beta, float* c, blasint ldc) {
        cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      };
    }
  });
  return fn;
}

}  // namespace

const char* gemm_f32_backend() { return sgemm_backend() == onednn_sgemm ? "onednn" : "openblas"; }

std::string gemm_f32_backend_info() {
  if (sgemm_backend() == onednn_sgemm) {
    const dnnl_version_t* v = dnnl_version();
    return fmt::format("oneDNN {}.{}.{} sgemm, its {} kernels", v->major, v->minor, v->patch,
                       onednn_isa_name());
  }
  std::string version = OPENBLAS_VERSION;  // " OpenBLAS 0.3.21 "
  version.erase(0, version.find_first_not_of(' '));
  version.erase(version.find_last_not_of(' ') + 1);
  return fmt::format("{} sgemm, its {} kernels", version, openblas_get_corename());
}

void gemm_f32_library(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  sgemm_backend()(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                  trans_b ? CblasTrans : CblasNoTrans, to_blas(m), to_blas(n), to_blas(k), alpha, a,
                  to_blas(lda), b, to_blas(ldb), beta, c, to_blas(ldc));
}

namespace {

std::atomic<bool> g_bf16_operands{false};
// Under Bf16Operands a product with a dimension of 32 or less stays in float32: attention's
// per-head products (head width 32) and the router's (8 experts) ran slower with bf16 operands
// (the rounding and oneDNN's bf16 packing cost more than the products; docs/results.md).
std::atomic<int64_t> g_bf16_narrow{32};
std::atomic<Bf16Store*> g_bf16_store{nullptr};
std::atomic<bool> g_bf16_verify{false};

// oneDNN's bf16 GEMM runs from the avx512 path up (its kernels need AVX-512; it emulates the bf16
// dot product where the CPU lacks it). Tried once on a small product before it is trusted.
bool bf16_by_onednn() {
  static const bool yes = [] {
    sgemm_backend();  // caps oneDNN's ISA at our path before its first kernel
    if (cpu_path() < CpuPath::avx512) return false;
    const uint16_t one = 0x3f80;  // 1.0
    float c = 0;
    return dnnl_gemm_bf16bf16f32('N', 'N', 1, 1, 1, 1.0f, &one, 1, &one, 1, 0.0f, &c, 1) ==
               dnnl_success &&
           c == 1.0f;
  }();
  return yes;
}

// A [rows, cols] of bf16 with row stride ld, widened into a compact float32 copy (exact).
void widen_bf16(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld,
                std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    weight_rows_f32(WeightMatrix{WType::bf16, x + r * ld, 1, cols, nullptr}, 0, 1,
                    out.data() + r * cols);
}

}  // namespace

Bf16Operands::Bf16Operands(bool on, Bf16Store* store)
    : saved_(g_bf16_operands.exchange(on)),
      saved_store_(g_bf16_store.exchange(on ? store : nullptr)) {
  if (on && store) store->clear();
}
Bf16Operands::~Bf16Operands() {
  if (Bf16Store* s = g_bf16_store.exchange(saved_store_)) s->clear();
  g_bf16_operands.store(saved_);
}
bool Bf16Operands::active() { return g_bf16_operands.load(std::memory_order_relaxed); }
void Bf16Operands::set_narrow(int64_t dim) { g_bf16_narrow.store(dim); }
Bf16Store* Bf16Operands::store() { return g_bf16_store.load(std::memory_order_relaxed); }
const uint16_t* Bf16Operands::rounded(const float* p, int64_t extent) {
  const Bf16Store* s = g_bf16_store.load(std::memory_order_relaxed);
  return s ? s->find(p, extent) : nullptr;
}

struct Bf16Store::Impl {
  struct Range {
    std::uintptr_t begin, end;  // bytes of the float32 range
    const uint16_t* copy;
  };
  mutable std::mutex mu;
  Arena memory;
  std::vector<Range> ranges;  // sorted, disjoint
  int64_t values = 0;

  // The first range ending after a (the one that may hold a).
  std::vector<Range>::const_iterator after(std::uintptr_t a) const {
    return std::upper_bound(ranges.begin(), ranges.end(), a,
                            [](std::uintptr_t x, const Range& r) { return x < r.end; });
  }
};

namespace {
std::uintptr_t address(const float* p) { return reinterpret_cast<std::uintptr_t>(p); }
}  // namespace

Bf16Store::Bf16Store() : impl_(std::make_unique<Impl>()) {}
Bf16Store::~Bf16Store() = default;

bool Bf16Store::keep(const float* p, int64_t n) {
  if (p == nullptr || n <= 0) return false;
  const std::uintptr_t b = address(p), e = address(p + n);
  uint16_t* copy = nullptr;
  {
    const std::lock_guard<std::mutex> lock(impl_->mu);
    const auto at = impl_->after(b);
    if (at != impl_->ranges.end() && at->begin < e) return false;  // overlaps a kept range
    copy = impl_->memory.alloc<uint16_t>(n);
  }
  round_to_bf16(p, 1, n, n, copy);  // outside the lock; the range is visible only once rounded
  const std::lock_guard<std::mutex> lock(impl_->mu);
  const auto at = impl_->after(b);
  if (at != impl_->ranges.end() && at->begin < e) return false;  // kept meanwhile by another
  impl_->ranges.insert(at, Impl::Range{b, e, copy});
  impl_->values += n;
  return true;
}

void Bf16Store::forget(const float* p) {
  const std::lock_guard<std::mutex> lock(impl_->mu);
  const auto at = impl_->after(address(p));
  if (at != impl_->ranges.end() && at->begin == address(p)) {
    impl_->values -= static_cast<int64_t>((at->end - at->begin) / sizeof(float));
    impl_->ranges.erase(at);
  }
}

const uint16_t* Bf16Store::find(const float* p, int64_t extent) const {
  const std::uintptr_t b = address(p), e = address(p + extent);
  const uint16_t* copy = nullptr;
  {
    const std::lock_guard<std::mutex> lock(impl_->mu);
    const auto at = impl_->after(b);
    if (at == impl_->ranges.end() || at->begin > b || e > at->end) return nullptr;
    copy = at->copy + (b - at->begin) / sizeof(float);
  }
  if (g_bf16_verify.load(std::memory_order_relaxed)) {
    std::vector<uint16_t> again(static_cast<size_t>(extent));
    round_to_bf16(p, 1, extent, extent, again.data());
    MOE_CHECK(std::equal(again.begin(), again.end(), copy), "bf16 operands",
              "a float32 range kept for this step ({} values at {}) changed after it was rounded",
              extent, static_cast<const void*>(p));
  }
  return copy;
}

void Bf16Store::clear() {
  const std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->ranges.clear();
  impl_->values = 0;
  impl_->memory.reset();
}

int64_t Bf16Store::kept_values() const {
  const std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->values;
}

void Bf16Store::set_verify(bool on) { g_bf16_verify.store(on); }

bool bf16_native() { return cpu_path() >= CpuPath::avx512_bf16; }

std::string gemm_bf16_backend_info() {
  if (bf16_by_onednn()) {
    const dnnl_version_t* v = dnnl_version();
    return fmt::format("oneDNN {}.{}.{} bf16 gemm, its {} kernels{}", v->major, v->minor, v->patch,
                       onednn_isa_name(),
                       bf16_native() ? "" : " (bf16 dot products emulated in AVX-512)");
  }
  return fmt::format("bf16 operands widened to float32, then {}", gemm_f32_backend_info());
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
               int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale(c, m, n, ldc, beta);
  if (bf16_by_onednn()) {
    tiled_k(m, n, k, alpha, beta, c, ldc,
            [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t p0, int64_t p1, float al,
                float be, float* ct, int64_t ldct) {
              const uint16_t* ta = trans_a ? a + p0 * lda + i0 : a + i0 * lda + p0;
              const uint16_t* tb = trans_b ? b + j0 * ldb + p0 : b + p0 * ldb + j0;
              const dnnl_status_t st =
                  dnnl_gemm_bf16bf16f32(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', i1 - i0, j1 - j0,
                                        p1 - p0, al, ta, lda, tb, ldb, be, ct, ldct);
              MOE_CHECK(st == dnnl_success, "gemm_bf16",
                        "oneDNN bf16 gemm failed (status {}) on {}x{}x{}", static_cast<int>(st),
                        i1 - i0, j1 - j0, p1 - p0);
            });
    return;
  }
  // The exact fallback: bf16 values are float32 values, so float32 products of the widened
  // operands are the same products, summed in float32.
  thread_local std::vector<float> wa, wb;
  const int64_t ra = trans_a ? k : m, ca = trans_a ? m : k;
  const int64_t rb = trans_b ? n : k, cb = trans_b ? k : n;
  widen_bf16(a, ra, ca, lda, wa);
  widen_bf16(b, rb, cb, ldb, wb);
  gemm_tiled(trans_a, trans_b, m, n, k, alpha, wa.data(), ca, wb.data(), cb, beta, c, ldc,
             sgemm_backend(), dot_sgemv);
}

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (Bf16Operands::active() &&
      std::min({m, n, k}) > g_bf16_narrow.load(std::memory_order_relaxed)) {
    // Mixed precision: both operands rounded to bf16 into per-thread buffers, then gemm_bf16.
    // An operand kept in the scope's store (bf16_keep) is read from there, with its own stride.
    thread_local std::vector<uint16_t> ha, hb;
    const auto operand = [](const float* x, int64_t rows, int64_t cols, int64_t ld,
                            std::vector<uint16_t>& buf, int64_t& ld_out) -> const uint16_t* {
      if (const uint16_t* kept = Bf16Operands::rounded(x, (rows - 1) * ld + cols)) {
        ld_out = ld;
        return kept;
      }
      buf.resize(static_cast<size_t>(rows * cols));
      round_to_bf16(x, rows, cols, ld, buf.data());
      ld_out = cols;
      return buf.data();
    };
    int64_t la = 0, lb = 0;
    const uint16_t* pa = operand(a, trans_a ? k : m, trans_a ? m : k, lda, ha, la);
    const uint16_t* pb = operand(b, trans_b ? n : k, trans_b ? k : n, ldb, hb, lb);
    gemm_bf16(trans_a, trans_b, m, n, k, alpha, pa, la, pb, lb, beta, c, ldc);
    return;
  }
  if (m <= kF32DotMaxRows && trans_b && !trans_a && ldb == k && lda >= k && ldc >= n &&
      alpha == 1.0f && beta == 0.0f && k > 0) {
    // A few rows through a weight [n, k] (decoding): our one-pass kernel (moe/weights.h).
    matmul_wt(WeightMatrix{WType::f32, b, n, k, nullptr}, a, lda, m, c, ldc);
    return;
  }
  gemm_tiled(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, sgemm_backend(),
             dot_sgemv);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                  const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                  double* c, int64_t ldc) {
  gemm_tiled(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, cblas_dgemm,
             cblas_dgemv);
}

}  // namespace moe::cpu
