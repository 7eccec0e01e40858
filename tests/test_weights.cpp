// Weights in their stored format (moe/weights.h): the conversions against independent oracles,
// and matmul_wt on every kernel path this machine has against a float64 reference, within the
// error bound of float32 accumulation, with the same bits on any thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "moe/cpu.h"
#include "moe/error.h"
#include "moe/rng.h"
#include "moe/tensor.h"
#include "moe/weights.h"

namespace moe {
namespace {

struct Stored {
  WType type;
  std::vector<float> f32;
  std::vector<uint16_t> h;
  std::vector<int8_t> q;
  std::vector<float> scale;
  WeightMatrix view(int64_t rows, int64_t cols) const {
    const void* d = type == WType::f32  ? static_cast<const void*>(f32.data())
                    : type == WType::i8 ? static_cast<const void*>(q.data())
                                        : static_cast<const void*>(h.data());
    return {type, d, rows, cols, type == WType::i8 ? scale.data() : nullptr};
  }
};

// A random weight [rows, cols] stored as `type`, with values of every magnitude the format
// holds well (and some zeros).
Stored make_weight(WType type, int64_t rows, int64_t cols, Rng& rng) {
  Stored s{type, {}, {}, {}, {}};
  const size_t n = static_cast<size_t>(rows * cols);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng.normal()) * (rng.uniform() < 0.1 ? 0.0f : 1.0f);
  switch (type) {
    case WType::f32: s.f32 = v; break;
    case WType::bf16:
      for (float x : v) s.h.push_back(f32_to_bf16(x));
      break;
    case WType::f16:
      for (float x : v)
        s.h.push_back(static_cast<uint16_t>([&] {
          const _Float16 f = static_cast<_Float16>(x);
          uint16_t b;
          std::memcpy(&b, &f, 2);
          return b;
        }()));
      break;
    case WType::i8:
      for (int64_t r = 0; r < rows; ++r)
        s.scale.push_back(0.01f + static_cast<float>(r % 7) * 0.003f);
      for (float x : v)
        s.q.push_back(static_cast<int8_t>(std::lround(std::fmax(-127, std::fmin(127, x * 40)))));
      break;
    default: break;  // quantized: make_quantized
  }
  return s;
}

// Where a quantized type's blocks keep their float16 scales (byte offsets in the block), or for
// MXFP4 its E8M0 exponent byte: random bytes everywhere else are valid codes.
std::vector<int> scale_offsets(WType t) {
  switch (t) {
    case WType::q4_0:
    case WType::q5_0:
    case WType::q8_0: return {0};
    case WType::q4_1:
    case WType::q5_1:
    case WType::q4_k:
    case WType::q5_k: return {0, 2};
    case WType::q2_k: return {80, 82};
    case WType::q3_k: return {108};
    case WType::q6_k: return {208};
    default: return {};
  }
}

// Random blocks of a quantized type [rows, cols], their scales set to moderate values.
struct Quantized {
  WType type;
  std::vector<uint8_t> bytes;
  WeightMatrix view(int64_t rows, int64_t cols) const { return {type, bytes.data(), rows, cols}; }
};
Quantized make_quantized(WType type, int64_t rows, int64_t cols, Rng& rng) {
  const DType dt = wtype_dtype(type);
  Quantized q{type, std::vector<uint8_t>(static_cast<size_t>(rows) * dtype_bytes(dt, cols))};
  for (uint8_t& b : q.bytes) b = static_cast<uint8_t>(rng.uniform() * 256);
  const size_t bb = dtype_block_bytes(dt);
  for (size_t at = 0; at < q.bytes.size(); at += bb) {
    if (type == WType::mxfp4) {
      q.bytes[at] = static_cast<uint8_t>(120 + rng.uniform() * 8);  // 2^-7 .. 2^0
      continue;
    }
    for (int off : scale_offsets(type)) {
      const uint16_t h = f32_to_f16(static_cast<float>((0.5 + rng.uniform()) * 0.01));
      std::memcpy(&q.bytes[at + static_cast<size_t>(off)], &h, 2);
    }
  }
  return q;
}

// Q4_K and Q5_K (w = d_j q - m_j) are summed as d_j sum(q x) - m_j sum(x): their float32 bound
// is on |d_j q x| + |m_j x| rather than |w x|. Per element, d_j q <= 31 * 63 d and m_j <= 63 dmin
// (6-bit scales and mins, 5-bit codes), from the block's d and dmin.
double offset_bound(const Quantized& s, const WeightMatrix& w, int64_t r, int64_t k) {
  if (s.type != WType::q4_k && s.type != WType::q5_k) return 0;
  const size_t bb = dtype_block_bytes(wtype_dtype(s.type));
  const uint8_t* b = s.bytes.data() + static_cast<size_t>(r) * w.row_bytes() + (k / 256) * bb;
  uint16_t d, dmin;
  std::memcpy(&d, b, 2);
  std::memcpy(&dmin, b + 2, 2);
  return 31.0 * 63 * std::fabs(f16_to_f32(d)) + 63.0 * std::fabs(f16_to_f32(dmin));
}

constexpr WType kQuantTypes[] = {WType::q4_0, WType::q4_1, WType::q5_0, WType::q5_1,
                                 WType::q8_0, WType::q2_k, WType::q3_k, WType::q4_k,
                                 WType::q5_k, WType::q6_k, WType::mxfp4};

// The exact value of element (r, k), in double (int8: q times its scale, unrounded).
double exact(const Stored& s, const WeightMatrix& w, int64_t r, int64_t k) {
  if (s.type == WType::i8)
    return static_cast<double>(s.q[static_cast<size_t>(r * w.cols + k)]) *
           s.scale[static_cast<size_t>(r)];
  return w.at(r, k);
}

constexpr double kU = 1.0 / (1 << 24);  // float32's unit roundoff

}  // namespace

