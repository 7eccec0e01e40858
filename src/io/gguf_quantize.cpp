// Quantization to ggml's block types, bit-identical to ggml's reference quantizers (ggml-quants.c:
// quantize_row_q8_0_ref, quantize_row_q4_0_ref, quantize_row_q5_0_ref, quantize_row_q5_1_ref,
// quantize_row_q4_K_ref and quantize_row_q5_K_ref with make_qkx2_quants, quantize_row_q6_K_ref
// with make_qx_quants, quantize_row_mxfp4_ref), which is what llama-quantize runs when it is given
// no importance matrix. Every float32 operation is the reference's, in its order: the same
// rounding gives the same codes. The block layouts are those gguf_quants.cpp decodes.
//
// This file is compiled with -ffp-contract=off (CMakeLists.txt): ggml's reference is built
// without fused multiply-adds (its base library targets baseline x86-64), so `a * b + c` rounds
// twice there, and must here.
#include <cmath>
#include <cstring>

#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/weights.h"

namespace moe {

namespace {

using u8 = uint8_t;

// ggml's nearest_int: round to nearest, ties to even, by adding 1.5 * 2^23 and reading the low
// mantissa bits (valid for |x| <= 2^22 - 1).
inline int nearest_int(float x) {
  const float v = x + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

inline void put_f16(u8* p, float x) {
  const uint16_t h = f32_to_f16(x);
  p[0] = static_cast<u8>(h & 0xff);
  p[1] = static_cast<u8>(h >> 8);
}
inline float f16_round(float x) { return f16_to_f32(f32_to_f16(x)); }

// ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros.
constexpr float kGroupMaxEps = 1e-15f;

// Q8_0 (quantize_row_q8_0_ref): d = amax / 127 (f16), q = round(x / d) (half away from zero).
void q8_0_block(const float* x, u8* y) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  for (int j = 0; j < 32; ++j)
    y[2 + j] = static_cast<u8>(static_cast<int8_t>(std::roundf(x[j] * id)));
}

// Q4_0 (quantize_row_q4_0_ref): d = max / -8, where max is the element of largest magnitude
// (the first such); q = min(15, trunc(x / d + 8.5)).
void q4_0_block(const float* x, u8* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -8;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  for (int j = 0; j < 16; ++j) {
    const u8 lo =
        static_cast<u8>(std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f))));
    const u8 hi =
        static_cast<u8>(std::min(15, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 8.5f))));
    y[2 + j] = static_cast<u8>(lo | (hi << 4));
  }
}

