// Part of the per-ISA kernels (isa_kernels_impl.h includes it inside its namespace): weights in
// ggml's block-quantized types times float32 activations, for the few rows of x of decoding.
//
// Each weight row is read once, block by block, its codes widened to float32 in registers and
// multiplied with every row of x there (n <= 4). The block layouts are ggml's (ggml-common.h; the
// scalar twins are moe::dequantize_row, gguf_quants.cpp). How each type's sums are formed:
// - Q8_0, Q4_0, Q6_K: each code times its block's (or 16-element group's) scale is the value
//   ggml's dequantization gives, bit for bit (one float32 product, as ggml), then an FMA with x.
// - Q4_K, Q5_K (w = d_j q - m_j per 32-element sub-block j): sum_j d_j (sum_k q_k x_k) -
//   m_j (sum_k x_k), the sums of x per sub-block formed once per call, as llama.cpp splits its
//   integer dot products. The error of this order is within float32's bound of the sum of
//   |d_j q_k x_k| + |m_j x_k|, at most three times the sub-block's largest |w| per element.
// - MXFP4: each doubled E2M1 code times the block's halved E8M0 scale (ggml's value), then FMAs.
// - Other types: the block decoded into a buffer by the scalar twin, then FMAs.
// A row's sum is lane-wise over its blocks in order, then across lanes, then (Q4_K, Q5_K) minus
// the offsets' sum: the same for any split of the rows.

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe::cpu::MOE_ISA_NS {
namespace {

using DI32 = hn::Rebind<int32_t, DF>;
using VI32 = hn::Vec<DI32>;

// L bytes from p, zero-extended (or, I8, sign-extended) to int32 lanes.
HWY_INLINE VI32 load_u8(const uint8_t* p) {
  const hn::Rebind<uint8_t, DF> d8;
  const hn::Rebind<uint32_t, DF> du;
  return hn::BitCast(DI32(), hn::PromoteTo(du, hn::LoadU(d8, p)));
}
HWY_INLINE VI32 load_i8(const uint8_t* p) {
  const hn::Rebind<int8_t, DF> d8;
  return hn::PromoteTo(DI32(), hn::LoadU(d8, reinterpret_cast<const int8_t*>(p)));
}
HWY_INLINE VF to_f(VI32 v) { return hn::ConvertTo(DF(), v); }

HWY_INLINE float half_at(const uint8_t* p) {
  const auto h = static_cast<uint16_t>(p[0] | (p[1] << 8));
#if defined(__F16C__)
  return _cvtsh_ss(h);  // exact, as the scalar conversion
#else
  return scalar::f16_to_f32(h);
#endif
}

// Q4_K / Q5_K: sub-block j's 6-bit scale and min (ggml's get_scale_min_k4).
HWY_INLINE void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

constexpr int64_t kAheadBytes = 768;  // software prefetch distance along a weight row

// The sums of q-widened values times x for one block, as the formats below define them: each
// adds to acc[i] (lanes) and, for the offset formats, to off[i] (a scalar subtracted at the end).
struct Q8_0 {
  static constexpr int64_t kBlock = 32, kBytes = 34;
  static constexpr bool kOffsets = false;
  template <int N>
  HWY_INLINE static void block(const uint8_t* b, const float* x, int64_t ldx, VF* acc, float*,
                               const float*, int64_t) {
    const DF d;
    const int64_t L = static_cast<int64_t>(hn::Lanes(d));
    const VF s = hn::Set(d, half_at(b));
    for (int64_t c = 0; c < 32; c += L) {
      const VF w = hn::Mul(to_f(load_i8(b + 2 + c)), s);
      for (int i = 0; i < N; ++i) acc[i] = hn::MulAdd(w, hn::LoadU(d, x + i * ldx + c), acc[i]);
    }
  }
};

struct Q4_0 {
  static constexpr int64_t kBlock = 32, kBytes = 18;
  static constexpr bool kOffsets = false;
  template <int N>
  HWY_INLINE static void block(const uint8_t* b, const float* x, int64_t ldx, VF* acc, float*,
                               const float*, int64_t) {
    const DF d;
    const int64_t L = static_cast<int64_t>(hn::Lanes(d));
    const VF s = hn::Set(d, half_at(b));
    const VI32 eight = hn::Set(DI32(), 8), low = hn::Set(DI32(), 0xF);
    for (int64_t c = 0; c < 16; c += L) {
      const VI32 v = load_u8(b + 2 + c);
      const VF lo = hn::Mul(to_f(hn::Sub(hn::And(v, low), eight)), s);
      const VF hi = hn::Mul(to_f(hn::Sub(hn::ShiftRight<4>(v), eight)), s);
      for (int i = 0; i < N; ++i) {
        acc[i] = hn::MulAdd(lo, hn::LoadU(d, x + i * ldx + c), acc[i]);
        acc[i] = hn::MulAdd(hi, hn::LoadU(d, x + i * ldx + 16 + c), acc[i]);
      }
    }
  }
};

// Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 elements), d.
struct Q6_K {
  static constexpr int64_t kBlock = 256, kBytes = 210;
  static constexpr bool kOffsets = false;
  template <int N>
  HWY_INLINE static void block(const uint8_t* b, const float* x, int64_t ldx, VF* acc, float*,
                               const float*, int64_t) {
    const DF d;
    const int64_t L = static_cast<int64_t>(hn::Lanes(d));
    // The 16 scales times d, (d * sc) as ggml rounds it, formed a vector at a time.
    HWY_ALIGN float scale[16];
    const VF dd = hn::Set(d, half_at(b + 208));
    for (int64_t c = 0; c < 16; c += L)
      hn::Store(hn::Mul(dd, to_f(load_i8(b + 192 + c))), d, scale + c);
    const VI32 low = hn::Set(DI32(), 0xF), three = hn::Set(DI32(), 3), bias = hn::Set(DI32(), 32);
    for (int64_t h = 0; h < 2; ++h) {  // two halves of 128 elements
      const uint8_t* ql = b + 64 * h;
      const uint8_t* qh = b + 128 + 32 * h;
      const float* s = scale + 8 * h;
      const float* xh = x + 128 * h;
      for (int64_t c = 0; c < 32; c += L) {
        const int64_t is = c / 16;
        const VI32 a = load_u8(ql + c), bq = load_u8(ql + 32 + c), hb = load_u8(qh + c);
        const VI32 q[4] = {
            hn::Sub(hn::Or(hn::And(a, low), hn::ShiftLeft<4>(hn::And(hb, three))), bias),
            hn::Sub(
                hn::Or(hn::And(bq, low), hn::ShiftLeft<4>(hn::And(hn::ShiftRight<2>(hb), three))),
                bias),
            hn::Sub(hn::Or(hn::ShiftRight<4>(a),
                           hn::ShiftLeft<4>(hn::And(hn::ShiftRight<4>(hb), three))),
                    bias),
            hn::Sub(hn::Or(hn::ShiftRight<4>(bq), hn::ShiftLeft<4>(hn::ShiftRight<6>(hb))), bias)};
        for (int k = 0; k < 4; ++k) {
          // (d * sc) * q: ggml's value, one product after the scale's.
          const VF w = hn::Mul(hn::Set(d, s[is + 2 * k]), to_f(q[k]));
          for (int i = 0; i < N; ++i)
            acc[i] = hn::MulAdd(w, hn::LoadU(d, xh + i * ldx + 32 * k + c), acc[i]);
        }
      }
    }
  }
};

// MXFP4's E8M0 scale halved, 2^(e - 128) (ggml_e8m0_to_fp32_half, subnormal for e < 2), for
// each of the 256 bytes.
struct E8m0Table {
  float half[256];
  constexpr E8m0Table() : half() {
    for (int e = 0; e < 256; ++e) {
      // 2^(e - 128), exactly: a power of two built by halving or doubling 1.
      float v = 1.0f;
      for (int k = e; k < 128; ++k) v *= 0.5f;
      for (int k = 128; k < e; ++k) v *= 2.0f;
      half[e] = v;
    }
  }
};
constexpr E8m0Table kE8m0;

// MXFP4: the E8M0 byte, then 16 bytes of E2M1 codes (low nibbles elements 0..15, high 16..31).
// Each value is ggml's, its doubled code (kvalues_mxfp4) times the halved scale, one float32
// product: on AVX2 the codes are looked up as int8 by a byte shuffle and widened (4.9 GB/s of
// weights on one core of an AMD EPYC where a lookup of float32 lanes reached 4.3 and the block
// decoder of the other types about 1), with 16 lanes as float32 lanes, on other widths through a
// table.
struct MXFP4 {
  static constexpr int64_t kBlock = 32, kBytes = 17;
  static constexpr bool kOffsets = false;
  template <int N>
  HWY_INLINE static void block(const uint8_t* b, const float* x, int64_t ldx, VF* acc, float*,
                               const float*, int64_t) {
    const DF d;
    constexpr size_t L = hn::MaxLanes(DF());
    const VF s = hn::Set(d, kE8m0.half[b[0]]);
#if HWY_TARGET == HWY_AVX2
    if constexpr (L == 8) {
      // The doubled values as int8 by one byte shuffle per 16 codes, widened to float32.
      const __m128i tbl = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
      const __m128i m4 = _mm_set1_epi8(0xF);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 1));
      const __m128i v[2] = {_mm_shuffle_epi8(tbl, _mm_and_si128(bytes, m4)),
                            _mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(bytes, 4), m4))};
      VF w[4];  // elements 0.., 8.., 16.., 24..
      for (int k = 0; k < 4; ++k) {
        const __m128i q = k % 2 ? _mm_srli_si128(v[k / 2], 8) : v[k / 2];
        w[k] = hn::Mul(VF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))}, s);
      }
      for (int i = 0; i < N; ++i) {
        const float* xi = x + i * ldx;
        VF t = hn::Mul(w[0], hn::LoadU(d, xi));
        for (int k = 1; k < 4; ++k) t = hn::MulAdd(w[k], hn::LoadU(d, xi + 8 * k), t);
        acc[i] = hn::Add(acc[i], t);
      }
      return;
    }
