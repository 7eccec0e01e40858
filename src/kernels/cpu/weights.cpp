// Products with weights in their stored format (moe/weights.h): the per-ISA table chosen by
// cpu_path(), the split over threads, and the scalar conversions.
#include "moe/weights.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/isa/isa_kernels.h"
#include "kernels/cpu/isa/scalar_convert.h"
#include "moe/cpu.h"
#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/kernels.h"
#include "moe/tensor.h"
#include "moe/threading.h"

namespace moe {

bool wtype_quantized(WType t) { return t >= WType::q4_0; }

DType wtype_dtype(WType t) {
  switch (t) {
    case WType::f32: return DType::F32;
    case WType::bf16: return DType::BF16;
    case WType::f16: return DType::F16;
    case WType::i8: return DType::I8;
    default:  // the quantized types, in the same order
      return static_cast<DType>(static_cast<int>(DType::Q4_0) + static_cast<int>(t) -
                                static_cast<int>(WType::q4_0));
  }
}

const char* wtype_name(WType t) {
  switch (t) {
    case WType::f32: return "f32";
    case WType::bf16: return "bf16";
    case WType::f16: return "f16";
    case WType::i8: return "i8";
    default: return dtype_name(wtype_dtype(t));
  }
}

std::optional<WType> parse_wtype(const std::string& name) {
  for (WType t : {WType::f32, WType::bf16, WType::f16, WType::i8})
    if (name == wtype_name(t)) return t;
  return std::nullopt;
}

size_t wtype_size(WType t) {
  switch (t) {
    case WType::f32: return 4;
    case WType::bf16:
    case WType::f16: return 2;
    case WType::i8: return 1;
    default: return 0;
  }
}

size_t WeightMatrix::row_bytes() const {
  return wtype_quantized(type) ? dtype_bytes(wtype_dtype(type), cols)
                               : static_cast<size_t>(cols) * wtype_size(type);
}

float bf16_to_f32(uint16_t h) { return cpu::scalar::bf16_to_f32(h); }
float f16_to_f32(uint16_t h) { return cpu::scalar::f16_to_f32(h); }

uint16_t f32_to_bf16(float f) { return cpu::scalar::f32_to_bf16(f); }

namespace {
uint16_t scalar_load16(const void* data, int64_t i) {
  return cpu::scalar::load16(static_cast<const uint16_t*>(data) + i);
}
}  // namespace

uint16_t f32_to_f16(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: infinity
  if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (exact scaling, rounded to even)
    float v;
    __builtin_memcpy(&v, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(v * 16777216.0f)));
  }
  uint32_t r = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;  // a carry moves into the exponent
  return static_cast<uint16_t>(sign | r);
}

float WeightMatrix::at(int64_t r, int64_t k) const {
  const int64_t i = r * cols + k;
  switch (type) {
    case WType::f32: return static_cast<const float*>(data)[i];
    case WType::bf16: return bf16_to_f32(scalar_load16(data, i));
    case WType::f16: return f16_to_f32(scalar_load16(data, i));
    case WType::i8: return static_cast<float>(static_cast<const int8_t*>(data)[i]) * scale[r];
    default: break;
  }
  const DType dt = wtype_dtype(type);  // the block holding (r, k), dequantized
  const int64_t block = dtype_block(dt);
  float values[256];
  MOE_CHECK(block <= 256, "weights", "blocks of {} elements", block);
  dequantize_row(ggml_type_of(dt),
                 static_cast<const char*>(data) + static_cast<size_t>(r) * row_bytes() +
                     dtype_bytes(dt, k / block * block),
                 values, block);
  return values[k % block];
}

WeightMatrix as_weight(const Tensor& w, const Tensor* scale) {
  const int64_t nd = w.ndim();
  MOE_CHECK(nd == 2 || (nd == 3 && w.size(0) == 1), "weights",
            "a weight matrix must be [rows, cols], got {}", w.str());
  WType t = WType::f32;
  switch (w.dtype()) {
    case DType::F32: t = WType::f32; break;
    case DType::BF16: t = WType::bf16; break;
    case DType::F16: t = WType::f16; break;
    case DType::I8: t = WType::i8; break;
    default:
      MOE_CHECK(dtype_quantized(w.dtype()), "weights",
                "{} weights cannot be computed from as stored (f32, bf16, f16, i8 and ggml's "
                "quantized types can)",
                dtype_name(w.dtype()));
      t = static_cast<WType>(static_cast<int>(WType::q4_0) + static_cast<int>(w.dtype()) -
                             static_cast<int>(DType::Q4_0));
  }
  const int64_t rows = w.size(nd - 2), cols = w.size(nd - 1);
  if (t != WType::i8) return {t, w.raw(), rows, cols, nullptr};
  MOE_CHECK(scale && scale->defined() && scale->dtype() == DType::F32 && scale->numel() == rows,
            "weights", "an int8 weight {} needs float32 scales [{}], got {}", w.str(), rows,
            scale && scale->defined() ? scale->str() : std::string("none"));
  return {t, w.raw(), rows, cols, scale->data<float>()};
}

