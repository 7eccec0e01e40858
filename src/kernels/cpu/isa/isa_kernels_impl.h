// The body of the per-ISA kernels (isa_kernels.h). The including file defines
// MOE_ISA_NS (its namespace) and MOE_ISA_TABLE (the table it fills), after choosing the ISA with
// its compiler flags; Highway's static target follows those flags.
#include <hwy/highway.h>
// After highway.h: the math functions of the same target.
#include <hwy/contrib/math/math-inl.h>

#include "kernels/cpu/isa/isa_kernels.h"
#include "kernels/cpu/isa/scalar_convert.h"

namespace moe::cpu::MOE_ISA_NS {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Stored rows, each lane widened to float32 (load: L lanes from element k of row r).
struct F32Rows {
  const float* w;
  int64_t cols;
  HWY_INLINE void prefetch(int64_t r, int64_t k) const {
    if (k < cols) __builtin_prefetch(w + r * cols + k);
  }
  HWY_INLINE VF load(DF d, int64_t r, int64_t k) const { return hn::LoadU(d, w + r * cols + k); }
  HWY_INLINE float at(int64_t r, int64_t k) const { return w[r * cols + k]; }
};

// 16-bit floats (Half: hwy::bfloat16_t or hwy::float16_t), widened exactly to float32.
template <class Half, float (*ToF32)(uint16_t)>
struct HalfRows {
  const uint16_t* w;
  int64_t cols;
  HWY_INLINE void prefetch(int64_t r, int64_t k) const {
    if (k < cols) __builtin_prefetch(w + r * cols + k);
  }
  HWY_INLINE VF load(DF d, int64_t r, int64_t k) const {
    const hn::Rebind<Half, DF> dh;
    return hn::PromoteTo(d, hn::LoadU(dh, reinterpret_cast<const Half*>(w + r * cols + k)));
  }
  HWY_INLINE float at(int64_t r, int64_t k) const {
    return ToF32(scalar::load16(w + r * cols + k));
  }
};
using Bf16Rows = HalfRows<hwy::bfloat16_t, scalar::bf16_to_f32>;
using F16Rows = HalfRows<hwy::float16_t, scalar::f16_to_f32>;

struct I8Rows {
  const int8_t* w;
  int64_t cols;
  HWY_INLINE void prefetch(int64_t r, int64_t k) const {
    if (k < cols) __builtin_prefetch(w + r * cols + k);
  }
  HWY_INLINE VF load(DF d, int64_t r, int64_t k) const {
    const hn::Rebind<int32_t, DF> di;
    const hn::Rebind<int8_t, DF> d8;
    return hn::ConvertTo(d, hn::PromoteTo(di, hn::LoadU(d8, w + r * cols + k)));
  }
  HWY_INLINE float at(int64_t r, int64_t k) const { return static_cast<float>(w[r * cols + k]); }
};

// One accumulator per weight row, summed lane-wise over k in steps of L, then across lanes, then
// the scalar tail: the same order for a row whichever block it falls in, so a row's result does
// not depend on how the rows were split.
// Elements ahead of the loads that the dot product prefetches, in each of the four rows it reads
// at once; a row's stream goes on into the row four further once it ends, so that the distance
// holds for short rows too (an expert's down projection has 768 columns) and the next rows start
// warm. With 256 elements ahead and no look past a row's end, the 768-column rows were read at
// 80% of the long rows' speed; with this, 89% (decoding's per-product rates); 2048 is no better.
constexpr int64_t kAhead = 1024;

template <class W>
HWY_INLINE void dot(const W& w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
                    int64_t r1, float* y, int64_t ldy, const float* scale) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const int64_t kv = cols - cols % L;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * ldx;
      VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
      for (int64_t k = 0; k < kv; k += L) {
        if (i == 0) {  // the four rows' lines kAhead elements ahead
          int64_t pr = r, pk = k + kAhead;
          while (pk >= cols) {  // past the rows' end: the next four rows' lines
            pr += 4;
            pk -= cols;
          }
          if (pr + 4 <= r1) {
            w.prefetch(pr, pk);
            w.prefetch(pr + 1, pk);
            w.prefetch(pr + 2, pk);
            w.prefetch(pr + 3, pk);
          }
        }
        const VF xv = hn::LoadU(d, xi + k);
        a0 = hn::MulAdd(w.load(d, r, k), xv, a0);
        a1 = hn::MulAdd(w.load(d, r + 1, k), xv, a1);
        a2 = hn::MulAdd(w.load(d, r + 2, k), xv, a2);
        a3 = hn::MulAdd(w.load(d, r + 3, k), xv, a3);
      }
      float s[4] = {hn::GetLane(hn::SumOfLanes(d, a0)), hn::GetLane(hn::SumOfLanes(d, a1)),
                    hn::GetLane(hn::SumOfLanes(d, a2)), hn::GetLane(hn::SumOfLanes(d, a3))};
      for (int j = 0; j < 4; ++j) {
        for (int64_t k = kv; k < cols; ++k) s[j] += w.at(r + j, k) * xi[k];
        y[i * ldy + r + j] = scale ? s[j] * scale[r + j] : s[j];
      }
    }
  }
  for (; r < r1; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * ldx;
      VF a = hn::Zero(d);
      for (int64_t k = 0; k < kv; k += L) a = hn::MulAdd(w.load(d, r, k), hn::LoadU(d, xi + k), a);
      float s = hn::GetLane(hn::SumOfLanes(d, a));
      for (int64_t k = kv; k < cols; ++k) s += w.at(r, k) * xi[k];
      y[i * ldy + r] = scale ? s * scale[r] : s;
    }
  }
}

