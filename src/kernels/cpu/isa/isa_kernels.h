// The per-ISA kernels: products with weights in their stored formats (moe/weights.h), bf16
// rounding, SwiGLU, softmax's exponentials and AdamW's update. One source (isa_kernels_impl.h),
// compiled once per kernel path with that path's compiler flags (isa_generic.cpp, isa_avx2.cpp,
// isa_avx512.cpp, isa_avx512_vnni.cpp) into its own namespace, on Highway's ops for the target
// those flags make static. path_kernels() (weights.cpp) picks the table from moe::cpu_path(), never
// from a library's CPU detection.
//
// These files include nothing but Highway and <cstdint>: a template of the standard library
// instantiated here would be compiled for the wider ISA and could be the copy the linker keeps
// for the whole program.
#pragma once

#include <cstdint>

namespace moe::cpu {

// The quantized types with kernels of their own (quant_dot_impl.h); the others decode blocks
// through QuantFormat::decode.
enum class QuantKind { q8_0, q4_0, q4_k, q5_k, q6_k, mxfp4, other };

// A block-quantized row format (ggml's types): `block` elements in `block_bytes` bytes, decode
// writing one block's float32 values (moe::ggml_block_decoder, the values ggml's dequantization
// gives).
struct QuantFormat {
  QuantKind kind;
  int64_t block;
  int64_t block_bytes;
  void (*decode)(const uint8_t* b, float* out);
};

// n rows of x rounded to int8 per block (weights.cpp's quantize_activations): codes q [n, cols],
// a float scale per block d [n, cols / block], and (the K-quants' blocks of 256) the sums of
// every 16 codes bsum [n, cols / 16] and of every 32, bsum32 [n, cols / 32].
struct QuantRows {
  const int8_t* q;
  const float* d;
  const int16_t* bsum;
  const int16_t* bsum32;
};

struct IsaKernels {
  const char* target;
  // y[i * ldy + r] = sum_k w[r * cols + k] x[i * ldx + k] for r in [r0, r1), i < n (n <= 4);
  // i8 multiplies each row's sum by scale[r].
  void (*dot_f32)(const float* w, int64_t cols, const float* x, int64_t ldx, int64_t n, int64_t r0,
                  int64_t r1, float* y, int64_t ldy);
  void (*dot_bf16)(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n,
                   int64_t r0, int64_t r1, float* y, int64_t ldy);
  void (*dot_f16)(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int64_t n,
                  int64_t r0, int64_t r1, float* y, int64_t ldy);
  void (*dot_i8)(const int8_t* w, const float* scale, int64_t cols, const float* x, int64_t ldx,
                 int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy);
  // The same for quantized rows (cols / q.block blocks each; quant_dot_impl.h says how each
  // type's sums are formed, and their error bound). A row's result does not depend on the rows
  // it is computed with.
  // With xq (x as quantize_activations rounds it, for Q4_K, Q5_K, Q6_K, Q8_0 and MXFP4), the
  // products are the integer ones of quant_int_impl.h; else x is float32.
  void (*dot_q)(QuantFormat q, const uint8_t* w, int64_t cols, const float* x, int64_t ldx,
                int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy, const QuantRows* xq);
  // out[(r - r0) * cols + k] = w[r, k] as float32, r in [r0, r1).
  void (*rows_bf16)(const uint16_t* w, int64_t cols, int64_t r0, int64_t r1, float* out);
  void (*rows_f16)(const uint16_t* w, int64_t cols, int64_t r0, int64_t r1, float* out);
  void (*rows_i8)(const int8_t* w, const float* scale, int64_t cols, int64_t r0, int64_t r1,
                  float* out);
  // out[i] = x[i] rounded to bf16, to nearest, ties to even (a NaN stays a quiet NaN): the same
  // bits as moe::f32_to_bf16 on every path.
  void (*to_bf16)(const float* x, int64_t n, uint16_t* out);
  // SwiGLU (moe/kernels.h) in float32 with Highway's exp (at most 1 ulp from the correctly
  // rounded exp): h = silu(g) u, and its backward; outputs may alias inputs element for element.
  void (*swiglu_forward)(float* h, const float* g, const float* u, int64_t n);
  void (*swiglu_backward)(float* dg, float* du, const float* dh, const float* g, const float* u,
                          int64_t n);
  // y[j] = exp(x[j] - shift) for j < n (y may be x), returning their float32 sum (summed
  // lane-wise, then across lanes, then the tail).
  float (*exp_shifted)(float* y, const float* x, int64_t n, float shift);
  // One query row's attention over the keys and values j in [lo, hi) of a cache (moe/kernels.h's
  // attend_row): k_j = k + j ldk (dk floats), v_j = v + j ldv (dv floats); s: hi - lo floats of
  // scratch.
  void (*attend_f32)(float* out, const float* q, const float* k, int64_t ldk, int64_t dk,
                     const float* v, int64_t ldv, int64_t dv, int64_t lo, int64_t hi, float scale,
                     const float* sink, float* s);
  // AdamW on float32 weights with float64 moments, element by element in torch.optim.AdamW's
  // order (train/optimizer.cpp): c = {1 - lr wd, beta1, beta2, eps, lr / bc1, sqrt(bc2)}.
  void (*adamw_f32)(float* p, const float* g, double* m, double* v, int64_t n, const double* c);
};

// The table of the current kernel path (moe::cpu_path()).
const IsaKernels& path_kernels();

extern const IsaKernels kIsaKernelsGeneric;
extern const IsaKernels kIsaKernelsAvx2;
extern const IsaKernels kIsaKernelsAvx512;
extern const IsaKernels kIsaKernelsAvx512Vnni;

}  // namespace moe::cpu