#endif
    if constexpr (L == 16) {
      // The magnitude by the code's low three bits from a vector of the eight doubled ones, its
      // fourth bit the sign (code 8, ggml's +0, becomes -0, which adds the same to every sum).
      HWY_ALIGN static constexpr float kMag[16] = {0, 1, 2, 3, 4, 6, 8, 12,
                                                   0, 1, 2, 3, 4, 6, 8, 12};
      const VF mag = hn::Load(d, kMag);
      const VI32 v = load_u8(b + 1);
      const VI32 low = hn::Set(DI32(), 0xF), seven = hn::Set(DI32(), 7), eight = hn::Set(DI32(), 8);
      const VI32 code[2] = {hn::And(v, low), hn::ShiftRight<4>(v)};
      for (int h = 0; h < 2; ++h) {
        const VF m = hn::TableLookupLanes(mag, hn::IndicesFromVec(d, hn::And(code[h], seven)));
        const VF sign = hn::BitCast(d, hn::ShiftLeft<28>(hn::And(code[h], eight)));
        const VF w = hn::Mul(hn::Xor(m, sign), s);
        for (int i = 0; i < N; ++i)
          acc[i] = hn::MulAdd(w, hn::LoadU(d, x + i * ldx + 16 * h), acc[i]);
      }
    } else {
      static constexpr float kValues[16] = {0, 1,  2,  3,  4,  6,  8,  12,
                                            0, -1, -2, -3, -4, -6, -8, -12};
      HWY_ALIGN float w[32];
      const float sc = kE8m0.half[b[0]];
      for (int j = 0; j < 16; ++j) {
        w[j] = kValues[b[1 + j] & 0xF] * sc;
        w[16 + j] = kValues[b[1 + j] >> 4] * sc;
      }
      for (size_t c = 0; c < 32; c += L) {
        const VF wv = hn::Load(d, w + c);
        for (int i = 0; i < N; ++i) acc[i] = hn::MulAdd(wv, hn::LoadU(d, x + i * ldx + c), acc[i]);
      }
    }
  }
};