template <class W>
HWY_INLINE void rows(const W& w, int64_t cols, int64_t r0, int64_t r1, float* out,
                     const float* scale) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const int64_t kv = cols - cols % L;
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + (r - r0) * cols;
    if (scale) {
      const VF s = hn::Set(d, scale[r]);
      for (int64_t k = 0; k < kv; k += L) hn::StoreU(hn::Mul(w.load(d, r, k), s), d, o + k);
      for (int64_t k = kv; k < cols; ++k) o[k] = w.at(r, k) * scale[r];
    } else {
      for (int64_t k = 0; k < kv; k += L) hn::StoreU(w.load(d, r, k), d, o + k);
      for (int64_t k = kv; k < cols; ++k) o[k] = w.at(r, k);
    }
  }
}

void dot_f32(const float* w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
             int64_t r1, float* y, int64_t ldy) {
  dot(F32Rows{w, cols}, cols, x, ldx, n, r0, r1, y, ldy, nullptr);
}
void dot_bf16(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  dot(Bf16Rows{w, cols}, cols, x, ldx, n, r0, r1, y, ldy, nullptr);
}
void dot_f16(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
             int64_t r1, float* y, int64_t ldy) {
  dot(F16Rows{w, cols}, cols, x, ldx, n, r0, r1, y, ldy, nullptr);
}
void dot_i8(const int8_t* w, const float* scale, int64_t cols, const float* x, int64_t ldx,
            int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  dot(I8Rows{w, cols}, cols, x, ldx, n, r0, r1, y, ldy, scale);
}
void rows_bf16(const uint16_t* w, int64_t cols, int64_t r0, int64_t r1, float* out) {
  rows(Bf16Rows{w, cols}, cols, r0, r1, out, nullptr);
}
void rows_f16(const uint16_t* w, int64_t cols, int64_t r0, int64_t r1, float* out) {
  rows(F16Rows{w, cols}, cols, r0, r1, out, nullptr);
}
void rows_i8(const int8_t* w, const float* scale, int64_t cols, int64_t r0, int64_t r1,
             float* out) {
  rows(I8Rows{w, cols}, cols, r0, r1, out, scale);
}

