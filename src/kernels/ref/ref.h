// Naive scalar kernels: the oracle for src/kernels/cpu. Same signatures as moe/kernels.h, written
// for clarity, not speed, and templated so they run in float and in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moe/kernels.h"

namespace moe::ref {

template <class T>
T silu(T x) {
  return x / (T(1) + std::exp(-x));
}
template <class T>
T silu_grad(T x) {
  const T s = T(1) / (T(1) + std::exp(-x));
  return s * (T(1) + x * (T(1) - s));
}
// GELU with the exact Gaussian CDF (Hendrycks and Gimpel 2016), PyTorch's default.
template <class T>
T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x / std::sqrt(T(2))));
}
template <class T>
T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x / std::sqrt(T(2))));
  const T pdf = std::exp(T(-0.5) * x * x) / std::sqrt(T(2) * T(M_PI));
  return cdf + x * pdf;
}
template <class T>
T act(Activation a, T x) {
  switch (a) {
    case Activation::relu: return x > T(0) ? x : T(0);
    case Activation::gelu: return gelu(x);
    case Activation::silu: return silu(x);
  }
  return x;
}
template <class T>
T act_grad(Activation a, T x) {
  switch (a) {
    case Activation::relu: return x > T(0) ? T(1) : T(0);
    case Activation::gelu: return gelu_grad(x);
    case Activation::silu: return silu_grad(x);
  }
  return T(1);
}

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = trans_a ? a[p * lda + i] : a[i * lda + p];
        const T bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        s += av * bv;
      }
      c[i * ldc + j] = alpha * s + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
}

template <class T>
void softmax_rows(T* out, T* lse, const T* in, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = in + r * cols;
    const T mx = *std::max_element(x, x + cols);
    T sum = 0;
    for (int64_t c = 0; c < cols; ++c) sum += std::exp(x[c] - mx);
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = std::exp(x[c] - mx) / sum;
    if (lse) lse[r] = mx + std::log(sum);
  }
}

template <class T>
void topk_rows(int32_t* idx, T* val, const T* in, int64_t rows, int64_t cols, int64_t k) {
  std::vector<int32_t> order(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = in + r * cols;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t p, int32_t q) { return x[p] > x[q]; });
    for (int64_t j = 0; j < k; ++j) {
      idx[r * k + j] = order[static_cast<size_t>(j)];
      val[r * k + j] = x[order[static_cast<size_t>(j)]];
    }
  }
}

template <class T>
void act_forward(Activation a, T* out, const T* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = act(a, in[i]);
}
template <class T>
void act_backward(Activation a, T* din, const T* dout, const T* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) din[i] = dout[i] * act_grad(a, in[i]);
}
template <class T>
void swiglu_forward(T* h, const T* a_gate, const T* a_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = silu(a_gate[i]) * a_up[i];
}
template <class T>
void swiglu_backward(T* da_gate, T* da_up, const T* dh, const T* a_gate, const T* a_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    da_gate[i] = dh[i] * a_up[i] * silu_grad(a_gate[i]);
    da_up[i] = dh[i] * silu(a_gate[i]);
  }
}

}  // namespace moe::ref