TEST(WeightFormats, F16ToF32MatchesTheCompilersConversionForAllValues) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<uint16_t>(b);
    _Float16 f;
    std::memcpy(&f, &h, 2);
    const float want = static_cast<float>(f), got = f16_to_f32(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << b;
    } else {
      EXPECT_EQ(std::memcmp(&want, &got, 4), 0) << b << " " << want << " " << got;
    }
  }
}

TEST(WeightFormats, F32ToF16MatchesTheCompilersConversion) {
  Rng rng(5);
  std::vector<float> xs = {0.0f,          -0.0f,        65504.0f,      65519.99f,
                           65520.0f,      1e-8f,        2.9802322e-8f, 5.9604645e-8f,
                           6.1035156e-5f, 6.097555e-5f, INFINITY,      -INFINITY};
  for (int i = 0; i < 200000; ++i)
    xs.push_back(static_cast<float>(rng.normal() * std::exp(rng.normal() * 6)));
  for (float x : xs) {
    const _Float16 f = static_cast<_Float16>(x);
    uint16_t want;
    std::memcpy(&want, &f, 2);
    ASSERT_EQ(f32_to_f16(x), want) << x;
  }
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
  // Tensor::to(F16) rounds each element the same way.
  Tensor t = Tensor::empty({static_cast<int64_t>(xs.size())}, DType::F32);
  std::copy(xs.begin(), xs.end(), t.data<float>());
  const Tensor h = t.to(DType::F16);
  for (size_t i = 0; i < xs.size(); ++i)
    ASSERT_EQ(static_cast<const uint16_t*>(h.raw())[i], f32_to_f16(xs[i])) << xs[i];
}

TEST(WeightFormats, Bf16RoundsToNearestEven) {
  Rng rng(3);
  for (int i = 0; i < 100000; ++i) {
    const float x = static_cast<float>(rng.normal() * std::exp(rng.normal() * 10));
    const uint16_t h = f32_to_bf16(x);
    // The two bf16 values around x: its truncation and the next one away from zero.
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const uint16_t lo = static_cast<uint16_t>(bits >> 16), hi = static_cast<uint16_t>(lo + 1);
    const double dlo = std::fabs(static_cast<double>(bf16_to_f32(lo)) - x);
    const double dhi = std::fabs(static_cast<double>(bf16_to_f32(hi)) - x);
    const uint16_t want = dlo < dhi ? lo : dhi < dlo ? hi : ((lo & 1) == 0 ? lo : hi);
    ASSERT_EQ(h, want) << x;
  }
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(INFINITY)), INFINITY);
}