void to_bf16(const float* x, int64_t n, uint16_t* out) {
  const DF d;
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, decltype(di)> d16;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const auto one = hn::Set(du, 1u), half = hn::Set(du, 0x7fffu), quiet = hn::Set(du, 0x40u);
  const auto abs_mask = hn::Set(du, 0x7fffffffu);
  const auto inf = hn::Set(di, 0x7f800000);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const auto bits = hn::BitCast(du, hn::LoadU(d, x + i));
    const auto top = hn::ShiftRight<16>(bits);
    const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(half, hn::And(top, one))));
    const auto is_nan = hn::Gt(hn::BitCast(di, hn::And(bits, abs_mask)), inf);
    const auto r = hn::IfThenElse(hn::RebindMask(du, is_nan), hn::Or(top, quiet), rounded);
    hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, r)), d16, out + i);
  }
  for (; i < n; ++i) out[i] = scalar::f32_to_bf16(x[i]);
}

// The logistic sigmoid 1 / (1 + exp(-g)); -g is capped at 88 so that exp stays finite (beyond
// it the sigmoid is below 1e-38 either way).
HWY_INLINE VF sigmoid(DF d, VF g) {
  const VF one = hn::Set(d, 1.0f);
  return hn::Div(one, hn::Add(one, hn::Exp(d, hn::Min(hn::Neg(g), hn::Set(d, 88.0f)))));
}

// Runs body(i, d) over the vectors of n elements; the tail goes through a padded vector (the
// lanes past n read zeros and are not written back). body reads and writes through the pointers
// it is given, so the tail's are the copies.
template <int kIn, int kOut, class Body>
HWY_INLINE void by_vectors(int64_t n, const float* const (&in)[kIn], float* const (&out)[kOut],
                           const Body& body) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    VF x[kIn];
    for (int j = 0; j < kIn; ++j) x[j] = hn::LoadU(d, in[j] + i);
    VF y[kOut];
    body(d, x, y);
    for (int j = 0; j < kOut; ++j) hn::StoreU(y[j], d, out[j] + i);
  }
  if (i == n) return;
  HWY_ALIGN float buf[kIn > kOut ? kIn : kOut][HWY_MAX_BYTES / sizeof(float)] = {};
  VF x[kIn];
  for (int j = 0; j < kIn; ++j) {
    for (int64_t t = 0; t < n - i; ++t) buf[j][t] = in[j][i + t];
    x[j] = hn::Load(d, buf[j]);
  }
  VF y[kOut];
  body(d, x, y);
  for (int j = 0; j < kOut; ++j) {
    hn::Store(y[j], d, buf[j]);
    for (int64_t t = 0; t < n - i; ++t) out[j][i + t] = buf[j][t];
  }
}

void swiglu_forward(float* h, const float* g, const float* u, int64_t n) {
  const float* const in[2] = {g, u};
  float* const out[1] = {h};
  by_vectors<2, 1>(n, in, out, [](DF d, const VF* x, VF* y) {
    y[0] = hn::Mul(hn::Mul(x[0], sigmoid(d, x[0])), x[1]);
  });
}

void swiglu_backward(float* dg, float* du, const float* dh, const float* g, const float* u,
                     int64_t n) {
  const float* const in[3] = {dh, g, u};
  float* const out[2] = {dg, du};
  by_vectors<3, 2>(n, in, out, [](DF d, const VF* x, VF* y) {
    const VF one = hn::Set(d, 1.0f);
    const VF s = sigmoid(d, x[1]);
    y[1] = hn::Mul(hn::Mul(x[0], x[1]), s);  // dh g s
    // dh u s (1 + g (1 - s))
    y[0] = hn::Mul(hn::Mul(hn::Mul(x[0], x[2]), s), hn::Add(one, hn::Mul(x[1], hn::Sub(one, s))));
  });
}

float exp_shifted(float* y, const float* x, int64_t n, float shift) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const VF sh = hn::Set(d, shift);
  VF acc = hn::Zero(d);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const VF e = hn::Exp(d, hn::Sub(hn::LoadU(d, x + i), sh));
    hn::StoreU(e, d, y + i);
    acc = hn::Add(acc, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, acc));
  if (i < n) {  // the tail through a padded vector; its extra lanes are not added
    HWY_ALIGN float buf[HWY_MAX_BYTES / sizeof(float)] = {};
    for (int64_t t = 0; t < n - i; ++t) buf[t] = x[i + t];
    hn::Store(hn::Exp(d, hn::Sub(hn::Load(d, buf), sh)), d, buf);
    for (int64_t t = 0; t < n - i; ++t) {
      y[i + t] = buf[t];
      sum += buf[t];
    }
  }
  return sum;
}

