// gpt-oss's expert layout (transformers' GptOssExperts): one tensor per projection and layer,
// gate and up interleaved in one matrix, in MXFP4 (the released checkpoints) or bfloat16.
//
// MXFP4 (OCP Microscaling Formats v1.0, section 5): blocks of 32 values, each a 4-bit E2M1 code
// (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), sharing an E8M0 scale 2^(s - 127). The
// checkpoint keeps the codes as "<name>_blocks" [E, R, G, 16] (byte j of a block holds value 2j
// in its low nibble and 2j + 1 in its high one) and the scales as "<name>_scales" [E, R, G], for
// R output rows of G blocks. ggml's block_mxfp4 puts the scale first and pairs value j with value
// j + 16 in byte j; its codes are twice the E2M1 values and its scale half 2^(s - 127), the
// same products. The experts are rewritten once into ggml's blocks (the same bytes, 17 per 32
// values) and computed from as such, as GGUF files' experts are.
#include <cstring>

#include "moe/hf.h"

namespace moe {

namespace {

const char* const kWhere = "hf";

// The checkpoint's U8 tensor `name` with exactly `shape`.
const StoredTensor& u8_tensor(HfTensors& src, const std::string& name, const Shape& shape) {
  MOE_CHECK(src.has(name), kWhere, "no tensor {}", name);
  const StoredTensor& t = src.stored(name);
  MOE_CHECK(t.dtype == "U8" && t.shape == shape, kWhere, "{} must be U8 {}, got {} {}", name,
            shape_str(shape), t.dtype, shape_str(t.shape));
  return t;
}

// One row of G blocks in the checkpoint's layout -> G ggml blocks.
void mxfp4_row(const uint8_t* codes, const uint8_t* scales, int64_t groups, uint8_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* c = codes + g * 16;
    uint8_t* o = out + g * 17;
    o[0] = scales[g];
    for (int j = 0; j < 16; ++j) {
      const int lo = (c[j / 2] >> (4 * (j % 2))) & 15;      // value j
      const int hi = (c[8 + j / 2] >> (4 * (j % 2))) & 15;  // value j + 16
      o[1 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

// Experts' matrices [E, rows, cols] (MXFP4) from the checkpoint's [E, R, cols / 32, 16] codes and
// scales: output row r of expert e is the checkpoint's row row_of(r).
template <class RowOf>
Tensor mxfp4_matrices(HfTensors& src, const std::string& name, int64_t E, int64_t R, int64_t rows,
                      int64_t cols, RowOf row_of) {
  MOE_CHECK(cols % 32 == 0, kWhere, "{}: rows of {} values are not whole MXFP4 blocks", name, cols);
  const int64_t G = cols / 32;
  const StoredTensor& codes = u8_tensor(src, name + "_blocks", {E, R, G, 16});
  const StoredTensor& scales = u8_tensor(src, name + "_scales", {E, R, G});
  Tensor out = Tensor::empty({E, rows, cols}, DType::MXFP4);
  auto* o = static_cast<uint8_t*>(out.raw());
  const auto* c = reinterpret_cast<const uint8_t*>(codes.data);
  const auto* s = reinterpret_cast<const uint8_t*>(scales.data);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t from = e * R + row_of(r);
      mxfp4_row(c + from * G * 16, s + from * G, G, o + (e * rows + r) * G * 17);
    }
  src.drop(name + "_blocks");
  src.drop(name + "_scales");
  return out;
}

// The bf16 layout: gate_up_proj [E, D, 2F] and down_proj [E, F, D] hold each matrix transposed
// (input rows); out [E, rows, cols] takes out[e, r, k] = t[e, k, col_of(r)].
template <class ColOf>
Tensor transposed(HfTensors& src, const std::string& name, int64_t E, int64_t in, int64_t width,
                  int64_t rows, ColOf col_of) {
  const Tensor t = src.view(name).to(DType::F32);
  t.expect(kWhere, name.c_str(), {E, in, width}, DType::F32);
  Tensor out = Tensor::empty({E, rows, in}, DType::F32);
  const float* p = t.data<float>();
  float* o = out.data<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < in; ++k)
        o[(e * rows + r) * in + k] = p[(e * in + k) * width + col_of(r)];
  src.drop(name);
  return out.to(DType::BF16);  // exact: the values were bf16
}

// Bias rows [E, rows] as float32, row r from the checkpoint's column col_of(r).
template <class ColOf>
Tensor bias(HfTensors& src, const std::string& name, int64_t E, int64_t width, int64_t rows,
            ColOf col_of) {
  const Tensor t = src.view(name).to(DType::F32);
  t.expect(kWhere, name.c_str(), {E, width}, DType::F32);
  Tensor out = Tensor::empty({E, rows}, DType::F32);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; ++r)
      out.data<float>()[e * rows + r] = t.data<float>()[e * width + col_of(r)];
  return out;
}

}  // namespace

StackedExperts gpt_oss_experts(const ModelConfig& c, HfTensors& src, int64_t layer) {
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.experts.";
  const auto gate_row = [](int64_t r) { return 2 * r; };
  const auto up_row = [](int64_t r) { return 2 * r + 1; };
  const auto same = [](int64_t r) { return r; };
  StackedExperts x;
  if (src.has(p + "gate_up_proj_blocks")) {
    x.gate = mxfp4_matrices(src, p + "gate_up_proj", E, 2 * F, F, D, gate_row);
    // Read twice (once per half): the codes stay mapped until both are made.
    x.up = mxfp4_matrices(src, p + "gate_up_proj", E, 2 * F, F, D, up_row);
    x.down = mxfp4_matrices(src, p + "down_proj", E, D, D, F, same);
  } else {
    MOE_CHECK(src.has(p + "gate_up_proj"), kWhere,
              "no {}gate_up_proj (bf16) or gate_up_proj_blocks (MXFP4)", p);
    x.gate = transposed(src, p + "gate_up_proj", E, D, 2 * F, F, gate_row);
    x.up = transposed(src, p + "gate_up_proj", E, D, 2 * F, F, up_row);
    x.down = transposed(src, p + "down_proj", E, F, D, D, same);
  }
  x.b_gate = bias(src, p + "gate_up_proj_bias", E, 2 * F, F, gate_row);
  x.b_up = bias(src, p + "gate_up_proj_bias", E, 2 * F, F, up_row);
  x.b_down = bias(src, p + "down_proj_bias", E, D, D, same);
  return x;
}

}  // namespace moe
