// Part of the per-ISA kernels (isa_kernels_impl.h includes it): quantized weights times
// activations quantized to int8 per block, as llama.cpp computes its products. The rows of x come
// rounded (cpu::quantize_activations, weights.cpp: llama.cpp's Q8_K for the K-quants, 256 values
// and one float scale per block with the sums of every 16 codes as int16; blocks of 32 with a
// float scale for Q8_0 and MXFP4), once per product; each weight block's codes multiply them in
// integers, exactly, into eight int32 lanes (lane l: the block's values 4l..4l+3 of each run of
// 32, as AVX2's vpmaddubsw/vpmaddwd pair them), and the lanes are added to eight float lanes
// with one fused multiply-add per block (weight scale times activation scale times the lane),
// summed across lanes once per row (sum8). This is the structure of llama.cpp's AVX2 kernels:
// no horizontal sum per block, the offsets (Q6_K's -32, Q4_K/Q5_K's mins) formed in vectors from
// the sums of x.
//
// The integer sums are exact on every path (the vector instructions where the path has them,
// plain loops elsewhere, lane for lane), and the float lanes use explicit fused multiply-adds
// (the C library's fmaf where the path lacks the instruction) in the same order, so that no
// compiler contraction differs between paths: the result is the same bits on every path and for
// any split of the rows. Its error against float32 activations is the activations' rounding:
// |x - x_q| <= d_x / 2 per element, d_x = max|x| / 127 per block (what llama.cpp's own products
// carry).

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe::cpu::MOE_ISA_NS {
namespace {

// The final sums of the lanes, in one order for every path: eight lanes as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), four as (m0 + m2) + (m1 + m3).
HWY_INLINE float sum8(const float* l) {
  const float s4[4] = {l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]};
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
HWY_INLINE float sum4(const float* m) { return (m[0] + m[2]) + (m[1] + m[3]); }
#if defined(__AVX2__)
HWY_INLINE float sum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
HWY_INLINE float sum4(__m128 v) {
  const __m128 s2 = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
// The int8 products of u (unsigned, at most 128) and s (|s| <= 127) summed in fours into int32
// lanes (lane l: values 4l..4l+3), exactly: vpmaddubsw's pairs (at most 2 * 128 * 127, never
// saturated) summed by vpmaddwd, or VNNI's vpdpbusd.
HWY_INLINE __m256i dot4_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// acc + the int16 pairs of a times b, summed pairwise into int32 lanes (vpmaddwd), fused into
// VNNI's vpdpwssd where the path has it: the same exact sums either way.
HWY_INLINE __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
// acc + sc_lo * (u . s) over the first 16 of 32 codes + sc_hi * (u . s) over the last 16, as
// eight int32 lanes (lane l: values 4l..4l+3), exactly: u unsigned (< 128), s int8.
HWY_INLINE __m256i dot32_scaled(__m256i acc, __m256i u, const int8_t* s, __m256i sc) {
  const __m256i p =
      _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return madd_add(acc, p, sc);
}
// Int16 lane j of `scales` (the same eight in both halves) in every int16 lane: its two bytes
// picked by a shuffle.
HWY_INLINE __m256i scale_of(__m256i scales, int j) {
  return _mm256_shuffle_epi8(scales, _mm256_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * j)));
}
// The byte shuffle that fills a 128-bit half's int16 lanes with its lane 2k (low half) and
// 2k + 1 (high half).
HWY_INLINE __m256i scale_pair(int k) {
  return _mm256_setr_m128i(_mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * (2 * k))),
                           _mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * (2 * k + 1))));
}
#endif

// The lines a K-quant block's row will read next (the first pass over a row, x's first row).
HWY_INLINE void prefetch_ahead(const uint8_t* blk, bool on) {
  if (!on) return;
  __builtin_prefetch(blk + kAheadBytes);
  __builtin_prefetch(blk + kAheadBytes + 64);
}