// Every format and path against float64, on shapes that leave tails at every vector width, for
// the one-pass rows (n <= 4) and the panels (n > 4). Bound: a float32 sum of `cols` products
// (each widened exactly or, for int8 panels, rounded once) is within (cols + 2) u sum |w x|.
TEST(WeightFormats, MatmulOnEveryPathWithinTheFloat32Bound) {
  for (CpuPath p : cpu_paths_here()) {  // each path runs its own code
    set_cpu_path_cap(p);
    const std::string target = cpu::weight_kernel_target();
    const char* want = p >= CpuPath::avx512 ? "AVX3" : p == CpuPath::avx2 ? "AVX2" : "SCALAR";
    EXPECT_EQ(target, want) << cpu_path_name(p);
  }
  Rng rng(7);
  for (WType type : {WType::f32, WType::bf16, WType::f16, WType::i8}) {
    for (int64_t rows : {1, 3, 5, 67, 130}) {
      for (int64_t cols : {1, 7, 16, 33, 130}) {
        const Stored s = make_weight(type, rows, cols, rng);
        const WeightMatrix w = s.view(rows, cols);
        for (int64_t n : {1, 2, 4, 5, 13}) {
          const int64_t ldx = cols + 3, ldy = rows + 2;
          std::vector<float> x(static_cast<size_t>(n * ldx));
          for (float& v : x) v = static_cast<float>(rng.normal());
          for (CpuPath p : cpu_paths_here()) {
            set_cpu_path_cap(p);
            std::vector<float> y(static_cast<size_t>(n * ldy), -7.0f);
            cpu::matmul_wt(w, x.data(), ldx, n, y.data(), ldy);
            for (int64_t i = 0; i < n; ++i)
              for (int64_t r = 0; r < rows; ++r) {
                // bf16 and int8 weights for many rows multiply x rounded to bf16 (the exact
                // twin; int8: one more rounding, the row scale applied to the sum).
                const bool rounded =
                    (type == WType::bf16 || type == WType::i8) && n > cpu::kMatvecMaxRows;
                double ref = 0, mag = 0;
                for (int64_t k = 0; k < cols; ++k) {
                  const float xv = x[static_cast<size_t>(i * ldx + k)];
                  const double t =
                      exact(s, w, r, k) * (rounded ? bf16_to_f32(f32_to_bf16(xv)) : xv);
                  ref += t;
                  mag += std::fabs(t);
                }
                const double got = y[static_cast<size_t>(i * ldy + r)];
                ASSERT_LE(std::fabs(got - ref), (static_cast<double>(cols) + 3) * kU * mag + 1e-30)
                    << wtype_name(type) << " " << cpu_path_name(p) << " rows " << rows << " cols "
                    << cols << " n " << n << " at " << i << "," << r;
              }
            for (int64_t i = 0; i < n; ++i)  // the padding of y is untouched
              for (int64_t r = rows; r < ldy; ++r)
                ASSERT_EQ(y[static_cast<size_t>(i * ldy + r)], -7.0f);
          }
        }
      }
    }
  }
  reset_cpu_path_cap();
}

// The same bits for 1 and 2 threads, and for any split of the rows (a block of rows computed on
// its own gives the bits of the whole).
TEST(WeightFormats, SameBitsWhateverTheThreadsOrTheSplit) {
  Rng rng(9);
  const int64_t rows = 301, cols = 515;
  const int saved = omp_get_max_threads();
  for (WType type : {WType::f32, WType::bf16, WType::f16, WType::i8}) {
    const Stored s = make_weight(type, rows, cols, rng);
    const WeightMatrix w = s.view(rows, cols);
    for (int64_t n : {1, 3, 9}) {
      std::vector<float> x(static_cast<size_t>(n * cols));
      for (float& v : x) v = static_cast<float>(rng.normal());
      std::vector<float> y1(static_cast<size_t>(n * rows)), y2(y1.size()), part(y1.size());
      omp_set_num_threads(1);
      cpu::matmul_wt(w, x.data(), cols, n, y1.data(), rows);
      omp_set_num_threads(2);
      cpu::matmul_wt(w, x.data(), cols, n, y2.data(), rows);
      EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * 4), 0) << wtype_name(type) << n;
      if (n > cpu::kMatvecMaxRows) continue;  // panels are fixed by the shape, not any split
      // Rows [37, 301) as their own matrix.
      const int64_t r0 = 37;
      const size_t esz = wtype_size(type);
      const WeightMatrix tail{
          type, static_cast<const char*>(w.data) + static_cast<size_t>(r0 * cols) * esz, rows - r0,
          cols, w.scale ? w.scale + r0 : nullptr};
      cpu::matmul_wt(tail, x.data(), cols, n, part.data(), rows - r0);
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(std::memcmp(part.data() + i * (rows - r0), y1.data() + i * rows + r0,
                              static_cast<size_t>(rows - r0) * 4),
                  0)
            << wtype_name(type) << n;
    }
  }
  omp_set_num_threads(saved);
}