// Q4_K (kFive false) and Q5_K: d, dmin, 12 bytes of scales and mins, (Q5_K: 32 bytes of fifth
// bits,) 128 bytes of nibbles; 64 elements per 32 bytes, low nibbles sub-block 2p, high 2p + 1.
// xs: the sums of x over each 32-element sub-block of this block, for each x row (stride xs_ld).
template <bool kFive>
struct QK {
  static constexpr int64_t kBlock = 256, kBytes = kFive ? 176 : 144;
  static constexpr bool kOffsets = true;
  template <int N>
  HWY_INLINE static void block(const uint8_t* b, const float* x, int64_t ldx, VF* acc, float* off,
                               const float* xs, int64_t xs_ld) {
    const DF d;
    const int64_t L = static_cast<int64_t>(hn::Lanes(d));
    const float dd = half_at(b), dmin = half_at(b + 2);
    const uint8_t* sm = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + (kFive ? 48 : 16);
    const VI32 low = hn::Set(DI32(), 0xF), one = hn::Set(DI32(), 1);
    for (int p = 0; p < 4; ++p) {
      int sc0, m0, sc1, m1;
      scale_min_k4(2 * p, sm, sc0, m0);
      scale_min_k4(2 * p + 1, sm, sc1, m1);
      VF t0[N], t1[N];
      for (int i = 0; i < N; ++i) t0[i] = t1[i] = hn::Zero(d);
      const float* xp = x + 64 * p;
      for (int64_t c = 0; c < 32; c += L) {
        VI32 lo = hn::And(load_u8(q + 32 * p + c), low);
        VI32 hi = hn::ShiftRight<4>(load_u8(q + 32 * p + c));
        if constexpr (kFive) {
          const VI32 h = load_u8(qh + c);
          lo = hn::Or(lo, hn::ShiftLeft<4>(hn::And(hn::ShiftRightSame(h, 2 * p), one)));
          hi = hn::Or(hi, hn::ShiftLeft<4>(hn::And(hn::ShiftRightSame(h, 2 * p + 1), one)));
        }
        const VF fl = to_f(lo), fh = to_f(hi);
        for (int i = 0; i < N; ++i) {
          t0[i] = hn::MulAdd(fl, hn::LoadU(d, xp + i * ldx + c), t0[i]);
          t1[i] = hn::MulAdd(fh, hn::LoadU(d, xp + i * ldx + 32 + c), t1[i]);
        }
      }
      const VF d0 = hn::Set(d, dd * static_cast<float>(sc0)),
               d1 = hn::Set(d, dd * static_cast<float>(sc1));
      const float mm0 = dmin * static_cast<float>(m0), mm1 = dmin * static_cast<float>(m1);
      for (int i = 0; i < N; ++i) {
        acc[i] = hn::MulAdd(d0, t0[i], acc[i]);
        acc[i] = hn::MulAdd(d1, t1[i], acc[i]);
        off[i] += mm0 * xs[i * xs_ld + 2 * p] + mm1 * xs[i * xs_ld + 2 * p + 1];
      }
    }
  }
};
// The most 32-element sub-blocks a row may have for the offset formats (the sums of x live on the
// stack); longer rows take the generic path.
constexpr int64_t kMaxSubBlocks = 2048;