// Q4_K / Q5_K: the eight 6-bit scales and mins of a block (ggml's get_scale_min_k4, all at once),
// as four words: the scales' bytes in u[0..1], the mins' in u[2..3].
HWY_INLINE void scales_mins_k4(const uint8_t* sm, uint32_t* u) {
  __builtin_memcpy(u, sm, 12);
  constexpr uint32_t k6 = 0x3f3f3f3fu, k4 = 0x0f0f0f0fu, k2 = 0x03030303u;
  u[3] = ((u[2] >> 4) & k4) | (((u[1] >> 6) & k2) << 4);
  const uint32_t mins_lo = u[1] & k6;
  u[1] = (u[2] & k4) | (((u[0] >> 6) & k2) << 4);
  u[2] = mins_lo;
  u[0] &= k6;
}

#if defined(__AVX2__)
// Q4_K / Q5_K: the block's scales as int16 lanes 0..7 and its mins as lanes 8..15. (Built from
// the words in registers: a 16-byte load of the words just stored would wait for the stores, as
// their forwarding fails.)
HWY_INLINE __m256i scales_mins16(const uint8_t* blk) {
  uint32_t u[4];
  scales_mins_k4(blk + 4, u);
  return _mm256_cvtepu8_epi16(_mm_setr_epi32(static_cast<int>(u[0]), static_cast<int>(u[1]),
                                             static_cast<int>(u[2]), static_cast<int>(u[3])));
}

// Q4_K / Q5_K: the codes of sub-blocks 2p (lo) and 2p + 1 (hi) from the block's 32 bytes of
// nibbles q (and, Q5_K, its 32 bytes of fifth bits hbits: bit 2p of qh[l] is lo's element l's,
// 2p + 1 hi's).
template <bool kFive>
HWY_INLINE void qk_codes(const uint8_t* q, __m256i hbits, int p, __m256i& lo, __m256i& hi) {
  const __m256i low = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * p));
  lo = _mm256_and_si256(v, low);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  if constexpr (kFive) {
    const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * p), one);
    const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * p + 1), one);
    lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
    hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
  }
}

// Q6_K: the 6-bit codes of half h of a block, its runs of 32 k = 0..3 (x's elements
// 128h + 32k ..), from the low nibbles ql and the high bit pairs qh.
HWY_INLINE void q6k_codes(const uint8_t* blk, int h, __m256i* q) {
  const __m256i low = _mm256_set1_epi8(0xF), m30 = _mm256_set1_epi8(0x30);
  const uint8_t* ql = blk + 64 * h;
  const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
  const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
  const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
  q[0] =
      _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
  q[1] =
      _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
  q[2] =
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(hb, m30));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                         _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
}
#endif