// y = x W for a weight stored [in, out] (DBRX's w2): within the float32 bound of the exact sum,
// across the panels of W's rows, on every path; the same bits on 1 and 2 threads.
TEST(WeightFormats, InputRowsProductWithinTheFloat32Bound) {
  Rng rng(11);
  const int saved = omp_get_max_threads();
  for (WType type : {WType::f32, WType::bf16, WType::f16, WType::i8}) {
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1, 7}, {67, 1}, {700, 130}}) {
      const Stored s = make_weight(type, rows, cols, rng);
      const WeightMatrix w = s.view(rows, cols);
      for (int64_t n : {1, 3, 9}) {
        const int64_t ldx = rows + 3, ldy = cols + 2;
        std::vector<float> x(static_cast<size_t>(n * ldx));
        for (float& v : x) v = static_cast<float>(rng.normal());
        std::vector<float> first;
        for (CpuPath p : cpu_paths_here()) {
          set_cpu_path_cap(p);
          for (int threads : {1, 2}) {
            omp_set_num_threads(threads);
            std::vector<float> y(static_cast<size_t>(n * ldy), -7.0f);
            cpu::matmul_w(w, x.data(), ldx, n, y.data(), ldy);
            for (int64_t i = 0; i < n; ++i)
              for (int64_t c = 0; c < cols; ++c) {
                double ref = 0, mag = 0;
                for (int64_t r = 0; r < rows; ++r) {
                  const double t = exact(s, w, r, c) * x[static_cast<size_t>(i * ldx + r)];
                  ref += t;
                  mag += std::fabs(t);
                }
                ASSERT_LE(std::fabs(y[static_cast<size_t>(i * ldy + c)] - ref),
                          (static_cast<double>(rows) + 2) * kU * mag + 1e-30)
                    << wtype_name(type) << " " << cpu_path_name(p) << " [" << rows << ", " << cols
                    << "] n " << n;
              }
            for (int64_t i = 0; i < n; ++i)  // the padding of y is untouched
              for (int64_t c = cols; c < ldy; ++c)
                ASSERT_EQ(y[static_cast<size_t>(i * ldy + c)], -7.0f);
            if (threads == 1) {
              first = y;
            } else {
              EXPECT_EQ(std::memcmp(first.data(), y.data(), y.size() * 4), 0)
                  << wtype_name(type) << " " << cpu_path_name(p) << " n " << n;
            }
          }
        }
      }
    }
  }
  omp_set_num_threads(saved);
  reset_cpu_path_cap();
}