// Q5_0 (quantize_row_q5_0_ref): d = max / -16, q = min(31, trunc(x / d + 16.5)); the fifth bits
// in a 32-bit word (bit j for element j).
void q5_0_block(const float* x, u8* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -16;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const u8 a =
        static_cast<u8>(std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * id + 16.5f))));
    const u8 b = static_cast<u8>(
        std::min(31, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 16.5f))));
    y[6 + j] = static_cast<u8>((a & 0xF) | ((b & 0xF) << 4));
    qh |= static_cast<uint32_t>((a & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((b & 0x10u) >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) y[2 + k] = static_cast<u8>(qh >> (8 * k));
}

// Q5_1 (quantize_row_q5_1_ref): d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5).
void q5_1_block(const float* x, u8* y) {
  float min = x[0], max = x[0];
  for (int j = 1; j < 32; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / 31;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  put_f16(y + 2, min);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const u8 a = static_cast<u8>((x[j] - min) * id + 0.5f);
    const u8 b = static_cast<u8>((x[j + 16] - min) * id + 0.5f);
    y[8 + j] = static_cast<u8>((a & 0xF) | ((b & 0xF) << 4));
    qh |= static_cast<uint32_t>((a & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((b & 0x10u) >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) y[4 + k] = static_cast<u8>(qh >> (8 * k));
}

// MXFP4 (quantize_row_mxfp4_ref): the shared exponent e = floor(log2(amax)) - 2 + 127 (E8M0),
// each element the E2M1 code nearest to x / 2^(e - 127) (the first of equals), ggml holding the
// codes doubled and the scale halved (kvalues_mxfp4, ggml_e8m0_to_fp32_half).
constexpr int8_t kMxfp4Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
inline int mxfp4_best(float x, float e) {
  int best = 0;
  float best_err = std::fabs(static_cast<float>(kMxfp4Doubled[0]) * e - x);
  for (int i = 1; i < 16; ++i) {
    const float err = std::fabs(static_cast<float>(kMxfp4Doubled[i]) * e - x);
    if (err < best_err) {
      best = i;
      best_err = err;
    }
  }
  return best;
}
void mxfp4_block(const float* x, u8* y) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]);
  // As ggml: the float expression converted to an integer, its low byte kept.
  const u8 e = amax > 0.0f
                   ? static_cast<u8>(static_cast<int>(std::floor(std::log2(amax)) - 2 + 127))
                   : u8{0};
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  y[0] = e;
  for (int j = 0; j < 16; ++j)
    y[1 + j] = static_cast<u8>(mxfp4_best(x[j], d) | (mxfp4_best(x[j + 16], d) << 4));
}

// make_qkx2_quants: codes L in [0, nmax] and a scale and offset for n values with weights w,
// minimizing the weighted squared error: the start from (min, max), then nstep + 1 trials of the
// scale (rmin + rdelta * is + nmax) / (max - min), each refit by weighted least squares. Returns
// the scale; *the_min gets the offset, negated (a non-negative number).
float make_qkx2_quants(int n, int nmax, const float* x, const float* w, u8* L, float* the_min,
                       u8* Laux, float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<u8>(std::max(0, std::min(nmax, l)));
    float diff = scale * static_cast<float>(L[i]) + min - x[i];
    diff = diff * diff;
    best_error += w[i] * diff;
  }
  if (nstep < 1) {
    *the_min = -min;
    return scale;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<u8>(l);
      const float fl = static_cast<float>(l);
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * static_cast<float>(Laux[i]) + this_min - x[i];
        diff = diff * diff;
        cur_error += w[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// Q4_K and Q5_K (quantize_row_q4_K_ref, quantize_row_q5_K_ref): 8 sub-blocks of 32, each fitted
// by make_qkx2_quants with weights sqrt(mean x^2) + |x|; their scales and mins quantized to 6
// bits against the largest (d, dmin as f16, packed as scale_min_k4 reads them); then every code
// recomputed from the rounded scales. L gets the 256 codes (0..nmax).
void k_scales_and_codes(const float* x, u8* y, int nmax, float rmin, int nstep, u8* L) {
  u8 Laux[32];
  float weights[32], mins[8], scales[8];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin,
                                 0.1f, nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  u8* sm = y + 4;
  for (int j = 0; j < 8; ++j) {
    const u8 ls = std::min<u8>(63, static_cast<u8>(nearest_int(inv_scale * scales[j])));
    const u8 lm = std::min<u8>(63, static_cast<u8>(nearest_int(inv_min * mins[j])));
    if (j < 4) {
      sm[j] = ls;
      sm[j + 4] = lm;
    } else {
      sm[j + 4] = static_cast<u8>((ls & 0xF) | ((lm & 0xF) << 4));
      sm[j - 4] = static_cast<u8>(sm[j - 4] | ((ls >> 4) << 6));
      sm[j] = static_cast<u8>(sm[j] | ((lm >> 4) << 6));
    }
  }
  put_f16(y, max_scale / 63.f);
  put_f16(y + 2, max_min / 63.f);
  const float d_all = f16_round(max_scale / 63.f), dmin_all = f16_round(max_min / 63.f);
  for (int j = 0; j < 8; ++j) {
    u8 sc, m;
    if (j < 4) {
      sc = sm[j] & 63;
      m = sm[j + 4] & 63;
    } else {
      sc = static_cast<u8>((sm[j + 4] & 0xF) | ((sm[j - 4] >> 6) << 4));
      m = static_cast<u8>((sm[j + 4] >> 4) | ((sm[j] >> 6) << 4));
    }
    const float d = d_all * static_cast<float>(sc);
    if (d == 0.0f) continue;  // the sub-block keeps make_qkx2_quants' codes
    const float dm = dmin_all * static_cast<float>(m);
    for (int ii = 0; ii < 32; ++ii) {
      const int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<u8>(std::max(0, std::min(nmax, l)));
    }
  }
}

void q4_k_block(const float* x, u8* y) {
  u8 L[256];
  k_scales_and_codes(x, y, 15, -1.f, 20, L);
  u8* q = y + 16;
  for (int j = 0; j < 256; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = static_cast<u8>(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

void q5_k_block(const float* x, u8* y) {
  u8 L[256];
  k_scales_and_codes(x, y, 31, -0.5f, 15, L);
  u8* qh = y + 16;
  u8* ql = y + 48;
  std::memset(qh, 0, 32);
  u8 m1 = 1, m2 = 2;
  for (int n = 0; n < 256; n += 64) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j];
      if (l1 > 15) {
        l1 -= 16;
        qh[j] |= m1;
      }
      int l2 = L[n + j + 32];
      if (l2 > 15) {
        l2 -= 16;
        qh[j] |= m2;
      }
      ql[j] = static_cast<u8>(l1 | (l2 << 4));
    }
    m1 = static_cast<u8>(m1 << 2);
    m2 = static_cast<u8>(m2 << 2);
    ql += 32;
  }
}

// make_qx_quants with rmse_type 1 and no importance weights: symmetric codes in
// [-nmax, nmax - 1] (stored + nmax in L) for n values weighted by x^2; the scale -nmax / max
// (max the value of largest magnitude), then 18 nearby scales (nmax + 0.1 is), each refit by
// weighted least squares, the best kept. Returns the scale.
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const auto code = [nmax](float v) { return std::max(-nmax, std::min(nmax - 1, nearest_int(v))); };
  float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = code(iscale * x[i]);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    const float fl = static_cast<float>(l);
    sumlx += w * x[i] * fl;
    suml2 += w * fl * fl;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const float fl = static_cast<float>(code(iscale * x[i]));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * fl;
      suml2 += w * fl * fl;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + code(iscale * x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q6_K (quantize_row_q6_K_ref): 16 sub-blocks of 16 fitted by make_qx_quants (nmax 32); their
// scales as int8 against the one of largest magnitude (d = that scale / -128, f16); every code
// recomputed from the rounded scales. Layout as gguf_quants.cpp's deq_q6_k reads it.
void q6_k_block(const float* x, u8* y) {
  int8_t L[256];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
    scales[ib] = scale;
    const float abs_scale = std::fabs(scale);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scale;
    }
  }
  u8* ql = y;
  u8* qh = y + 128;
  auto* sc = reinterpret_cast<int8_t*>(y + 192);
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(y, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  put_f16(y + 208, 1 / iscale);
  const float d_all = f16_round(1 / iscale);
  for (int ib = 0; ib < 16; ++ib)
    sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * static_cast<float>(sc[j]);
    if (d == 0.0f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      const int l = std::max(-32, std::min(31, nearest_int(x[16 * j + ii] / d)));
      L[16 * j + ii] = static_cast<int8_t>(l + 32);
    }
  }
  for (int j = 0; j < 256; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const auto c = [&](int k) { return static_cast<u8>(L[j + l + k]); };
      ql[l] = static_cast<u8>((c(0) & 0xF) | ((c(64) & 0xF) << 4));
      ql[l + 32] = static_cast<u8>((c(32) & 0xF) | ((c(96) & 0xF) << 4));
      qh[l] = static_cast<u8>((c(0) >> 4) | ((c(32) >> 4) << 2) | ((c(64) >> 4) << 4) |
                              ((c(96) >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

using BlockEncoder = void (*)(const float* x, u8* y);

BlockEncoder block_encoder(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: return q4_0_block;
    case GgmlType::Q5_0: return q5_0_block;
    case GgmlType::Q5_1: return q5_1_block;
    case GgmlType::Q8_0: return q8_0_block;
    case GgmlType::Q4_K: return q4_k_block;
    case GgmlType::Q5_K: return q5_k_block;
    case GgmlType::Q6_K: return q6_k_block;
    case GgmlType::MXFP4: return mxfp4_block;
    default: return nullptr;
  }
}

}  // namespace

bool ggml_can_quantize(GgmlType t) {
  return t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16 ||
         block_encoder(t) != nullptr;
}

void quantize_row(GgmlType t, const float* src, void* dst, int64_t n) {
  const GgmlTypeInfo& info = ggml_type_info(t);
  MOE_CHECK(n >= 0 && n % info.block == 0, "quantize",
            "{} elements of {}: not a multiple of its block of {}", n, info.name, info.block);
  auto* out = static_cast<u8*>(dst);
  switch (t) {
    case GgmlType::F32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::F16:
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = t == GgmlType::F16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
        out[2 * i] = static_cast<u8>(h & 0xff);
        out[2 * i + 1] = static_cast<u8>(h >> 8);
      }
      return;
    default: break;
  }
  const BlockEncoder enc = block_encoder(t);
  MOE_CHECK(enc != nullptr, "quantize",
            "quantizing to ggml type {} is not supported (supported: "
            "F32, F16, BF16, Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4)",
            info.name);
  for (int64_t b = 0; b < n / info.block; ++b)
    enc(src + b * info.block, out + b * static_cast<int64_t>(info.block_size));
}

}  // namespace moe