// A Q4_K / Q5_K row (w = d sc_j q - dmin m_j over 32-element sub-block j) times one row of x as
// quantized (Q8_K: blocks of 256, scale d_x, sums of every 32 codes s), as llama.cpp's AVX2
// kernel forms it. Per block, eight int32 lanes (lane l: sum_j sc_j times the codes 4l..4l+3 of
// each 32 of sub-block j times x) and four (lane k: m_2k s_2k + m_2k+1 s_2k+1, s_j the sum of x
// over sub-block j), all exact; then the float lanes acc += (d_x d) lanes and
// accm -= (d_x dmin) lanes (fused), and at the end sum8(acc) + sum4(accm).
template <bool kFive>
HWY_INLINE float qk_int_row(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd,
                            const int16_t* bsum32, bool prefetch) {
  constexpr int64_t kBytes = kFive ? 176 : 144;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * kBytes;
    prefetch_ahead(blk, prefetch);
    const uint8_t* qh = blk + 16;
    const uint8_t* q = blk + (kFive ? 48 : 16);
    const int8_t* x = xq + 256 * b;
    const __m256i both = scales_mins16(blk);
    const __m256i scales = _mm256_permute2x128_si256(both, both, 0x00);
    // The mins against the sums of x per sub-block.
    const __m128i prod =
        _mm_madd_epi16(_mm256_extracti128_si256(both, 1),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsum32 + 8 * b)));
    accm = _mm_fmadd_ps(_mm_set1_ps(-(xd[b] * half_at(blk + 2))), _mm_cvtepi32_ps(prod), accm);
    // Two chains of integer sums (a fused vpdpwssd waits for the one before it), added at the end.
    __m256i sum_lo = _mm256_setzero_si256(), sum_hi = sum_lo;
    const __m256i hbits = kFive ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)) : sum_lo;
    for (int p = 0; p < 4; ++p) {
      __m256i lo, hi;
      qk_codes<kFive>(q, hbits, p, lo, hi);
      sum_lo = dot32_scaled(sum_lo, lo, x + 64 * p, scale_of(scales, 2 * p));
      sum_hi = dot32_scaled(sum_hi, hi, x + 64 * p + 32, scale_of(scales, 2 * p + 1));
    }
    const __m256i sumi = _mm256_add_epi32(sum_lo, sum_hi);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[b] * half_at(blk)), _mm256_cvtepi32_ps(sumi), acc);
  }
  return sum8(acc) + sum4(accm);
#else
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, accm[4] = {0, 0, 0, 0};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * kBytes;
    prefetch_ahead(blk, prefetch);
    const uint8_t* qh = blk + 16;
    const uint8_t* q = blk + (kFive ? 48 : 16);
    const int8_t* x = xq + 256 * b;
    const int16_t* bs = bsum32 + 8 * b;
    uint32_t u[4];
    scales_mins_k4(blk + 4, u);
    uint8_t sc[8], m[8];
    __builtin_memcpy(sc, u, 8);
    __builtin_memcpy(m, u + 2, 8);
    const float dm = -(xd[b] * half_at(blk + 2));
    for (int k = 0; k < 4; ++k)
      accm[k] = __builtin_fmaf(
          dm, static_cast<float>(m[2 * k] * bs[2 * k] + m[2 * k + 1] * bs[2 * k + 1]), accm[k]);
    int32_t sumi[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int p = 0; p < 4; ++p) {
      for (int e = 0; e < 32; ++e) {
        int lo = q[32 * p + e] & 0xF, hi = q[32 * p + e] >> 4;
        if constexpr (kFive) {
          lo |= ((qh[e] >> (2 * p)) & 1) << 4;
          hi |= ((qh[e] >> (2 * p + 1)) & 1) << 4;
        }
        sumi[e / 4] += sc[2 * p] * lo * x[64 * p + e] + sc[2 * p + 1] * hi * x[64 * p + 32 + e];
      }
    }
    const float d = xd[b] * half_at(blk);
    for (int l = 0; l < 8; ++l) acc[l] = __builtin_fmaf(d, static_cast<float>(sumi[l]), acc[l]);
  }
  return sum8(acc) + sum4(accm);
#endif
}