namespace cpu {

template <class T>
void linear(T* y, const T* x, int64_t n, const Tensor& w, const Tensor* scale) {
  const int64_t rows = w.size(w.ndim() - 2), cols = w.size(w.ndim() - 1);
  if (w.dtype() == dtype_of<T>()) {
    gemm<T>(false, true, n, rows, cols, T(1), x, cols, w.data<T>(), cols, T(0), y, rows);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    matmul_wt(as_weight(w, scale), x, cols, n, y, rows);
  } else {
    throw_error("weights", fmt::format("{} weights compute in float32 only, not in {}",
                                       dtype_name(w.dtype()), dtype_name(dtype_of<T>())));
  }
}
template void linear<float>(float*, const float*, int64_t, const Tensor&, const Tensor*);
template void linear<double>(double*, const double*, int64_t, const Tensor&, const Tensor*);

const IsaKernels& path_kernels() {
  const CpuPath p = cpu_path();
  if (p >= CpuPath::avx512_vnni) return kIsaKernelsAvx512Vnni;
  if (p >= CpuPath::avx512) return kIsaKernelsAvx512;
  if (p >= CpuPath::avx2) return kIsaKernelsAvx2;
  return kIsaKernelsGeneric;
}

namespace {

const IsaKernels& kernels() { return path_kernels(); }

// Rows of W per task: fixed by the shape, so the split (and nothing else) varies with threads.
constexpr int64_t kDotRows = 128;
constexpr int64_t kPanelRows = 64;

// x [n, cols] (row stride ldx) times W^T into y (row stride ldy): strides that hold the rows.
void check_product(const WeightMatrix& w, int64_t ldx, int64_t n, int64_t ldy, const char* where) {
  MOE_CHECK(n >= 0 && ldx >= w.cols && ldy >= w.rows, where,
            "x [{}, {}] (stride {}) times W^T [{}, {}] into y (stride {})", n, w.cols, ldx, w.cols,
            w.rows, ldy);
}

void check(const WeightMatrix& w, const char* where) {
  MOE_CHECK(w.rows >= 0 && w.cols >= 0, where, "weight shape [{}, {}]", w.rows, w.cols);
  MOE_CHECK(w.data || w.rows * w.cols == 0, where, "weight [{}, {}] has no data", w.rows, w.cols);
  MOE_CHECK(w.type != WType::i8 || w.scale || w.rows == 0, where,
            "an int8 weight [{}, {}] needs its row scales", w.rows, w.cols);
  MOE_CHECK(!wtype_quantized(w.type) || w.cols % dtype_block(wtype_dtype(w.type)) == 0, where,
            "a {} weight's rows are whole blocks of {} elements, not {}", wtype_name(w.type),
            dtype_block(wtype_dtype(w.type)), w.cols);
}

// Runs task(t) for t < tasks: on all threads outside a parallel region (when the work is worth
// it), on the calling thread inside one. Tasks are handed out one at a time as threads finish
// (a task writes only its own outputs, so the bits do not depend on which thread runs it): a
// thread slowed for a moment (a shared core, a page fault) does not hold the other at the
// barrier, which static halves did (decoding 2-3% faster on 2 threads).
template <class Task>
void for_tasks(int64_t tasks, int64_t work, const Task& task) {
  if (tasks > 1 && work >= kParallelMin && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  }
}

// The block layout and decoder of a quantized weight type, for the ISA kernels.
QuantFormat quant_format(WType t) {
  const DType d = wtype_dtype(t);
  const QuantKind kind = t == WType::q8_0    ? QuantKind::q8_0
                         : t == WType::q4_0  ? QuantKind::q4_0
                         : t == WType::q4_k  ? QuantKind::q4_k
                         : t == WType::q5_k  ? QuantKind::q5_k
                         : t == WType::q6_k  ? QuantKind::q6_k
                         : t == WType::mxfp4 ? QuantKind::mxfp4
                                             : QuantKind::other;
  return {kind, dtype_block(d), static_cast<int64_t>(dtype_block_bytes(d)),
          ggml_block_decoder(ggml_type_of(d))};
}

// x rounded to int8 per block for the integer products of a quantized weight (QuantRows), or
// nothing where the product keeps x float32.
struct QuantizedX {
  std::vector<int8_t> q;  // the codes from its first 64-byte boundary on (q0)
  std::vector<float> d;
  std::vector<int16_t> bsum, bsum32;
  bool used = false;
  int8_t* q0 = nullptr;
  QuantRows rows() const { return {q0, d.data(), bsum.data(), bsum32.data()}; }
};

void quantize_x(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n, QuantizedX& out) {
  out.used = integer_products(w.type, n);
  if (!out.used) return;
  const int64_t block = activation_block(w.type), cols = w.cols;
  // Aligned to cache lines: the kernels' 32-byte loads of the codes then never straddle two
  // (a row's codes are whole blocks of 32).
  out.q.resize(static_cast<size_t>(n * cols + 63));
  out.q0 = out.q.data() + (64 - reinterpret_cast<uintptr_t>(out.q.data()) % 64) % 64;
  out.d.resize(static_cast<size_t>(n * (cols / block)));
  out.bsum.resize(static_cast<size_t>(n * (cols / 16)));
  out.bsum32.resize(static_cast<size_t>(n * (cols / 32)));
  for_tasks(n, n * cols * 8, [&](int64_t i) {
    int16_t* b16 = out.bsum.data() + i * (cols / 16);
    quantize_activations(w.type, x + i * ldx, cols, out.q0 + i * cols,
                         out.d.data() + i * (cols / block), b16);
    if (block == 256)
      for (int64_t g = 0; g < cols / 32; ++g)  // |sum| <= 32 * 127
        out.bsum32[static_cast<size_t>(i * (cols / 32) + g)] =
            static_cast<int16_t>(b16[2 * g] + b16[2 * g + 1]);
  });
}

void dot_block(const IsaKernels& k, const WeightMatrix& w, const float* x, int64_t ldx, int64_t n,
               int64_t r0, int64_t r1, float* y, int64_t ldy, const QuantizedX* xq = nullptr) {
  switch (w.type) {
    case WType::f32:
      k.dot_f32(static_cast<const float*>(w.data), w.cols, x, ldx, n, r0, r1, y, ldy);
      break;
    case WType::bf16:
      k.dot_bf16(static_cast<const uint16_t*>(w.data), w.cols, x, ldx, n, r0, r1, y, ldy);
      break;
    case WType::f16:
      k.dot_f16(static_cast<const uint16_t*>(w.data), w.cols, x, ldx, n, r0, r1, y, ldy);
      break;
    case WType::i8:
      k.dot_i8(static_cast<const int8_t*>(w.data), w.scale, w.cols, x, ldx, n, r0, r1, y, ldy);
      break;
    default:
      if (xq && xq->used) {
        const QuantRows rows = xq->rows();
        k.dot_q(quant_format(w.type), static_cast<const uint8_t*>(w.data), w.cols, x, ldx, n, r0,
                r1, y, ldy, &rows);
      } else {
        k.dot_q(quant_format(w.type), static_cast<const uint8_t*>(w.data), w.cols, x, ldx, n, r0,
                r1, y, ldy, nullptr);
      }
  }
}

void rows_f32(const IsaKernels& k, const WeightMatrix& w, int64_t r0, int64_t r1, float* out) {
  switch (w.type) {
    case WType::f32:
      std::copy(static_cast<const float*>(w.data) + r0 * w.cols,
                static_cast<const float*>(w.data) + r1 * w.cols, out);
      break;
    case WType::bf16: k.rows_bf16(static_cast<const uint16_t*>(w.data), w.cols, r0, r1, out); break;
    case WType::f16: k.rows_f16(static_cast<const uint16_t*>(w.data), w.cols, r0, r1, out); break;
    case WType::i8:
      k.rows_i8(static_cast<const int8_t*>(w.data), w.scale, w.cols, r0, r1, out);
      break;
    default:
      for (int64_t r = r0; r < r1; ++r)
        dequantize_row(ggml_type_of(wtype_dtype(w.type)),
                       static_cast<const char*>(w.data) + static_cast<size_t>(r) * w.row_bytes(),
                       out + (r - r0) * w.cols, w.cols);
  }
}

// The many-row products of bf16 and int8 weights run on the bf16 GEMM, against x rounded to bf16
// (an int8 value is exact in bf16, its row scale applied to the sums).
bool bf16_panels(const WeightMatrix& w) { return w.type == WType::bf16 || w.type == WType::i8; }

// Rows per panel of the many-row products: bf16 panels go to the bf16 GEMM as they are stored,
// so they can be larger; other formats are converted into a per-thread buffer first.
int64_t panel_rows(const WeightMatrix& w) { return w.type == WType::bf16 ? 256 : kPanelRows; }

// y[:, r0:r1] = x W[r0:r1]^T for n rows. bf16 W multiplies xb, x rounded to bf16 ([n, cols]
// compact), by the stored panel (gemm_bf16: oneDNN's AMX or AVX512-BF16 kernels, an exact
// float32 fallback elsewhere); int8 W does the same with its values as bf16 (exact), then
// scales each column of y by its row's scale; f16 widens the panel to float32 and runs the
// float32 GEMM on x. Single-threaded inside a parallel region.
void panel_product(const IsaKernels& k, const WeightMatrix& w, const float* x, int64_t ldx,
                   const uint16_t* xb, int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (w.type == WType::bf16) {
    gemm_bf16(false, true, n, r1 - r0, w.cols, 1.0f, xb, w.cols,
              static_cast<const uint16_t*>(w.data) + r0 * w.cols, w.cols, 0.0f, y + r0, ldy);
    return;
  }
  if (w.type == WType::i8) {
    thread_local std::vector<float> row;
    thread_local std::vector<uint16_t> q;
    row.resize(static_cast<size_t>(w.cols));
    q.resize(static_cast<size_t>((r1 - r0) * w.cols));
    for (int64_t r = r0; r < r1; ++r) {  // q as bf16, a row at a time through float32
      k.rows_i8(static_cast<const int8_t*>(w.data), nullptr, w.cols, r, r + 1, row.data());
      k.to_bf16(row.data(), w.cols, q.data() + (r - r0) * w.cols);
    }
    gemm_bf16(false, true, n, r1 - r0, w.cols, 1.0f, xb, w.cols, q.data(), w.cols, 0.0f, y + r0,
              ldy);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = r0; r < r1; ++r) y[i * ldy + r] *= w.scale[r];
    return;
  }
  thread_local std::vector<float> panel;
  panel.resize(static_cast<size_t>((r1 - r0) * w.cols));
  rows_f32(k, w, r0, r1, panel.data());
  gemm<float>(false, true, n, r1 - r0, w.cols, 1.0f, x, ldx, panel.data(), w.cols, 0.0f, y + r0,
              ldy);
}

// x [n, cols] (stride ldx) rounded to bf16 where W's panels are bf16 (panel_product's xb), else
// empty.
std::vector<uint16_t> rounded_rows(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n) {
  std::vector<uint16_t> xb;
  if (!bf16_panels(w)) return xb;
  xb.resize(static_cast<size_t>(n * w.cols));
  round_to_bf16(x, n, w.cols, ldx, xb.data());
  return xb;
}

}  // namespace