// Quantized weights (ggml's block types): the fused decode-and-dot against float64 sums of the
// values ggml's dequantization gives (WeightMatrix::at, the scalar twin), within the float32
// bound (Q4_K, Q5_K: offset_bound), on every path, for few rows of x (the decode kernel) and many
// (panels decoded to float32 for the GEMM); the rows' values as dequantize_row gives them; the same
// bits on 1 and 2 threads and for any split of the rows.
TEST(WeightFormats, QuantizedMatmulOnEveryPathWithinTheFloat32Bound) {
  Rng rng(13);
  const int saved = omp_get_max_threads();
  for (cpu::QuantActivations acts : {cpu::QuantActivations::f32, cpu::QuantActivations::int8}) {
    cpu::set_quant_activations(acts);
    for (WType type : kQuantTypes) {
      const int64_t block = dtype_block(wtype_dtype(type));
      // The integer products round x per block (quantize_activations): x_q is what they multiply.

      for (int64_t rows : {1, 6, 37}) {
        for (int64_t cols : {block, 3 * block, int64_t{512}}) {
          if (cols % block) continue;
          const Quantized s = make_quantized(type, rows, cols, rng);
          const WeightMatrix w = s.view(rows, cols);
          // The rows as float32 are dequantize_row's, bit for bit.
          std::vector<float> all(static_cast<size_t>(rows * cols));
          cpu::weight_rows_f32(w, 0, rows, all.data());
          for (int64_t r = 0; r < rows; r += 5)
            for (int64_t k = 0; k < cols; k += 7)
              ASSERT_EQ(all[static_cast<size_t>(r * cols + k)], w.at(r, k)) << wtype_name(type);
          for (int64_t n : {1, 4, 9, 70}) {
            const int64_t ldx = cols + 5, ldy = rows + 1;
            std::vector<float> x(static_cast<size_t>(n * ldx));
            for (float& v : x) v = static_cast<float>(rng.normal());
            // What the product multiplies: x, or x as the integer products round it.
            std::vector<float> xm = x;
            const bool int8 = cpu::integer_products(type, n);
            ASSERT_EQ(int8, acts == cpu::QuantActivations::int8 &&
                                cpu::activation_block(type) != 0 &&
                                (type != WType::q8_0 || n <= cpu::kMatvecMaxRows));
            if (int8) {
              const int64_t xb = cpu::activation_block(type);
              std::vector<int8_t> q(static_cast<size_t>(cols));
              std::vector<float> d(static_cast<size_t>(cols / xb));
              std::vector<int16_t> bsum(static_cast<size_t>(cols / 16));
              for (int64_t i = 0; i < n; ++i) {
                cpu::quantize_activations(type, x.data() + i * ldx, cols, q.data(), d.data(),
                                          bsum.data());
                for (int64_t k = 0; k < cols; ++k) {
                  xm[static_cast<size_t>(i * ldx + k)] =
                      d[static_cast<size_t>(k / xb)] * q[static_cast<size_t>(k)];
                  // x_q is within half a step of x
                  ASSERT_LE(std::fabs(xm[static_cast<size_t>(i * ldx + k)] -
                                      x[static_cast<size_t>(i * ldx + k)]),
                            0.5001 * std::fabs(d[static_cast<size_t>(k / xb)]));
                }
                if (xb == 256)
                  for (int64_t g = 0; g < cols / 16; ++g) {
                    int32_t t = 0;
                    for (int64_t k = 0; k < 16; ++k) t += q[static_cast<size_t>(16 * g + k)];
                    ASSERT_EQ(bsum[static_cast<size_t>(g)], t);
                  }
              }
            }
            std::vector<float> first;
            for (CpuPath p : cpu_paths_here()) {
              set_cpu_path_cap(p);
              for (int threads : {1, 2}) {
                omp_set_num_threads(threads);
                std::vector<float> y(static_cast<size_t>(n * ldy), -7.0f);
                cpu::matmul_wt(w, x.data(), ldx, n, y.data(), ldy);
                for (int64_t i = 0; i < n; ++i) {
                  for (int64_t r = 0; r < rows; ++r) {
                    double ref = 0, mag = 0;
                    for (int64_t k = 0; k < cols; ++k) {
                      const double xv = xm[static_cast<size_t>(i * ldx + k)];
                      const double t =
                          static_cast<double>(all[static_cast<size_t>(r * cols + k)]) * xv;
                      ref += t;
                      mag += std::fabs(t) + offset_bound(s, w, r, k) * std::fabs(xv);
                    }
                    ASSERT_LE(std::fabs(y[static_cast<size_t>(i * ldy + r)] - ref),
                              (static_cast<double>(cols) + 3) * kU * mag + 1e-30)
                        << wtype_name(type) << " " << cpu_path_name(p) << " rows " << rows
                        << " cols " << cols << " n " << n << " "
                        << cpu::quant_activations_name(acts);
                  }
                  ASSERT_EQ(y[static_cast<size_t>(i * ldy + rows)], -7.0f);  // padding untouched
                }
                if (threads == 1) {
                  first = y;
                } else {
                  ASSERT_EQ(std::memcmp(first.data(), y.data(), y.size() * 4), 0)
                      << wtype_name(type) << " " << cpu_path_name(p) << " n " << n;
                }
              }
              if ((n > cpu::kMatvecMaxRows && !int8) || rows < 6) continue;
              // Rows [5, rows) on their own give the same bits as within the whole.
              const WeightMatrix tail{type, s.bytes.data() + 5 * w.row_bytes(), rows - 5, cols};
              std::vector<float> part(static_cast<size_t>(n * (rows - 5)));
              cpu::matmul_wt(tail, x.data(), ldx, n, part.data(), rows - 5);
              for (int64_t i = 0; i < n; ++i)
                ASSERT_EQ(std::memcmp(part.data() + i * (rows - 5), first.data() + i * ldy + 5,
                                      static_cast<size_t>(rows - 5) * 4),
                          0)
                    << wtype_name(type) << " " << cpu_path_name(p);
            }
          }
        }
      }
    }
  }
  cpu::set_quant_activations(cpu::QuantActivations::int8);
  omp_set_num_threads(saved);
  reset_cpu_path_cap();
}