// Four keys at a time, each dot product on its own accumulator (the lanes summed at the end):
// a key's score does not depend on the keys beside it.
void attend_f32(float* out, const float* q, const float* k, int64_t ldk, int64_t dk, const float* v,
                int64_t ldv, int64_t dv, int64_t lo, int64_t hi, float scale, const float* sink,
                float* s) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const int64_t kv = dk - dk % L, n = hi - lo;
  const auto score = [&](const float* kj, VF a) {
    float t = hn::GetLane(hn::SumOfLanes(d, a));
    for (int64_t c = kv; c < dk; ++c) t += kj[c] * q[c];
    return t * scale;
  };
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + (lo + j) * ldk;
    const float *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
    VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    for (int64_t c = 0; c < kv; c += L) {
      const VF qv = hn::LoadU(d, q + c);
      a0 = hn::MulAdd(hn::LoadU(d, k0 + c), qv, a0);
      a1 = hn::MulAdd(hn::LoadU(d, k1 + c), qv, a1);
      a2 = hn::MulAdd(hn::LoadU(d, k2 + c), qv, a2);
      a3 = hn::MulAdd(hn::LoadU(d, k3 + c), qv, a3);
    }
    s[j] = score(k0, a0);
    s[j + 1] = score(k1, a1);
    s[j + 2] = score(k2, a2);
    s[j + 3] = score(k3, a3);
  }
  for (; j < n; ++j) {
    const float* kj = k + (lo + j) * ldk;
    VF a = hn::Zero(d);
    for (int64_t c = 0; c < kv; c += L)
      a = hn::MulAdd(hn::LoadU(d, kj + c), hn::LoadU(d, q + c), a);
    s[j] = score(kj, a);
  }
  float mx = sink ? *sink : s[0];
  for (j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = exp_shifted(s, s, n, mx);
  if (sink) sum += std::exp(*sink - mx);
  const VF inv = hn::Set(d, 1.0f / sum);
  const int64_t vv = dv - dv % L;
  for (int64_t c = 0; c < vv; c += L) {
    VF a = hn::Zero(d);
    for (j = 0; j < n; ++j)
      a = hn::MulAdd(hn::Set(d, s[j]), hn::LoadU(d, v + (lo + j) * ldv + c), a);
    hn::StoreU(hn::Mul(a, inv), d, out + c);
  }
  for (int64_t c = vv; c < dv; ++c) {
    float a = 0;
    for (j = 0; j < n; ++j) a += s[j] * v[(lo + j) * ldv + c];
    out[c] = a * (1.0f / sum);
  }
}

void adamw_f32(float* p, const float* g, double* m, double* v, int64_t n, const double* c) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> dfh;
  const int64_t L = static_cast<int64_t>(hn::Lanes(dd));
  const double b1 = c[1], b2 = c[2];
  const auto decay = hn::Set(dd, c[0]), vb1 = hn::Set(dd, b1), vb2 = hn::Set(dd, b2);
  const auto nb1 = hn::Set(dd, 1 - b1), nb2 = hn::Set(dd, 1 - b2), eps = hn::Set(dd, c[3]);
  const auto step = hn::Set(dd, c[4]), bc2 = hn::Set(dd, c[5]);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const auto gi = hn::PromoteTo(dd, hn::LoadU(dfh, g + i));
    const auto pi = hn::Mul(hn::PromoteTo(dd, hn::LoadU(dfh, p + i)), decay);
    const auto mi = hn::Add(hn::Mul(vb1, hn::LoadU(dd, m + i)), hn::Mul(nb1, gi));
    const auto vi = hn::Add(hn::Mul(vb2, hn::LoadU(dd, v + i)), hn::Mul(hn::Mul(nb2, gi), gi));
    hn::StoreU(mi, dd, m + i);
    hn::StoreU(vi, dd, v + i);
    const auto denom = hn::Add(hn::Div(hn::Sqrt(vi), bc2), eps);
    hn::StoreU(hn::DemoteTo(dfh, hn::Sub(pi, hn::Div(hn::Mul(step, mi), denom))), dfh, p + i);
  }
  for (; i < n; ++i) {
    const double gi = g[i], pi = static_cast<double>(p[i]) * c[0];
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    const double denom = __builtin_sqrt(v[i]) / c[5] + c[3];
    p[i] = static_cast<float>(pi - c[4] * m[i] / denom);
  }
}

}  // namespace
}  // namespace moe::cpu::MOE_ISA_NS