const char* weight_kernel_target() { return kernels().target; }

namespace {
std::atomic<QuantActivations> g_quant_activations{QuantActivations::int8};
}  // namespace

void set_quant_activations(QuantActivations a) { g_quant_activations = a; }
QuantActivations quant_activations() { return g_quant_activations; }
const char* quant_activations_name(QuantActivations a) {
  return a == QuantActivations::int8 ? "int8" : "f32";
}

void weight_rows_f32(const WeightMatrix& w, int64_t r0, int64_t r1, float* out) {
  check(w, "weight_rows_f32");
  MOE_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.rows, "weight_rows_f32", "rows [{}, {}) of {}", r0, r1,
            w.rows);
  // Threads only for large blocks (an offloaded expert is converted on every use).
  const IsaKernels& k = kernels();
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, w.cols));
  const int64_t tasks = (r1 - r0 + block - 1) / block;
  for_tasks(tasks, (r1 - r0) * w.cols / 8, [&](int64_t t) {
    const int64_t a = r0 + t * block, b = std::min(r1, a + block);
    rows_f32(k, w, a, b, out + (a - r0) * w.cols);
  });
}

void matmul_wt_many(const MatmulJob* jobs, size_t count) {
  // (job, first row) of every block: kDotRows rows of W read once for a few rows of x, or a
  // panel of W for many (a grouped GEMM: every expert's panels in one parallel region).
  std::vector<std::pair<size_t, int64_t>> blocks;
  std::vector<std::vector<uint16_t>> xb(count);  // bf16 panels' x, rounded once per job
  thread_local std::vector<QuantizedX> xq_keep;  // quantized weights' x, rounded once per job
  if (xq_keep.size() < count) xq_keep.resize(count);
  QuantizedX* xq = xq_keep.data();  // the workers read the caller's (thread_local is per thread)
  int64_t work = 0;
  for (size_t j = 0; j < count; ++j) {
    const MatmulJob& b = jobs[j];
    check(b.w, "matmul_wt_many");
    if (b.w.cols == 0 || (b.w.type == WType::f32 && !dot_products(b.w.type, b.n))) {  // GEMM
      matmul_wt(b.w, b.x, b.ldx, b.n, b.y, b.ldy);
      continue;
    }
    check_product(b.w, b.ldx, b.n, b.ldy, "matmul_wt_many");
    if (b.n == 0) continue;
    const bool dot = dot_products(b.w.type, b.n);
    const int64_t step = dot ? kDotRows : panel_rows(b.w);
    if (!dot) xb[j] = rounded_rows(b.w, b.x, b.ldx, b.n);
    quantize_x(b.w, b.x, b.ldx, b.n, xq[j]);
    for (int64_t r = 0; r < b.w.rows; r += step) blocks.emplace_back(j, r);
    work += b.n * b.w.rows * b.w.cols;
  }
  const IsaKernels& k = kernels();
  for_tasks(static_cast<int64_t>(blocks.size()), work, [&](int64_t t) {
    const auto [j, r0] = blocks[static_cast<size_t>(t)];
    const MatmulJob& b = jobs[j];
    if (dot_products(b.w.type, b.n)) {
      dot_block(k, b.w, b.x, b.ldx, b.n, r0, std::min(b.w.rows, r0 + kDotRows), b.y, b.ldy, &xq[j]);
    } else {
      panel_product(k, b.w, b.x, b.ldx, xb[j].data(), b.n, r0,
                    std::min(b.w.rows, r0 + panel_rows(b.w)), b.y, b.ldy);
    }
  });
}

