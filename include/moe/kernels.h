// moe/kernels.h: the CPU kernels (OpenMP + OpenBLAS), templated on float and double.
//
// Each kernel has a naive scalar twin in src/kernels/ref/ref.h with the same signature; the
// tests compare the two. Shapes are row-major; every function states its shapes first.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace moe {

enum class Activation { relu, gelu, silu };

const char* activation_name(Activation a);

namespace cpu {

// C[m, n] = alpha * op(A) op(B) + beta * C, op(A) [m, k], op(B) [k, n]; A, B, C row-major with
// leading dimensions lda, ldb, ldc. trans_a means A is stored [k, m]. Empty products are skipped
// (with k == 0, C is scaled by beta). Runs on all threads outside a parallel region and on the
// calling thread inside one.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// The library that runs float32 products of more than one row: "onednn" or "openblas".
const char* gemm_f32_backend();
// Which library, its version and the kernels it chose ("oneDNN 2.6.3 sgemm, its avx512_core_amx
// kernels").
std::string gemm_f32_backend_info();
// The same product as gemm<float>, in one call of that library threaded its own way (its bits
// depend on the thread count): what the machine's best GEMM does, for benchmarks.
void gemm_f32_library(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc);

// Mixed precision (`moe train --dtype bf16`): while a Bf16Operands lives, gemm<float> rounds both
// operands to bf16 (to nearest, ties to even) and multiplies them with float32 accumulation, as
// gemm_bf16 does. Process-wide, like torch.autocast; products of other threads see it too.
// Products with a dimension of 32 or less (attention's per-head products, the router's) stay in
// float32, where bf16 operands did not pay. Ranges kept in the scope's store (bf16_keep) are
// rounded once and read from there.
// Error against the exact product of the float32 operands: each operand's rounding is at most
// 2^-8 relative, so |C - AB| <= (2^-7 + 2^-16 + (k+2) 2^-23) sum_k |a b| (docs/architecture.md).
class Bf16Store;
class Bf16Operands {
 public:
  // store: where kept ranges (bf16_keep) live; cleared when the scope starts and when it ends.
  explicit Bf16Operands(bool on = true, Bf16Store* store = nullptr);
  ~Bf16Operands();
  Bf16Operands(const Bf16Operands&) = delete;
  Bf16Operands& operator=(const Bf16Operands&) = delete;
  static bool active();
  // Products with a dimension of at most `dim` stay float32 (32 unless changed; tests lower it).
  static void set_narrow(int64_t dim);
  // The kept copy of [p, p + extent) where it lies within a kept range of the scope's store.
  static const uint16_t* rounded(const float* p, int64_t extent);
  static Bf16Store* store();

 private:
  bool saved_;
  Bf16Store* saved_store_;
};

// Rounded bf16 copies of float32 ranges that hold their values for a while (a model's weights
// during a training step; the activations a forward saves for its backward): a range is rounded
// once, when kept, and every product that reads it takes the copy instead of rounding it again
// (the same bits). Its memory serves step after step. Thread-safe.
class Bf16Store {
 public:
  Bf16Store();
  ~Bf16Store();
  Bf16Store(const Bf16Store&) = delete;
  Bf16Store& operator=(const Bf16Store&) = delete;
  // Rounds [p, p + n) now; false where it overlaps a range already kept (then not kept).
  bool keep(const float* p, int64_t n);
  void forget(const float* p);  // the range kept at p, if any
  const uint16_t* find(const float* p, int64_t extent) const;
  void clear();  // forgets every range; keeps the memory
  int64_t kept_values() const;
  // Tests, for every store of the process: each find also rounds the range again and throws,
  // naming it, where the copy no longer matches (a range changed after it was kept).
  static void set_verify(bool on);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Under a Bf16Operands scope with a store: [p, p + n) keeps its values until the scope ends, so
// products round it once. Nothing otherwise, and nothing for double.
template <class T>
void bf16_keep(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (Bf16Store* s = Bf16Operands::store()) s->keep(p, n);
  } else {
    (void)p;
    (void)n;
  }
}

// bf16_keep for the life of this object only (a gradient read by the two products of a linear
// layer's backward, in a buffer that is written again later).
class Bf16Kept {
 public:
  template <class T>
  Bf16Kept(const T* p, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      Bf16Store* s = Bf16Operands::store();
      if (s && s->keep(p, n)) {
        store_ = s;
        p_ = p;
      }
    } else {
      (void)p;
      (void)n;
    }
  }
  ~Bf16Kept() {
    if (store_) store_->forget(p_);
  }
  Bf16Kept(const Bf16Kept&) = delete;
  Bf16Kept& operator=(const Bf16Kept&) = delete;

