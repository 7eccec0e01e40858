// Row-wise and element-wise CPU kernels: softmax, top-k, activations. Parallel over rows or
// chunks of elements; each output element is computed by one thread in a fixed order, so the
// results do not depend on the thread count.
#include "moe/kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/isa/isa_kernels.h"
#include "kernels/ref/ref.h"
#include "moe/threading.h"

namespace moe {

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::silu: return "silu";
  }
  return "?";
}

namespace cpu {

template <class T>
void softmax_rows(T* out, T* lse, const T* in, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = in + r * cols;
    T* y = out + r * cols;
    T mx = x[0];
    for (int64_t c = 1; c < cols; ++c) mx = std::max(mx, x[c]);
    T sum = 0;
    for (int64_t c = 0; c < cols; ++c) {
      y[c] = std::exp(x[c] - mx);
      sum += y[c];
    }
    const T inv = T(1) / sum;
    for (int64_t c = 0; c < cols; ++c) y[c] *= inv;
    if (lse) lse[r] = mx + std::log(sum);
  }
}

template <class T>
void topk_rows(int32_t* idx, T* val, const T* in, int64_t rows, int64_t cols, int64_t k) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    // Insertion into a sorted list of the k best so far. A later column displaces an earlier
    // one only when strictly larger, so ties keep the lowest index.
    const T* x = in + r * cols;
    int32_t* ri = idx + r * k;
    T* rv = val + r * k;
    int64_t filled = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const T v = x[c];
      if (filled == k && !(v > rv[k - 1])) continue;
      int64_t p = filled < k ? filled++ : k - 1;
      while (p > 0 && v > rv[p - 1]) {
        rv[p] = rv[p - 1];
        ri[p] = ri[p - 1];
        --p;
      }
      rv[p] = v;
      ri[p] = static_cast<int32_t>(c);
    }
  }
}

template <class T>
void act_forward(Activation act, T* out, const T* in, int64_t n) {
  switch (act) {
    case Activation::relu:
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] > T(0) ? in[i] : T(0);
      break;
    case Activation::gelu:
#pragma omp parallel for schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) out[i] = ref::gelu(in[i]);
      break;
    case Activation::silu:
#pragma omp parallel for schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) out[i] = ref::silu(in[i]);
      break;
  }
}

template <class T>
void act_backward(Activation act, T* din, const T* dout, const T* in, int64_t n) {
  switch (act) {
    case Activation::relu:
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) din[i] = in[i] > T(0) ? dout[i] : T(0);
      break;
    case Activation::gelu:
#pragma omp parallel for schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) din[i] = dout[i] * ref::gelu_grad(in[i]);
      break;
    case Activation::silu:
#pragma omp parallel for schedule(static) if (n > kParallelMin)
      for (int64_t i = 0; i < n; ++i) din[i] = dout[i] * ref::silu_grad(in[i]);
      break;
  }
}

template <class T>
void swiglu_forward(T* h, const T* a_gate, const T* a_up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T g = a_gate[i];
    h[i] = g / (T(1) + std::exp(-g)) * a_up[i];
  }
}

template <class T>
void swiglu_backward(T* da_gate, T* da_up, const T* dh, const T* a_gate, const T* a_up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    // Read every input before writing, so the outputs may alias the inputs.
    const T g = a_gate[i];
    const T u = a_up[i];
    const T d = dh[i];
    const T s = T(1) / (T(1) + std::exp(-g));
    da_up[i] = d * g * s;
    da_gate[i] = d * u * s * (T(1) + g * (T(1) - s));
  }
}

template <>
float exp_shifted<float>(float* y, const float* x, int64_t n, float shift) {
  return path_kernels().exp_shifted(y, x, n, shift);
}

template <>
void attend_row<float>(float* out, const float* q, const float* k, int64_t ldk, int64_t dk,
                       const float* v, int64_t ldv, int64_t dv, int64_t lo, int64_t hi, float scale,
                       const float* sink, float* scratch) {
  path_kernels().attend_f32(out, q, k, ldk, dk, v, ldv, dv, lo, hi, scale, sink, scratch);
}

template <>
void attend_row<double>(double* out, const double* q, const double* k, int64_t ldk, int64_t dk,
                        const double* v, int64_t ldv, int64_t dv, int64_t lo, int64_t hi,
                        double scale, const double* sink, double* s) {
  const int64_t n = hi - lo;
  double mx = sink ? *sink : -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const double* kj = k + (lo + j) * ldk;
    double t = 0;
    for (int64_t c = 0; c < dk; ++c) t += q[c] * kj[c];
    s[j] = scale * t;
    mx = std::max(mx, s[j]);
  }
  double sum = sink ? std::exp(*sink - mx) : 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  for (int64_t c = 0; c < dv; ++c) out[c] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double p = s[j] / sum;
    const double* vj = v + (lo + j) * ldv;
    for (int64_t c = 0; c < dv; ++c) out[c] += p * vj[c];
  }
}

template <>
double exp_shifted<double>(double* y, const double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    y[i] = std::exp(x[i] - shift);
    sum += y[i];
  }
  return sum;
}

// float32 on the per-ISA kernels (Highway's exp), in blocks fixed by n: the same bits on any
// thread count.
constexpr int64_t kSwigluBlock = 4096;

template <>
void swiglu_forward<float>(float* h, const float* a_gate, const float* a_up, int64_t n) {
  const IsaKernels& k = path_kernels();
  const int64_t blocks = (n + kSwigluBlock - 1) / kSwigluBlock;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = b * kSwigluBlock;
    k.swiglu_forward(h + i, a_gate + i, a_up + i, std::min(kSwigluBlock, n - i));
  }
}

template <>
void swiglu_backward<float>(float* da_gate, float* da_up, const float* dh, const float* a_gate,
                            const float* a_up, int64_t n) {
  const IsaKernels& k = path_kernels();
  const int64_t blocks = (n + kSwigluBlock - 1) / kSwigluBlock;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = b * kSwigluBlock;
    k.swiglu_backward(da_gate + i, da_up + i, dh + i, a_gate + i, a_up + i,
                      std::min(kSwigluBlock, n - i));
  }
}

#define MOE_INSTANTIATE(T)                                                       \
  template void softmax_rows<T>(T*, T*, const T*, int64_t, int64_t);             \
  template void topk_rows<T>(int32_t*, T*, const T*, int64_t, int64_t, int64_t); \
  template void act_forward<T>(Activation, T*, const T*, int64_t);               \
  template void act_backward<T>(Activation, T*, const T*, const T*, int64_t);

MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
template void swiglu_forward<double>(double*, const double*, const double*, int64_t);
template void swiglu_backward<double>(double*, double*, const double*, const double*, const double*,
                                      int64_t);
#undef MOE_INSTANTIATE

}  // namespace cpu
}  // namespace moe