void matmul_wt(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n, float* y,
               int64_t ldy) {
  check(w, "matmul_wt");
  check_product(w, ldx, n, ldy, "matmul_wt");
  if (n == 0 || w.rows == 0) return;
  if (w.cols == 0) {
    for (int64_t i = 0; i < n; ++i) std::fill(y + i * ldy, y + i * ldy + w.rows, 0.0f);
    return;
  }
  const IsaKernels& k = kernels();
  if (dot_products(w.type, n)) {  // the dot kernels (quantized: any n)
    thread_local QuantizedX xq;
    quantize_x(w, x, ldx, n, xq);
    const QuantizedX* xqp = &xq;  // the workers read the caller's
    const int64_t tasks = (w.rows + kDotRows - 1) / kDotRows;
    for_tasks(tasks, w.rows * w.cols, [&](int64_t t) {
      dot_block(k, w, x, ldx, n, t * kDotRows, std::min(w.rows, (t + 1) * kDotRows), y, ldy, xqp);
    });
    return;
  }
  if (w.type == WType::f32) {
    gemm<float>(false, true, n, w.rows, w.cols, 1.0f, x, ldx, static_cast<const float*>(w.data),
                w.cols, 0.0f, y, ldy);
    return;
  }
  // Panels of W's rows, each a single-threaded GEMM (panel_product).
  const std::vector<uint16_t> xb = rounded_rows(w, x, ldx, n);
  const int64_t rows = panel_rows(w), tasks = (w.rows + rows - 1) / rows;
  for_tasks(tasks, n * w.rows * w.cols, [&](int64_t t) {
    const int64_t r0 = t * rows;
    panel_product(k, w, x, ldx, xb.data(), n, r0, std::min(w.rows, r0 + rows), y, ldy);
  });
}