// A row of x multiplied alone (the one-row kernels) and among many (the kernels that unpack each
// weight block once for a tile of rows) gives the same bits, on every path, for tiles of every
// length and a last tile cut short (Q8_0 up to kMatvecMaxRows rows: more take its float32 panels).
TEST(WeightFormats, IntegerProductsOfARowAreTheSameAloneOrAmongMany) {
  Rng rng(19);
  for (WType type : {WType::q4_k, WType::q5_k, WType::q6_k, WType::q8_0, WType::mxfp4}) {
    for (int64_t cols : {int64_t{256}, int64_t{768}, int64_t{4864}}) {
      const int64_t rows = 13, n = type == WType::q8_0 ? cpu::kMatvecMaxRows : 75;
      const int64_t ldx = cols + 3, ldy = rows + 2;
      ASSERT_TRUE(cpu::integer_products(type, n));
      const Quantized s = make_quantized(type, rows, cols, rng);
      std::vector<float> x(static_cast<size_t>(n * ldx));
      for (float& v : x) v = static_cast<float>(rng.normal());
      for (CpuPath p : cpu_paths_here()) {
        set_cpu_path_cap(p);
        std::vector<float> many(static_cast<size_t>(n * ldy), -7.0f),
            one(static_cast<size_t>(rows));
        cpu::matmul_wt(s.view(rows, cols), x.data(), ldx, n, many.data(), ldy);
        for (int64_t i = 0; i < n; ++i) {
          cpu::matmul_wt(s.view(rows, cols), x.data() + i * ldx, ldx, 1, one.data(), rows);
          ASSERT_EQ(std::memcmp(one.data(), many.data() + i * ldy, one.size() * 4), 0)
              << wtype_name(type) << " " << cpu_path_name(p) << " cols " << cols << " row " << i;
          ASSERT_EQ(many[static_cast<size_t>(i * ldy + rows)], -7.0f);
        }
      }
    }
  }
  reset_cpu_path_cap();
}

// The integer products give the same bits on every path (their sums are exact integers), for
// even and odd counts of blocks (the wide paths take two blocks of 32 at once).
TEST(WeightFormats, IntegerProductsAreTheSameOnEveryPath) {
  Rng rng(17);
  for (const auto& [type, cols] : {std::pair{WType::q4_k, 768},
                                   {WType::q4_k, 1280},
                                   {WType::q5_k, 768},
                                   {WType::q5_k, 1280},
                                   {WType::q6_k, 768},
                                   {WType::q6_k, 1280},
                                   {WType::q8_0, 768},
                                   {WType::q8_0, 800},
                                   {WType::q8_0, 32},
                                   {WType::mxfp4, 768},
                                   {WType::mxfp4, 800},
                                   {WType::mxfp4, 32}}) {
    const int64_t rows = 37;
    const Quantized s = make_quantized(type, rows, cols, rng);
    std::vector<float> x(static_cast<size_t>(2 * cols));
    for (float& v : x) v = static_cast<float>(rng.normal());
    std::vector<float> first;
    for (CpuPath p : cpu_paths_here()) {
      set_cpu_path_cap(p);
      std::vector<float> y(static_cast<size_t>(2 * rows));
      cpu::matmul_wt(s.view(rows, cols), x.data(), cols, 2, y.data(), rows);
      if (first.empty()) first = y;
      ASSERT_EQ(std::memcmp(y.data(), first.data(), y.size() * 4), 0)
          << wtype_name(type) << " " << cpu_path_name(p) << " cols " << cols;
    }
  }
  reset_cpu_path_cap();
}