// A Q6_K row (w = d sc_g (q - 32), q 6 bits, sc_g int8 per 16 elements) times one row of x as
// quantized (Q8_K). Per block, eight int32 lanes: lane l the sum over the eight 32-element runs of
// sc_g q x over their values 4l..4l+3, minus 32 (sc_2l bs_2l + sc_2l+1 bs_2l+1), all exact; then
// acc += (d_x d) lanes (fused), and at the end sum8(acc).
HWY_INLINE float q6k_int_row(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd,
                             const int16_t* bsum, bool prefetch) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  // The shuffles that put int16 lane 2k in the low half's lanes and 2k + 1 in the high half's.
  const __m256i pair[4] = {scale_pair(0), scale_pair(1), scale_pair(2), scale_pair(3)};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 210;
    prefetch_ahead(blk, prefetch);
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const int8_t* x = xq + 256 * b;
    // 32 times the scales against the sums of x per 16.
    const __m256i sc16 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsum + 16 * b));
    __m256i sumi =
        _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
    // Each half block's eight scales (int16) in both 128-bit halves; run k's pair is picked by a
    // shuffle: scale 2k in the low half, 2k + 1 in the high half.
    const __m256i half_sc[2] = {_mm256_permute2x128_si256(sc16, sc16, 0x00),
                                _mm256_permute2x128_si256(sc16, sc16, 0x11)};
    // Two chains of integer sums (a fused vpdpwssd waits for the one before it).
    __m256i other = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      __m256i q[4];
      q6k_codes(blk, h, q);
      for (int k = 0; k < 4; k += 2) {
        sumi = dot32_scaled(sumi, q[k], x + 128 * h + 32 * k,
                            _mm256_shuffle_epi8(half_sc[h], pair[k]));
        other = dot32_scaled(other, q[k + 1], x + 128 * h + 32 * k + 32,
                             _mm256_shuffle_epi8(half_sc[h], pair[k + 1]));
      }
    }
    sumi = _mm256_add_epi32(sumi, other);
    acc =
        _mm256_fmadd_ps(_mm256_set1_ps(xd[b] * half_at(blk + 208)), _mm256_cvtepi32_ps(sumi), acc);
  }
  return sum8(acc);
#else
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 210;
    prefetch_ahead(blk, prefetch);
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const int8_t* x = xq + 256 * b;
    const int16_t* bs = bsum + 16 * b;
    int32_t sumi[8];
    for (int l = 0; l < 8; ++l)
      sumi[l] = -32 * (sc[2 * l] * bs[2 * l] + sc[2 * l + 1] * bs[2 * l + 1]);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk + 64 * h;
      const uint8_t* qh = blk + 128 + 32 * h;
      for (int e = 0; e < 32; ++e) {
        const int q[4] = {
            (ql[e] & 0xF) | ((qh[e] & 3) << 4), (ql[e + 32] & 0xF) | (((qh[e] >> 2) & 3) << 4),
            (ql[e] >> 4) | (((qh[e] >> 4) & 3) << 4), (ql[e + 32] >> 4) | ((qh[e] >> 6) << 4)};
        for (int k = 0; k < 4; ++k)
          sumi[e / 4] += sc[8 * h + 2 * k + e / 16] * q[k] * x[128 * h + 32 * k + e];
      }
    }
    const float d = xd[b] * half_at(blk + 208);
    for (int l = 0; l < 8; ++l) acc[l] = __builtin_fmaf(d, static_cast<float>(sumi[l]), acc[l]);
  }
  return sum8(acc);
#endif
}

// Blocks of 32 weights with one scale, as the int8 codes they multiply x_q with: Q8_0's stored
// codes and f16 scale; MXFP4's E2M1 codes doubled (ggml's kvalues_mxfp4, exact in int8) and its
// E8M0 scale halved, 2^(e - 128) (ggml_e8m0_to_fp32_half, subnormal for e < 2), read from a table
// of the 256 values (kE8m0, quant_dot_impl.h).
struct Q8_0Codes {
  static constexpr int64_t kBytes = 34;
  HWY_INLINE static float scale(const uint8_t* b) { return half_at(b); }
  HWY_INLINE static void codes(const uint8_t* b, int8_t* out) {
    for (int k = 0; k < 32; ++k) out[k] = static_cast<int8_t>(b[2 + k]);
  }
#if defined(__AVX2__)
  HWY_INLINE static __m256i load(const uint8_t* b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  }
#endif
};