void matmul_w(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n, float* y,
              int64_t ldy) {
  check(w, "matmul_w");
  MOE_CHECK(n >= 0 && ldx >= w.rows && ldy >= w.cols, "matmul_w",
            "x [{}, {}] (stride {}) times W [{}, {}] into y (stride {})", n, w.rows, ldx, w.rows,
            w.cols, ldy);
  if (n == 0 || w.cols == 0) return;
  if (w.type == WType::f32) {
    gemm<float>(false, false, n, w.cols, w.rows, 1.0f, x, ldx, static_cast<const float*>(w.data),
                w.cols, 0.0f, y, ldy);
    return;
  }
  // Panels of W's rows (the product's k) widened to float32, each a GEMM adding its part, in
  // order: the bits do not depend on the thread count.
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 16) / w.cols);
  thread_local std::vector<float> panel;
  if (w.rows == 0) {
    for (int64_t i = 0; i < n; ++i) std::fill(y + i * ldy, y + i * ldy + w.cols, 0.0f);
    return;
  }
  for (int64_t r0 = 0; r0 < w.rows; r0 += rows) {
    const int64_t r1 = std::min(w.rows, r0 + rows);
    panel.resize(static_cast<size_t>((r1 - r0) * w.cols));
    weight_rows_f32(w, r0, r1, panel.data());
    gemm<float>(false, false, n, w.cols, r1 - r0, 1.0f, x + r0, ldx, panel.data(), w.cols,
                r0 == 0 ? 0.0f : 1.0f, y, ldy);
  }
}

