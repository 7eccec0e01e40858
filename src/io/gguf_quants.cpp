// ggml's tensor types: the table of block sizes, and scalar dequantization written from the block
// layouts of ggml's ggml-common.h (block_q4_0, block_q4_K, ...) and the arithmetic of its
// ggml-quants.c (dequantize_row_*), in the same float32 operations in the same order, so that the
// values are bit-identical to ggml's (tests/test_gguf.cpp checks them against llama.cpp's own).
// Blocks are read byte by byte (files give no alignment); integers are little-endian.
//
// This file is compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add in
// `d * q - m` would round once where ggml rounds twice.
#include <cstring>
#include <utility>

#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/weights.h"

namespace moe {

namespace {

constexpr GgmlTypeInfo kTypes[] = {
    {GgmlType::F32, "F32", 1, 4},       {GgmlType::F16, "F16", 1, 2},
    {GgmlType::Q4_0, "Q4_0", 32, 18},   {GgmlType::Q4_1, "Q4_1", 32, 20},
    {GgmlType::Q5_0, "Q5_0", 32, 22},   {GgmlType::Q5_1, "Q5_1", 32, 24},
    {GgmlType::Q8_0, "Q8_0", 32, 34},   {GgmlType::Q2_K, "Q2_K", 256, 84},
    {GgmlType::Q3_K, "Q3_K", 256, 110}, {GgmlType::Q4_K, "Q4_K", 256, 144},
    {GgmlType::Q5_K, "Q5_K", 256, 176}, {GgmlType::Q6_K, "Q6_K", 256, 210},
    {GgmlType::BF16, "BF16", 1, 2},     {GgmlType::MXFP4, "MXFP4", 32, 17},
};

using u8 = uint8_t;

inline uint16_t le16(const u8* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline float half(const u8* p) { return f16_to_f32(le16(p)); }

// Q4_K and Q5_K: the 6-bit scale and min of sub-block j (0..7) packed in 12 bytes: for j < 4 the
// low 6 bits of bytes j and j + 4; for j >= 4 a nibble of byte j + 4 plus the top 2 bits of bytes
// j - 4 (scale) and j (min).
inline void scale_min_k4(int j, const u8* q, u8& sc, u8& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<u8>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<u8>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q8_0: f16 d, 32 int8: d * q.
void deq_q8_0(const u8* b, float* y) {
  const float d = half(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// Q4_0: f16 d, 16 bytes; element j the low nibble of byte j, element j + 16 its high nibble:
// (q - 8) * d.
void deq_q4_0(const u8* b, float* y) {
  const float d = half(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((b[2 + j] & 0xF) - 8) * d;
    y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
  }
}

// Q4_1: f16 d, f16 m, 16 bytes of nibbles as Q4_0: q * d + m.
void deq_q4_1(const u8* b, float* y) {
  const float d = half(b), m = half(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(b[4 + j] & 0xF) * d + m;
    y[j + 16] = static_cast<float>(b[4 + j] >> 4) * d + m;
  }
}

// Q5_0: f16 d, 32 bits of fifth bits (bit j for element j), nibbles as Q4_0: (q - 16) * d.
void deq_q5_0(const u8* b, float* y) {
  const float d = half(b);
  const uint32_t qh = b[2] | (b[3] << 8) | (b[4] << 16) | (static_cast<uint32_t>(b[5]) << 24);
  for (int j = 0; j < 16; ++j) {
    const int h0 = static_cast<int>((qh >> j) & 1u) << 4,
              h1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
    y[j] = static_cast<float>(((b[6 + j] & 0xF) | h0) - 16) * d;
    y[j + 16] = static_cast<float>(((b[6 + j] >> 4) | h1) - 16) * d;
  }
}

// Q5_1: f16 d, f16 m, 32 fifth bits, nibbles: q * d + m.
void deq_q5_1(const u8* b, float* y) {
  const float d = half(b), m = half(b + 2);
  const uint32_t qh = b[4] | (b[5] << 8) | (b[6] << 16) | (static_cast<uint32_t>(b[7]) << 24);
  for (int j = 0; j < 16; ++j) {
    const int h0 = static_cast<int>((qh >> j) & 1u) << 4,
              h1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
    y[j] = static_cast<float>((b[8 + j] & 0xF) | h0) * d + m;
    y[j + 16] = static_cast<float>((b[8 + j] >> 4) | h1) * d + m;
  }
}

// MXFP4: an E8M0 byte e and 16 bytes; element j the low nibble of byte j, element j + 16 the high
// one, an E2M1 code. ggml holds the codes doubled as integers (0, 1, 2, 3, 4, 6, 8, 12, and
// negated) and the scale halved, 2^(e - 128), built from its bits (subnormal for e < 2): the
// product is then exact wherever 2^(e - 127) times the code is a float, and the same float.
constexpr int8_t kMxfp4Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
void deq_mxfp4(const u8* b, float* y) {
  const uint32_t bits = b[0] < 2 ? 0x00200000u << b[0] : static_cast<uint32_t>(b[0] - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(kMxfp4Doubled[b[1 + j] & 0xF]);
    y[j + 16] = d * static_cast<float>(kMxfp4Doubled[b[1 + j] >> 4]);
  }
}

// Q2_K: 16 bytes of scales (low nibble scale, high nibble min, per 16 elements), 64 bytes of 2-bit
// codes, f16 d, f16 dmin. Each 128 elements read 32 bytes four times, shifting by 2 each time;
// elements l and l + 16 of a group of 32 come from bytes l and l + 16: (d*sc) * q - (dmin*m).
void deq_q2_k(const u8* b, float* y) {
  const u8* scales = b;
  const u8* q = b + 16;
  const float d = half(b + 80), dmin = half(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half16 = 0; half16 < 2; ++half16) {
        const u8 sc = scales[is++];
        const float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
        for (int l = 0; l < 16; ++l)
          *y++ = dl * static_cast<float>((q[l + 16 * half16] >> shift) & 3) - ml;
      }
    }
    q += 32;
  }
}

// Q3_K: 32 bytes of high bits (hmask), 64 bytes of 2-bit codes, 12 bytes of 6-bit signed scales
// (bias 32), f16 d. Codes as Q2_K; the high bit of element l (bit m of hmask[l]) clear subtracts 4.
void deq_q3_k(const u8* b, float* y) {
  const u8* hm = b;
  const u8* q = b + 32;
  const u8* s = b + 96;
  const float d_all = half(b + 108);
  int8_t scales[16];  // 16 six-bit scales: low nibbles from s[0..7], top 2 bits from s[8..11]
  for (int j = 0; j < 16; ++j) {
    const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
    const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    scales[j] = static_cast<int8_t>((lo | (hi << 4)) - 32);
  }
  int is = 0;
  u8 m = 1;
  for (int n = 0; n < 256; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half16 = 0; half16 < 2; ++half16) {
        const float dl = d_all * static_cast<float>(scales[is++]);
        for (int l = 16 * half16; l < 16 * half16 + 16; ++l) {
          const int v = ((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4);
          *y++ = dl * static_cast<float>(v);
        }
      }
      m = static_cast<u8>(m << 1);
    }
    q += 32;
  }
}

// Sub-block j's scale and offset in Q4_K and Q5_K: (d * sc_j, dmin * m_j), each one float32
// product as ggml computes it.
std::pair<float, float> k_scale(int j, const u8* sm, float d, float dmin) {
  u8 sc, m;
  scale_min_k4(j, sm, sc, m);
  return {d * static_cast<float>(sc), dmin * static_cast<float>(m)};
}

// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (scale_min_k4), 128 bytes of nibbles.
// Each 64 elements read 32 bytes: low nibbles the first 32 (sub-block 2i), high nibbles the next
// 32 (sub-block 2i + 1): (d*sc) * q - (dmin*m).
void deq_q4_k(const u8* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const u8* sm = b + 4;
  const u8* q = b + 16;
  for (int is = 0; is < 8; is += 2) {
    const auto [d1, m1] = k_scale(is, sm, d, dmin);
    const auto [d2, m2] = k_scale(is + 1, sm, d, dmin);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
  }
}

// Q5_K: as Q4_K with 32 bytes of fifth bits (qh) before the nibbles: element l of sub-block
// 2i takes bit 2i of qh[l], of sub-block 2i + 1 bit 2i + 1.
void deq_q5_k(const u8* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const u8* sm = b + 4;
  const u8* qh = b + 16;
  const u8* ql = b + 48;
  u8 u1 = 1, u2 = 2;
  for (int is = 0; is < 8; is += 2) {
    const auto [d1, m1] = k_scale(is, sm, d, dmin);
    const auto [d2, m2] = k_scale(is + 1, sm, d, dmin);
    for (int l = 0; l < 32; ++l)
      *y++ = d1 * static_cast<float>((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l)
      *y++ = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    ql += 32;
    u1 = static_cast<u8>(u1 << 2);
    u2 = static_cast<u8>(u2 << 2);
  }
}

// Q6_K: 128 bytes of low nibbles (ql), 64 bytes of 2-bit highs (qh), 16 int8 scales (one per 16
// elements), f16 d. Each 128 elements read 64 bytes of ql and 32 of qh: element l + 32k
// (k = 0..3) is nibble k/2 of ql[l + 32 (k % 2)] with bits 2k of qh[l] on top, minus 32:
// (d * sc) * q.
void deq_q6_k(const u8* b, float* y) {
  const u8* ql = b;
  const u8* qh = b + 128;
  const u8* sc = b + 192;
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(static_cast<int8_t>(sc[is])) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(static_cast<int8_t>(sc[is + 2])) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(static_cast<int8_t>(sc[is + 4])) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(static_cast<int8_t>(sc[is + 6])) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t t) {
  for (const GgmlTypeInfo& i : kTypes)
    if (static_cast<uint32_t>(i.type) == t) return &i;
  return nullptr;
}

const GgmlTypeInfo& ggml_type_info(GgmlType t) {
  const GgmlTypeInfo* i = ggml_type_info(static_cast<uint32_t>(t));
  MOE_CHECK(i != nullptr, "gguf", "unknown ggml type {}; known: {}", static_cast<uint32_t>(t),
            ggml_known_types());
  return *i;
}

const char* ggml_type_name(GgmlType t) { return ggml_type_info(t).name; }

const char* ggml_other_type_name(uint32_t t) {
  // ggml's enum ggml_type (ggml.h): the numbers of the types this reader does not handle, and those
  // that GGUF files no longer hold (4, 5, 31 to 33, 36 to 38).
  static const char* const names[] = {
      nullptr, nullptr,      nullptr,      nullptr,     "Q4_2",     "Q4_3",     nullptr,
      nullptr, nullptr,      "Q8_1",       nullptr,     nullptr,    nullptr,    nullptr,
      nullptr, "Q8_K",       "IQ2_XXS",    "IQ2_XS",    "IQ3_XXS",  "IQ1_S",    "IQ4_NL",
      "IQ3_S", "IQ2_S",      "IQ4_XS",     "I8",        "I16",      "I32",      "I64",
      "F64",   "IQ1_M",      nullptr,      "Q4_0_4_4",  "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",
      "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8"};
  return t < sizeof(names) / sizeof(names[0]) ? names[t] : nullptr;
}

std::string ggml_known_types() {
  std::string s;
  for (const GgmlTypeInfo& i : kTypes)
    s += fmt::format("{}{} ({})", s.empty() ? "" : ", ", i.name, static_cast<uint32_t>(i.type));
  return s;
}

size_t ggml_row_bytes(GgmlType t, int64_t n) {
  const GgmlTypeInfo& i = ggml_type_info(t);
  MOE_CHECK(n >= 0 && n % i.block == 0, "gguf",
            "{} elements of {}: not a multiple of its block of {}", n, i.name, i.block);
  return static_cast<size_t>(n / i.block) * i.block_size;
}

bool ggml_can_dequantize(GgmlType t) { return ggml_type_info(static_cast<uint32_t>(t)) != nullptr; }

void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n) {
  const GgmlTypeInfo& info = ggml_type_info(t);
  MOE_CHECK(n >= 0 && n % info.block == 0, "dequantize",
            "{} elements of {}: not a multiple of its block of {}", n, info.name, info.block);
  const auto* b = static_cast<const u8*>(src);
  const int64_t nb = n / info.block;
  const BlockDecoder block_fn = ggml_block_decoder(t);
  switch (t) {
    case GgmlType::F32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = half(b + 2 * i);
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(le16(b + 2 * i));
      return;
    default: break;
  }
  MOE_CHECK(block_fn != nullptr, "dequantize", "cannot dequantize ggml type {}", info.name);
  for (int64_t i = 0; i < nb; ++i)
    block_fn(b + i * static_cast<int64_t>(info.block_size), dst + i * info.block);
}

BlockDecoder ggml_block_decoder(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: return deq_q4_0;
    case GgmlType::Q4_1: return deq_q4_1;
    case GgmlType::Q5_0: return deq_q5_0;
    case GgmlType::Q5_1: return deq_q5_1;
    case GgmlType::Q8_0: return deq_q8_0;
    case GgmlType::Q2_K: return deq_q2_k;
    case GgmlType::Q3_K: return deq_q3_k;
    case GgmlType::Q4_K: return deq_q4_k;
    case GgmlType::Q5_K: return deq_q5_k;
    case GgmlType::Q6_K: return deq_q6_k;
    case GgmlType::MXFP4: return deq_mxfp4;
    default: return nullptr;
  }
}

namespace {
// ggml types and tensor dtypes, one to one.
constexpr std::pair<GgmlType, DType> kDtypes[] = {
    {GgmlType::F32, DType::F32},   {GgmlType::F16, DType::F16},     {GgmlType::BF16, DType::BF16},
    {GgmlType::Q4_0, DType::Q4_0}, {GgmlType::Q4_1, DType::Q4_1},   {GgmlType::Q5_0, DType::Q5_0},
    {GgmlType::Q5_1, DType::Q5_1}, {GgmlType::Q8_0, DType::Q8_0},   {GgmlType::Q2_K, DType::Q2_K},
    {GgmlType::Q3_K, DType::Q3_K}, {GgmlType::Q4_K, DType::Q4_K},   {GgmlType::Q5_K, DType::Q5_K},
    {GgmlType::Q6_K, DType::Q6_K}, {GgmlType::MXFP4, DType::MXFP4},
};
}  // namespace

DType dtype_of_ggml(GgmlType t) {
  for (const auto& [g, d] : kDtypes)
    if (g == t) return d;
  throw_error("gguf", fmt::format("ggml type {} has no tensor dtype", static_cast<uint32_t>(t)));
}

GgmlType ggml_type_of(DType d) {
  for (const auto& [g, dt] : kDtypes)
    if (dt == d) return g;
  throw_error("gguf", fmt::format("dtype {} is not a ggml type", static_cast<int>(d)));
}

void GgufTensor::dequantize_rows(int64_t first, int64_t n, float* out) const {
  MOE_CHECK(first >= 0 && n >= 0 && first <= rows() && n <= rows() - first, "gguf",
            "tensor '{}': rows [{}, {}) outside its {} rows", name, first, first + n, rows());
  const size_t rb = row_bytes();
  for (int64_t r = 0; r < n; ++r)
    dequantize_row(type, data + static_cast<size_t>(first + r) * rb, out + r * ne[0], ne[0]);
}

}  // namespace moe