// Rows [r0, r1) for N rows of x (a constant, so that the accumulators live in registers). Blocks
// alternate between two sets of accumulators, so that consecutive blocks' FMA chains overlap.
template <class Fmt, int N>
void dot_rows_n(const uint8_t* w, int64_t cols, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                float* y, int64_t ldy) {
  const DF d;
  const int64_t nb = cols / Fmt::kBlock, row_bytes = nb * Fmt::kBytes;
  const int64_t nsb = cols / 32, sbs = Fmt::kBlock / 32;
  HWY_ALIGN float xs[Fmt::kOffsets ? 4 * kMaxSubBlocks : 1];
  if constexpr (Fmt::kOffsets) {
    for (int i = 0; i < N; ++i)
      for (int64_t s = 0; s < nsb; ++s) {
        float t = 0;
        for (int64_t k = 0; k < 32; ++k) t += x[i * ldx + 32 * s + k];
        xs[i * nsb + s] = t;
      }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    VF a0[N], a1[N];
    float off[N];
    for (int i = 0; i < N; ++i) {
      a0[i] = a1[i] = hn::Zero(d);
      off[i] = 0;
    }
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      const uint8_t* blk = row + b * Fmt::kBytes;
      __builtin_prefetch(blk + kAheadBytes);
      __builtin_prefetch(blk + kAheadBytes + 64);
      Fmt::template block<N>(blk, x + b * Fmt::kBlock, ldx, a0, off, xs + b * sbs, nsb);
      Fmt::template block<N>(blk + Fmt::kBytes, x + (b + 1) * Fmt::kBlock, ldx, a1, off,
                             xs + (b + 1) * sbs, nsb);
    }
    if (b < nb)
      Fmt::template block<N>(row + b * Fmt::kBytes, x + b * Fmt::kBlock, ldx, a0, off, xs + b * sbs,
                             nsb);
    for (int i = 0; i < N; ++i)
      y[i * ldy + r] = hn::GetLane(hn::SumOfLanes(d, hn::Add(a0[i], a1[i]))) - off[i];
  }
}