namespace {

int nearest_int(float f) {  // ggml's: round half to even, for |f| < 2^22
  const float v = f + 12582912.f;
  int i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

}  // namespace

bool dot_products(WType type, int64_t n) {
  return n <= (type == WType::f32 ? kF32DotMaxRows : kMatvecMaxRows) || integer_products(type, n);
}

bool integer_products(WType type, int64_t n) {
  if (quant_activations() != QuantActivations::int8 || activation_block(type) == 0) return false;
  // Many rows of Q8_0 x: its float32 panels are faster than its integer kernel (measured on an
  // AMD EPYC, AVX2, 512 rows of x times a 768 x 2048 weight: 27 against 39 GMAC/s on one core), as
  // its blocks widen to float32 with one multiply while the integer products convert and scale the
  // sums of every 32.
  return type != WType::q8_0 || n <= kMatvecMaxRows;
}

int64_t activation_block(WType type) {
  switch (type) {
    case WType::q8_0:
    case WType::mxfp4: return 32;
    case WType::q4_k:
    case WType::q5_k:
    case WType::q6_k: return 256;
    default: return 0;
  }
}

void quantize_activations(WType type, const float* x, int64_t cols, int8_t* q, float* d,
                          int16_t* bsum) {
  if (activation_block(type) == 32) {  // scale max|x| / 127 (llama.cpp's Q8_0, in float)
    for (int64_t b = 0; b < cols / 32; ++b) {
      const float* xb = x + 32 * b;
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float s = amax / 127, inv = s != 0 ? 1 / s : 0;
      d[b] = s;
      for (int j = 0; j < 32; ++j) q[32 * b + j] = static_cast<int8_t>(nearest_int(xb[j] * inv));
    }
    return;
  }
  // llama.cpp's quantize_row_q8_K_ref: the value of largest magnitude maps to -127.
  for (int64_t b = 0; b < cols / 256; ++b) {
    const float* xb = x + 256 * b;
    float max = 0, amax = 0;
    for (int j = 0; j < 256; ++j) {
      const float ax = std::fabs(xb[j]);
      if (ax > amax) {
        amax = ax;
        max = xb[j];
      }
    }
    int8_t* qb = q + 256 * b;
    if (amax == 0) {
      d[b] = 0;
      std::fill(qb, qb + 256, int8_t{0});
    } else {
      const float iscale = -127.f / max;
      for (int j = 0; j < 256; ++j)
        qb[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * xb[j])));
      d[b] = 1 / iscale;
    }
    for (int g = 0; g < 16; ++g) {
      int32_t sum = 0;
      for (int j = 0; j < 16; ++j) sum += qb[16 * g + j];
      bsum[16 * b + g] = static_cast<int16_t>(sum);  // |sum| <= 16 * 127
    }
  }
}

void round_to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint16_t* out) {
  MOE_CHECK(rows >= 0 && cols >= 0 && (ldx >= cols || rows <= 1), "round_to_bf16",
            "[{}, {}] with row stride {}", rows, cols, ldx);
  if (rows == 0 || cols == 0) return;
  const IsaKernels& k = kernels();
  if (ldx == cols) {  // one run, in blocks
    const int64_t n = rows * cols, block = 1 << 16, tasks = (n + block - 1) / block;
    for_tasks(tasks, n, [&](int64_t t) {
      const int64_t i0 = t * block;
      k.to_bf16(x + i0, std::min(block, n - i0), out + i0);
    });
    return;
  }
  for_tasks(rows, rows * cols, [&](int64_t r) { k.to_bf16(x + r * ldx, cols, out + r * cols); });
}

}  // namespace cpu
}  // namespace moe