 private:
  Bf16Store* store_ = nullptr;
  const float* p_ = nullptr;
};

// C[m, n] = alpha * op(A) op(B) + beta * C with bf16 operands (bit patterns as uint16_t) and
// float32 accumulation; the conventions and thread-count independence of gemm. Each product is
// exact in float32 and the sums are float32: |C - AB| <= (k+2) 2^-24 sum_k |a b| for A, B as given
// (the bf16 hardware flushes subnormal inputs and results, below 1.2e-38, to zero).
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
               int64_t ldc);
// How gemm_bf16 runs here: oneDNN's bf16 GEMM (AVX512-BF16 or AMX kernels, or its AVX-512
// emulation of them) on the avx512 paths and above, float32 products of the widened operands
// below ("exact fallback": the same products and sums, other kernels).
std::string gemm_bf16_backend_info();
// Whether this CPU multiplies bf16 in hardware on the current path (AVX512-BF16 or AMX): where
// `moe train --dtype bf16` is worth it.
bool bf16_native();

// GFLOP/s of independent fused multiply-adds on every thread, as wide as the kernel path allows
// (AVX-512, AVX2, or SSE2's multiply and add): the machine's floating-point peak.
double fma_peak_gflops();
// GB/s (1e9 bytes/s) of reading a buffer of `bytes` on every thread, each summing its share with
// the widest loads of the path: the best of 8 passes. The bandwidth floor of decoding.
double read_bandwidth_gbs(int64_t bytes = int64_t{2} << 30);

// y[j] = exp(x[j] - shift) for j < n (y may be x); returns their sum. float32 runs on the
// kernel path's vectors (Highway's exp: at most 1 ulp from the correctly rounded exp; the sum
// lane-wise, then across lanes), float64 on std::exp in order. The arguments must be <= 88
// (float32; softmax's x - max is <= 0).
template <class T>
T exp_shifted(T* y, const T* x, int64_t n, T shift);
template <>
float exp_shifted<float>(float* y, const float* x, int64_t n, float shift);
template <>
double exp_shifted<double>(double* y, const double* x, int64_t n, double shift);

// One query row's attention over keys and values j in [lo, hi) of a cache (lo < hi):
// s_j = scale q.k_j, p = softmax(s_lo, ..., s_{hi-1}, sink) (sink, when not null, a logit that
// takes part in the normalisation and has no value), out[dv] = sum_j p_j v_j; k_j at k + j ldk
// (dk values), v_j at v + j ldv (dv values); scratch: hi - lo values. float32 runs on the kernel
// path's vectors (each score a dot product on its own lanes, exp_shifted's exponential, the
// values' sum j by j per lane): a row's result depends only on its own keys, not on the rows or
// thread it runs with. float64 sums in order with std::exp: the reference.
template <class T>
void attend_row(T* out, const T* q, const T* k, int64_t ldk, int64_t dk, const T* v, int64_t ldv,
                int64_t dv, int64_t lo, int64_t hi, T scale, const T* sink, T* scratch);
template <>
void attend_row<float>(float* out, const float* q, const float* k, int64_t ldk, int64_t dk,
                       const float* v, int64_t ldv, int64_t dv, int64_t lo, int64_t hi, float scale,
                       const float* sink, float* scratch);
template <>
void attend_row<double>(double* out, const double* q, const double* k, int64_t ldk, int64_t dk,
                        const double* v, int64_t ldv, int64_t dv, int64_t lo, int64_t hi,
                        double scale, const double* sink, double* scratch);

// out[rows, cols] = softmax(in) per row; lse[rows] = logsumexp of each row (may be null).
template <class T>
void softmax_rows(T* out, T* lse, const T* in, int64_t rows, int64_t cols);

// For each row of in[rows, cols]: idx[rows, k] and val[rows, k] of the k largest values, largest
// first; ties go to the lowest column index. Requires 1 <= k <= cols and no NaN.
template <class T>
void topk_rows(int32_t* idx, T* val, const T* in, int64_t rows, int64_t cols, int64_t k);

// out[n] = act(in[n]); din[n] = dout * act'(in) (writes din).
template <class T>
void act_forward(Activation act, T* out, const T* in, int64_t n);
template <class T>
void act_backward(Activation act, T* din, const T* dout, const T* in, int64_t n);

// SwiGLU (Shazeer 2020): h[n] = silu(a_gate) * a_up, and its backward (writes da_gate, da_up).
template <class T>
void swiglu_forward(T* h, const T* a_gate, const T* a_up, int64_t n);
template <class T>
void swiglu_backward(T* da_gate, T* da_up, const T* dh, const T* a_gate, const T* a_up, int64_t n);

}  // namespace cpu
}  // namespace moe