#include "kernels/cpu/isa/quant_dot_impl.h"
#include "kernels/cpu/isa/quant_int_impl.h"

namespace moe::cpu::MOE_ISA_NS {
namespace {

void dot_q(QuantFormat q, const uint8_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n,
           int64_t r0, int64_t r1, float* y, int64_t ldy, const QuantRows* xq) {
  if (xq) return dot_q_int(q.kind, q.block_bytes, w, cols, *xq, n, r0, r1, y, ldy);
  switch (q.kind) {
    case QuantKind::q8_0: return dot_rows<Q8_0>(w, cols, x, ldx, n, r0, r1, y, ldy);
    case QuantKind::q4_0: return dot_rows<Q4_0>(w, cols, x, ldx, n, r0, r1, y, ldy);
    case QuantKind::q6_k: return dot_rows<Q6_K>(w, cols, x, ldx, n, r0, r1, y, ldy);
    case QuantKind::q4_k:
      if (cols / 32 <= kMaxSubBlocks)
        return dot_rows<QK<false>>(w, cols, x, ldx, n, r0, r1, y, ldy);
      break;
    case QuantKind::q5_k:
      if (cols / 32 <= kMaxSubBlocks) return dot_rows<QK<true>>(w, cols, x, ldx, n, r0, r1, y, ldy);
      break;
    case QuantKind::mxfp4: return dot_rows<MXFP4>(w, cols, x, ldx, n, r0, r1, y, ldy);
    case QuantKind::other: break;
  }
  dot_decoded(q, w, cols, x, ldx, n, r0, r1, y, ldy);
}

}  // namespace
}  // namespace moe::cpu::MOE_ISA_NS

namespace moe::cpu {
// Highway's name of the target these flags made static.
constexpr const char* kTargetName = HWY_TARGET == HWY_AVX3_DL  ? "AVX3_DL"
                                    : HWY_TARGET == HWY_AVX3   ? "AVX3"
                                    : HWY_TARGET == HWY_AVX2   ? "AVX2"
                                    : HWY_TARGET == HWY_SSE4   ? "SSE4"
                                    : HWY_TARGET == HWY_SSSE3  ? "SSSE3"
                                    : HWY_TARGET == HWY_EMU128 ? "EMU128"
                                    : HWY_TARGET == HWY_SCALAR ? "SCALAR"
                                                               : "other";
const IsaKernels MOE_ISA_TABLE = {kTargetName,
                                  MOE_ISA_NS::dot_f32,
                                  MOE_ISA_NS::dot_bf16,
                                  MOE_ISA_NS::dot_f16,
                                  MOE_ISA_NS::dot_i8,
                                  MOE_ISA_NS::dot_q,
                                  MOE_ISA_NS::rows_bf16,
                                  MOE_ISA_NS::rows_f16,
                                  MOE_ISA_NS::rows_i8,
                                  MOE_ISA_NS::to_bf16,
                                  MOE_ISA_NS::swiglu_forward,
                                  MOE_ISA_NS::swiglu_backward,
                                  MOE_ISA_NS::exp_shifted,
                                  MOE_ISA_NS::attend_f32,
                                  MOE_ISA_NS::adamw_f32};
}  // namespace moe::cpu