struct Mxfp4Codes {
  static constexpr int64_t kBytes = 17;
  HWY_INLINE static float scale(const uint8_t* b) { return kE8m0.half[b[0]]; }
  alignas(32) static constexpr int8_t kValues[32] = {0,  1,  2,  3,  4,   6,  8,  12, 0,  -1, -2,
                                                     -3, -4, -6, -8, -12, 0,  1,  2,  3,  4,  6,
                                                     8,  12, 0,  -1, -2,  -3, -4, -6, -8, -12};
  HWY_INLINE static void codes(const uint8_t* b, int8_t* out) {
    for (int k = 0; k < 16; ++k) {
      out[k] = kValues[b[1 + k] & 0xF];
      out[16 + k] = kValues[b[1 + k] >> 4];
    }
  }
#if defined(__AVX2__)
  // The 16 bytes in both halves, the high half shifted to its high nibbles, looked up at once.
  HWY_INLINE static __m256i load(const uint8_t* b) {
    const __m256i bits =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 1)));
    const __m256i idx = _mm256_and_si256(_mm256_blend_epi32(bits, _mm256_srli_epi16(bits, 4), 0xF0),
                                         _mm256_set1_epi8(0xF));
    return _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(kValues)), idx);
  }
#endif
};

// A row of such blocks times one row of x as quantized (Q8_0's blocks of 32): sixteen float
// lanes, lane l of the even blocks' eight and of the odd blocks' eight accumulating, block by
// block, d_w d_x times the integer sum of the block's values 4l..4l+3 (one fused multiply-add per
// lane and block, as llama.cpp's AVX2 kernels keep their sums in float vectors rather than
// reducing every block; two chains, so that the FMA's latency does not bound the rate), then
// l = even_l + odd_l and the sum ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). The plain
// loops compute the same lanes in the same order.
template <class Codes>
HWY_INLINE float int_row32(const uint8_t* row, int64_t nb, const int8_t* q, const float* xd,
                           bool prefetch) {
#if defined(__AVX2__)
  const auto block = [&](int64_t b, __m256 acc) {
    const uint8_t* blk = row + b * Codes::kBytes;
    const __m256i wv = Codes::load(blk);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * b));
    // |w| (at most 128, unsigned) times x with w's sign.
    return _mm256_fmadd_ps(
        _mm256_set1_ps(xd[b] * Codes::scale(blk)),
        _mm256_cvtepi32_ps(dot4_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))), acc);
  };
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    if (prefetch) __builtin_prefetch(row + b * Codes::kBytes + kAheadBytes);
    even = block(b, even);
    odd = block(b + 1, odd);
  }
  if (b < nb) even = block(b, even);
  return sum8(_mm256_add_ps(even, odd));
#else
  float lane[2][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  int8_t w[32];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * Codes::kBytes;
    if (prefetch && (b & 1) == 0) __builtin_prefetch(blk + kAheadBytes);
    Codes::codes(blk, w);
    const int8_t* x = q + 32 * b;
    const float d = xd[b] * Codes::scale(blk);
    for (int l = 0; l < 8; ++l) {
      int32_t si = 0;
      for (int k = 4 * l; k < 4 * l + 4; ++k) si += w[k] * x[k];
      lane[b & 1][l] = __builtin_fmaf(d, static_cast<float>(si), lane[b & 1][l]);
    }
  }
  float l[8];
  for (int k = 0; k < 8; ++k) l[k] = lane[0][k] + lane[1][k];
  return sum8(l);
#endif
}

template <class Codes>
void int_rows32(const uint8_t* w, int64_t cols, const QuantRows& xq, int64_t n, int64_t r0,
                int64_t r1, float* y, int64_t ldy) {
  const int64_t nb = cols / 32;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < n; ++i)
      y[i * ldy + r] =
          int_row32<Codes>(w + r * nb * Codes::kBytes, nb, xq.q + i * cols, xq.d + i * nb, i == 0);
}

#if defined(__AVX2__)
// The many-row products (a prompt's): each weight block is unpacked once, its codes as the bytes
// vpmaddubsw takes and each run's scales as the int16 lanes vpmaddwd multiplies, then multiplies a
// tile of x's rows, each row with float lanes of its own. The integer sums and the float
// operations are the one-row kernels' above, in the same order: a row of y is the same bits
// whichever kernel computed it and whatever rows it came with. Decoding the block's bits once
// per tile rather than once per row of x is what makes the many-row products faster (the tests
// hold the two kernels to the same bits).