template <class Fmt>
void dot_rows(const uint8_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  switch (n) {
    case 1: return dot_rows_n<Fmt, 1>(w, cols, x, ldx, r0, r1, y, ldy);
    case 2: return dot_rows_n<Fmt, 2>(w, cols, x, ldx, r0, r1, y, ldy);
    case 3: return dot_rows_n<Fmt, 3>(w, cols, x, ldx, r0, r1, y, ldy);
    default: return dot_rows_n<Fmt, 4>(w, cols, x, ldx, r0, r1, y, ldy);
  }
}

// Other types: each block decoded by the scalar twin into a buffer, four rows at a time, then
// multiplied in registers.
void dot_decoded(QuantFormat q, const uint8_t* w, int64_t cols, const float* x, int64_t ldx,
                 int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const DF d;
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  const int64_t nb = cols / q.block, row_bytes = nb * q.block_bytes;
  HWY_ALIGN float buf[4][256];
  for (int64_t r = r0; r < r1; r += 4) {
    const int64_t m = r1 - r < 4 ? r1 - r : 4;
    VF acc[4][4];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) acc[i][j] = hn::Zero(d);
    const uint8_t* row = w + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t j = 0; j < m; ++j) {
        const uint8_t* blk = row + j * row_bytes + b * q.block_bytes;
        __builtin_prefetch(blk + 8 * q.block_bytes);
        q.decode(blk, buf[j]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * ldx + b * q.block;
        for (int64_t k = 0; k < q.block; k += L) {
          const VF xv = hn::LoadU(d, xi + k);
          for (int64_t j = 0; j < m; ++j)
            acc[i][j] = hn::MulAdd(hn::Load(d, buf[j] + k), xv, acc[i][j]);
        }
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j)
        y[i * ldy + r + j] = hn::GetLane(hn::SumOfLanes(d, acc[i][j]));
  }
}

}  // namespace
}  // namespace moe::cpu::MOE_ISA_NS
