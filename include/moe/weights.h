// moe/weights.h: a weight matrix as it is stored (float32, bf16, f16, or int8 with one float32
// scale per row), and the products the engine computes from it without converting it first.
//
// Linear layers compute y = x W^T with W [rows, cols] = [out, in]. Few rows of x (decoding) read
// each weight once and are bound by memory bandwidth: one pass over W per call, each stored
// element widened to float32 in registers. Many rows (a prompt) run a GEMM on panels of W's rows:
// bf16 panels as stored, against x rounded to bf16 (as llama.cpp does; oneDNN's AMX or
// AVX512-BF16 kernels, an exact float32 fallback elsewhere: each product of two bf16 values is
// exact in float32, so |y - x_bf16 W^T| <= (k+2) 2^-24 sum |x_bf16 w|, and x_bf16 is within 2^-9
// of x relative); int8 panels likewise, their values exact in bf16 and each row's scale applied
// to its sums; f16 panels widened to float32 in a per-thread buffer, then the float32 GEMM on x.
// The weights stay in their format in memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "moe/tensor.h"

namespace moe {

enum class WType {
  f32,
  bf16,  // bfloat16: the top 16 bits of a float32
  f16,   // IEEE 754 binary16
  i8,    // int8, w[r, k] = scale[r] * q[r, k] (moe quantize --to int8)
  // ggml's block-quantized types (GGUF files; moe/gguf.h), in DType's order: each row is
  // cols / block blocks, the products decode a block at a time in registers or a small buffer
  // (never the whole matrix) into the values ggml's dequantization gives.
  q4_0,
  q4_1,
  q5_0,
  q5_1,
  q8_0,
  q2_k,
  q3_k,
  q4_k,
  q5_k,
  q6_k,
  mxfp4,
};

const char* wtype_name(WType t);
std::optional<WType> parse_wtype(const std::string& name);
size_t wtype_size(WType t);  // bytes per element; 0 for the block-quantized types
bool wtype_quantized(WType t);
DType wtype_dtype(WType t);

// W [rows, cols], row-major and contiguous as stored; scale [rows] for i8.
struct WeightMatrix {
  WType type = WType::f32;
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  const float* scale = nullptr;
  size_t row_bytes() const;
  size_t bytes() const { return static_cast<size_t>(rows) * row_bytes(); }
  // Row r, element k, widened to float32 exactly (bf16, f16 and int8 are exact in float32; the
  // i8 scale's product rounds once; a quantized block as ggml dequantizes it).
  float at(int64_t r, int64_t k) const;
};

// Scalar conversions: bf16 and f16 bits to float32 (exact); float32 to bf16, to nearest, ties to
// even (NaN stays NaN).
float bf16_to_f32(uint16_t h);
float f16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
// float32 to IEEE binary16, to nearest, ties to even (overflow to infinity, NaN stays NaN).
uint16_t f32_to_f16(float f);

// A tensor [rows, cols] (or [1, rows, cols]) of f32, bf16, f16, a quantized type, or i8 with its
// float32 scales [rows], as a weight matrix; anything else is an error naming the tensor's dtype.
WeightMatrix as_weight(const Tensor& w, const Tensor* scale = nullptr);

namespace cpu {

// y [n, rows] = x [n, cols] W^T for a weight tensor W [rows, cols] of the computation's type T
// (float32: gemm) or, for T = float, as stored (bf16, f16: matmul_wt). A stored W with T = double
// is an error: stored weights compute in float32.
template <class T>
void linear(T* y, const T* x, int64_t n, const Tensor& w, const Tensor* scale = nullptr);

// y[i, r] (row stride ldy) = sum_k W[r, k] x[i, k] (x row stride ldx), for i < n, r < rows,
// with W in its stored format; float32 arithmetic. Bits depend on the kernel path (moe/cpu.h)
// and on n (few rows or panels), never on the thread count. Runs on all threads outside a
// parallel region and on the calling thread inside one.
void matmul_wt(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n, float* y,
               int64_t ldy);

// y[i, c] (row stride ldy) = sum_r x[i, r] W[r, c] (x row stride ldx), for i < n, c < cols: a
// weight stored [in, out] (DBRX's experts' w2), in its stored format, float32 arithmetic; panels
// of W's rows widened to float32, each a GEMM added in order (bits independent of the thread
// count).
void matmul_w(const WeightMatrix& w, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy);

// Several independent products y = x W^T in one parallel region (the projections of a token's
// experts; of a prompt's experts, a grouped GEMM): the row blocks and panels of every job are
// spread over the threads together, so that small products do not each pay for starting the
// threads. Each job's bits are matmul_wt's.
struct MatmulJob {
  WeightMatrix w;
  const float* x = nullptr;
  int64_t ldx = 0, n = 0;
  float* y = nullptr;
  int64_t ldy = 0;
};
void matmul_wt_many(const MatmulJob* jobs, size_t count);

// Rows [r0, r1) of W widened to float32: out [(r1 - r0), cols].
void weight_rows_f32(const WeightMatrix& w, int64_t r0, int64_t r1, float* out);

// out[r * cols + c] = x[r * ldx + c] rounded to bf16 (f32_to_bf16's bits) for r < rows, c < cols:
// a compact copy. Runs on all threads outside a parallel region when it is large.
void round_to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint16_t* out);

// The SIMD target the weight kernels run on this path ("AVX3", "AVX2", "SCALAR").
const char* weight_kernel_target();

// How the products of quantized weights (Q4_K, Q5_K, Q6_K, Q8_0, MXFP4) treat x: rounded to int8
// per block and multiplied in integers, as llama.cpp does (the default: its error is llama.cpp's;
// a row's result the same bits alone or among many, except Q8_0 beyond kMatvecMaxRows rows:
// integer_products), or kept float32
// (within float32's bound of the dequantized weights' products; many rows then multiply panels
// decoded to float32). Process-wide.
enum class QuantActivations { int8, f32 };
void set_quant_activations(QuantActivations a);
QuantActivations quant_activations();
const char* quant_activations_name(QuantActivations a);

// Whether matmul_wt multiplies n rows of x by a `type` weight in integers (x rounded per block
// by quantize_activations): with int8 activations, for Q4_K, Q5_K, Q6_K and MXFP4 always, for
// Q8_0 up to kMatvecMaxRows rows (more take its float32 panels, which are faster).
bool integer_products(WType type, int64_t n);

// The block length x is rounded in for the integer products with weights of `type`: 32 (Q8_0,
// MXFP4), 256 (Q4_K, Q5_K, Q6_K), or 0 where the products keep x float32.
int64_t activation_block(WType type);

// x [cols] as the integer products of a quantized weight `type` round it: Q8_0 and MXFP4, blocks of
// 32, d [cols / 32] = max|x| / 127 and q = x / d to nearest; the K-quants, llama.cpp's Q8_K, blocks
// of 256, d [cols / 256] with the value of largest magnitude at -127, q [cols] to nearest (ties
// to even), and bsum [cols / 16] the sums of every 16 codes (not written for Q8_0). x_q = d q.
void quantize_activations(WType type, const float* x, int64_t cols, int8_t* q, float* d,
                          int16_t* bsum);

// At most this many rows of x take the one-pass path of matmul_wt; more take the panels (or, for
// the integer products, the kernels that unpack each weight block once for many rows).
constexpr int64_t kMatvecMaxRows = 4;
// float32 weights: up to this many rows (a continuous-batching decode step) take the one-pass dot
// kernels too, each weight block read from memory once and from L1 again for every row; a GEMM
// library's call costs more than such a product (measured: a decode step of 8 sequences of the
// `small` model).
constexpr int64_t kF32DotMaxRows = 8;
// Whether matmul_wt multiplies n rows of x by a `type` weight with the dot kernels.
bool dot_products(WType type, int64_t n);

}  // namespace cpu
}  // namespace moe