// Lanes 0..g-1 set, for a masked load of g < 8 floats.
HWY_INLINE __m256i tail_mask(int g) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// A K-quant block unpacked: run j multiplies x's elements 32j..32j+31.
struct KBlock {
  __m256i codes[8];  // unsigned (Q4_K < 16, Q5_K < 32, Q6_K < 64)
  __m256i scale[8];  // the scale of the run's first 16 in the low half, of its last 16 in the high
  __m256i sc16;      // Q6_K: the sixteen scales (the -32 against the sums of x per 16)
  __m128i mins;      // Q4_K / Q5_K: the eight mins (int16)
  float d, dmin;
};

template <bool kFive>
HWY_INLINE void unpack_qk(const uint8_t* blk, KBlock& kb) {
  const uint8_t* qh = blk + 16;
  const uint8_t* q = blk + (kFive ? 48 : 16);
  const __m256i both = scales_mins16(blk);
  const __m256i scales = _mm256_permute2x128_si256(both, both, 0x00);
  kb.mins = _mm256_extracti128_si256(both, 1);
  const __m256i hbits =
      kFive ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)) : _mm256_setzero_si256();
  for (int p = 0; p < 4; ++p) {
    qk_codes<kFive>(q, hbits, p, kb.codes[2 * p], kb.codes[2 * p + 1]);
    kb.scale[2 * p] = scale_of(scales, 2 * p);
    kb.scale[2 * p + 1] = scale_of(scales, 2 * p + 1);
  }
  kb.d = half_at(blk);
  kb.dmin = half_at(blk + 2);
}

HWY_INLINE void unpack_q6k(const uint8_t* blk, KBlock& kb) {
  kb.sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
  const __m256i half_sc[2] = {_mm256_permute2x128_si256(kb.sc16, kb.sc16, 0x00),
                              _mm256_permute2x128_si256(kb.sc16, kb.sc16, 0x11)};
  for (int h = 0; h < 2; ++h) {
    q6k_codes(blk, h, kb.codes + 4 * h);
    for (int k = 0; k < 4; ++k)
      kb.scale[4 * h + k] = _mm256_shuffle_epi8(half_sc[h], scale_pair(k));
  }
  kb.d = half_at(blk + 208);
}

// One unpacked block times one row of x's block (codes x, scale xd; bs the sums of 16 for Q6_K,
// of 32 for Q4_K and Q5_K), into that row's lanes: qk_int_row's and q6k_int_row's operations for
// the block.
template <bool kSix>
HWY_INLINE void kblock_row(const KBlock& kb, const int8_t* x, float xd, const int16_t* bs,
                           __m256& acc, __m128& accm) {
  __m256i sumi = _mm256_setzero_si256();
  if constexpr (kSix) {
    const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs));
    sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(_mm256_madd_epi16(kb.sc16, b16), 5));
  } else {
    const __m128i prod =
        _mm_madd_epi16(kb.mins, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bs)));
    accm = _mm_fmadd_ps(_mm_set1_ps(-(xd * kb.dmin)), _mm_cvtepi32_ps(prod), accm);
  }
  __m256i other = _mm256_setzero_si256();  // two chains, as the one-row kernels
  for (int j = 0; j < 8; j += 2) {
    sumi = dot32_scaled(sumi, kb.codes[j], x + 32 * j, kb.scale[j]);
    other = dot32_scaled(other, kb.codes[j + 1], x + 32 * j + 32, kb.scale[j + 1]);
  }
  sumi = _mm256_add_epi32(sumi, other);
  acc = _mm256_fmadd_ps(_mm256_set1_ps(xd * kb.d), _mm256_cvtepi32_ps(sumi), acc);
}