// MXFP4's integer products scale each block by its E8M0 byte as ggml's dequantization does, for
// all 256 of them (subnormal and overflowing ones included): one block per row, every code 1
// (the value 2^(e - 128) exactly), x all ones (x_q = 127 codes of scale 1/127): each of the eight
// lanes holds d_x d_w times 4 * 127, their sum 8 times that, bit for bit on every path.
TEST(WeightFormats, Mxfp4IntegerProductsScaleByEveryE8M0Byte) {
  std::vector<uint8_t> bytes(256 * 17);
  for (int e = 0; e < 256; ++e) {
    bytes[static_cast<size_t>(17 * e)] = static_cast<uint8_t>(e);
    for (int k = 1; k < 17; ++k) bytes[static_cast<size_t>(17 * e + k)] = 0x11;
  }
  const WeightMatrix w{WType::mxfp4, bytes.data(), 256, 32};
  ASSERT_EQ(cpu::quant_activations(), cpu::QuantActivations::int8);
  std::vector<float> deq(static_cast<size_t>(256 * 32));
  cpu::weight_rows_f32(w, 0, 256, deq.data());
  const std::vector<float> x(32, 1.0f);
  const float dx = 1.0f / 127;
  for (CpuPath p : cpu_paths_here()) {
    set_cpu_path_cap(p);
    std::vector<float> y(256);
    cpu::matmul_wt(w, x.data(), 32, 1, y.data(), 256);
    for (int e = 0; e < 256; ++e) {
      const float lane = (dx * deq[static_cast<size_t>(32 * e)]) * 508.0f;
      EXPECT_EQ(y[static_cast<size_t>(e)], 8.0f * lane)
          << "E8M0 byte " << e << " " << cpu_path_name(p);
    }
  }
  reset_cpu_path_cap();
}

TEST(WeightFormats, QuantizedTensorsViewWholeBlocks) {
  std::vector<uint8_t> bytes(2 * 144);
  const Tensor t = Tensor::view(bytes.data(), {2, 256}, DType::Q4_K);
  EXPECT_EQ(t.nbytes(), 288u);
  EXPECT_EQ(t.view_at(256, {1, 256}).raw(), bytes.data() + 144);
  EXPECT_THROW(t.view_at(128, {128}), Error);                              // not a whole block
  EXPECT_THROW(Tensor::view(bytes.data(), {2, 100}, DType::Q4_K), Error);  // rows of 100
  EXPECT_THROW(dtype_size(DType::Q4_K), Error);
  const WeightMatrix w = as_weight(t);
  EXPECT_EQ(w.type, WType::q4_k);
  EXPECT_EQ(w.bytes(), 288u);
  std::vector<float> x(100), y(2);
  const WeightMatrix odd{WType::q4_k, bytes.data(), 2, 100};
  EXPECT_THROW(cpu::matmul_wt(odd, x.data(), 100, 1, y.data(), 2), Error);
}

TEST(WeightFormats, BadArgumentsAreRefused) {
  std::vector<int8_t> q(6, 1);
  std::vector<float> x(3, 1.0f), y(2);
  const WeightMatrix no_scale{WType::i8, q.data(), 2, 3, nullptr};
  EXPECT_THROW(cpu::matmul_wt(no_scale, x.data(), 3, 1, y.data(), 2), Error);
  const WeightMatrix w{WType::i8, q.data(), 2, 3, x.data()};
  EXPECT_THROW(cpu::matmul_wt(w, x.data(), 2, 1, y.data(), 2), Error);  // ldx < cols
  EXPECT_THROW(cpu::matmul_wt(w, x.data(), 3, 1, y.data(), 1), Error);  // ldy < rows
  EXPECT_FALSE(parse_wtype("q4").has_value());
  EXPECT_EQ(*parse_wtype("bf16"), WType::bf16);
}

}  // namespace moe