// x's rows per pass over the weight rows: about 24 KB of their codes, so that they stay in the
// core's L1 cache while each weight block, unpacked once per pass, multiplies them (measured on a
// 32 KB L1: 16 KB and 32 KB tiles were 3% slower, 128 KB ones 12%).
constexpr int64_t kMaxTile = 64, kTileBytes = 24576;
HWY_INLINE int64_t tile_rows(int64_t cols) {
  const int64_t t = kTileBytes / cols;
  return t < 4 ? 4 : t > kMaxTile ? kMaxTile : t;
}

// x's rows from which the many-row kernels take over from the one-row ones.
constexpr int64_t kGemmRows = 2;

// Rows [r0, r1) of a Q4_K (kType 4), Q5_K (5) or Q6_K (6) matrix times n rows of x as quantized.
template <int kType>
void qk_int_gemm(const uint8_t* w, int64_t cols, const QuantRows& xq, int64_t n, int64_t r0,
                 int64_t r1, float* y, int64_t ldy) {
  constexpr bool kSix = kType == 6;
  constexpr int64_t kBytes = kType == 4 ? 144 : kType == 5 ? 176 : 210;
  const int64_t nb = cols / 256, tile = tile_rows(cols);
  __m256 acc[kMaxTile];
  __m128 accm[kMaxTile];
  KBlock kb;
  for (int64_t t0 = 0; t0 < n; t0 += tile) {
    const int64_t t1 = t0 + tile < n ? t0 + tile : n;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * nb * kBytes;
      for (int64_t t = t0; t < t1; ++t) {
        acc[t - t0] = _mm256_setzero_ps();
        accm[t - t0] = _mm_setzero_ps();
      }
      for (int64_t b = 0; b < nb; ++b) {
        if constexpr (kType == 4) unpack_qk<false>(row + b * kBytes, kb);
        if constexpr (kType == 5) unpack_qk<true>(row + b * kBytes, kb);
        if constexpr (kSix) unpack_q6k(row + b * kBytes, kb);
        for (int64_t t = t0; t < t1; ++t)
          kblock_row<kSix>(
              kb, xq.q + t * cols + 256 * b, xq.d[t * nb + b],
              kSix ? xq.bsum + t * (cols / 16) + 16 * b : xq.bsum32 + t * (cols / 32) + 8 * b,
              acc[t - t0], accm[t - t0]);
      }
      for (int64_t t = t0; t < t1; ++t)
        y[t * ldy + r] = kSix ? sum8(acc[t - t0]) : sum8(acc[t - t0]) + sum4(accm[t - t0]);
    }
  }
}

// Blocks of 32 (Q8_0, MXFP4) unpacked eight at a time: int_row32's even and odd lanes per row of
// x, a block's parity its index's in the row. kG blocks (all eight, or the row's last few) times
// one row of x: the products d_x d_w formed eight at once (the same float products) and each
// broadcast from memory.
template <int kG>
HWY_INLINE void blocks32_row(const __m256i* wv, const __m256i* aw, __m256 ws, const int8_t* x,
                             const float* xd, int g, __m256& e, __m256& o) {
  alignas(32) float sc[8];
  const __m256 xdv = kG == 8 ? _mm256_loadu_ps(xd) : _mm256_maskload_ps(xd, tail_mask(g));
  _mm256_store_ps(sc, _mm256_mul_ps(xdv, ws));
  const int count = kG == 8 ? 8 : g;
#pragma GCC unroll 8
  for (int k = 0; k < count; ++k) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * k));
    const __m256 v = _mm256_cvtepi32_ps(dot4_u8s8(aw[k], _mm256_sign_epi8(xv, wv[k])));
    if (k % 2 == 0) {
      e = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + k), v, e);
    } else {
      o = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + k), v, o);
    }
  }
}

template <class Codes>
void int_gemm32(const uint8_t* w, int64_t cols, const QuantRows& xq, int64_t n, int64_t r0,
                int64_t r1, float* y, int64_t ldy) {
  const int64_t nb = cols / 32, tile = tile_rows(cols);
  __m256 even[kMaxTile], odd[kMaxTile];
  __m256i wv[8], aw[8];
  alignas(32) float ws[8];
  for (int64_t t0 = 0; t0 < n; t0 += tile) {
    const int64_t t1 = t0 + tile < n ? t0 + tile : n;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * nb * Codes::kBytes;
      for (int64_t t = t0; t < t1; ++t) even[t - t0] = odd[t - t0] = _mm256_setzero_ps();
      for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int g = nb - b0 < 8 ? static_cast<int>(nb - b0) : 8;
        for (int k = 0; k < 8; ++k) {
          const uint8_t* blk = row + (b0 + (k < g ? k : 0)) * Codes::kBytes;
          wv[k] = Codes::load(blk);
          aw[k] = _mm256_sign_epi8(wv[k], wv[k]);
          ws[k] = Codes::scale(blk);
        }
        const __m256 wsv = _mm256_load_ps(ws);
        for (int64_t t = t0; t < t1; ++t) {
          const int8_t* x = xq.q + t * cols + 32 * b0;
          const float* xd = xq.d + t * nb + b0;
          if (g == 8) {
            blocks32_row<8>(wv, aw, wsv, x, xd, 8, even[t - t0], odd[t - t0]);
          } else {
            blocks32_row<0>(wv, aw, wsv, x, xd, g, even[t - t0], odd[t - t0]);
          }
        }
      }
      for (int64_t t = t0; t < t1; ++t)
        y[t * ldy + r] = sum8(_mm256_add_ps(even[t - t0], odd[t - t0]));
    }
  }
}
#endif

// Rows [r0, r1) of a K-quant, Q8_0 or MXFP4 matrix times the n rows of x as quantized (xq).
void dot_q_int(QuantKind kind, int64_t block_bytes, const uint8_t* w, int64_t cols,
               const QuantRows& xq, int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy) {
#if defined(__AVX2__)
  if (n >= kGemmRows) {
    switch (kind) {
      case QuantKind::q4_k: return qk_int_gemm<4>(w, cols, xq, n, r0, r1, y, ldy);
      case QuantKind::q5_k: return qk_int_gemm<5>(w, cols, xq, n, r0, r1, y, ldy);
      case QuantKind::q6_k: return qk_int_gemm<6>(w, cols, xq, n, r0, r1, y, ldy);
      case QuantKind::q8_0: return int_gemm32<Q8_0Codes>(w, cols, xq, n, r0, r1, y, ldy);
      case QuantKind::mxfp4: return int_gemm32<Mxfp4Codes>(w, cols, xq, n, r0, r1, y, ldy);
      default: break;
    }
  }
#endif
  if (kind == QuantKind::q8_0) return int_rows32<Q8_0Codes>(w, cols, xq, n, r0, r1, y, ldy);
  if (kind == QuantKind::mxfp4) return int_rows32<Mxfp4Codes>(w, cols, xq, n, r0, r1, y, ldy);
  const int64_t nb = cols / 256, row_bytes = nb * block_bytes;  // the K-quants
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t i = 0; i < n; ++i) {
      const int8_t* q = xq.q + i * cols;
      const float* xd = xq.d + i * nb;
      const int16_t* bsum = xq.bsum + i * (cols / 16);
      const int16_t* bsum32 = xq.bsum32 + i * (cols / 32);
      y[i * ldy + r] = kind == QuantKind::q4_k   ? qk_int_row<false>(row, nb, q, xd, bsum32, i == 0)
                       : kind == QuantKind::q5_k ? qk_int_row<true>(row, nb, q, xd, bsum32, i == 0)
                                                 : q6k_int_row(row, nb, q, xd, bsum, i == 0);
    }
  }
}

}  // namespace
}  // namespace moe::cpu::MOE_ISA_NS
