// llama.cpp's file types and its choice of tensor types (moe/gguf_write.h), written from
// llama-quant.cpp (tensor_allows_quantization, tensor_get_category, llama_tensor_get_type_impl,
// tensor_type_fallback) for the file types this engine writes, so that a file written here has
// the types llama-quantize would give the same tensors.
#include <algorithm>
#include <cctype>
#include <cstdio>

#include "moe/error.h"
#include "moe/gguf_write.h"

namespace moe {

const std::vector<GgufFileTypeInfo>& gguf_file_types() {
  static const std::vector<GgufFileTypeInfo> table = {
      {GgufFileType::F32, "F32", 0, GgmlType::F32, "every tensor float32 (no loss)"},
      {GgufFileType::F16, "F16", 1, GgmlType::F16, "weight matrices IEEE half, 1-D tensors F32"},
      {GgufFileType::BF16, "BF16", 32, GgmlType::BF16,
       "weight matrices bfloat16 (exact for bf16 checkpoints), 1-D tensors F32"},
      {GgufFileType::Q8_0, "Q8_0", 7, GgmlType::Q8_0,
       "8-bit blocks of 32 with an f16 scale (8.5 bits per weight)"},
      {GgufFileType::Q6_K, "Q6_K", 18, GgmlType::Q6_K,
       "6-bit super-blocks of 256 (6.56 bits per weight); attn_k/attn_v Q8_0 with 8 experts"},
      {GgufFileType::Q5_K_M, "Q5_K_M", 17, GgmlType::Q5_K,
       "Q5_K (5.5 bits per weight), output and some attn_v/ffn_down Q6_K"},
      {GgufFileType::Q4_K_M, "Q4_K_M", 15, GgmlType::Q4_K,
       "Q4_K (4.5 bits per weight), output and some attn_v/ffn_down Q6_K, with 8 experts "
       "attn_output Q5_K and attn_k/attn_v Q8_0"},
      {GgufFileType::MXFP4_MOE, "MXFP4_MOE", 38, GgmlType::MXFP4,
       "routed experts MXFP4 (4.25 bits per weight), other matrices Q8_0"},
  };
  return table;
}

const GgufFileTypeInfo& gguf_file_type_info(GgufFileType t) {
  for (const GgufFileTypeInfo& i : gguf_file_types())
    if (i.type == t) return i;
  throw_error("gguf", fmt::format("unknown file type {}", static_cast<int>(t)));
}

GgufFileType parse_gguf_file_type(const std::string& name) {
  std::string up = name;
  for (char& ch : up) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  if (up == "MXFP4") up = "MXFP4_MOE";
  std::string known;
  for (const GgufFileTypeInfo& i : gguf_file_types()) {
    if (up == i.name) return i.type;
    known += (known.empty() ? "" : ", ") + std::string(i.name);
  }
  throw_error("gguf", fmt::format("unknown GGUF file type '{}' (known: {}; MXFP4 means MXFP4_MOE)",
                                  name, known));
}

namespace {

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ggml_n_dims: the dimensions up to the last one above 1 ([D, 1] is 1-D).
size_t n_dims(const std::vector<int64_t>& ne) {
  size_t n = ne.size();
  while (n > 1 && ne[n - 1] == 1) --n;
  return n;
}

// tensor_allows_quantization: weight matrices (2-D, 3-D), not norms, not the routers.
bool allows_quantization(const GgufTensorDesc& t) {
  if (n_dims(t.ne) < 2) return false;
  const std::string& n = t.name;
  bool q = n.size() >= 6 && n.compare(n.size() - 6, 6, "weight") == 0;
  q = q && !contains(n, "_norm.weight") && !contains(n, "ffn_gate_inp.weight");
  q = q && !contains(n, "altup") && !contains(n, "laurel") && !contains(n, "per_layer_model_proj");
  q = q && !contains(n, "ssm_conv1d") && !contains(n, "shortconv.conv.weight");
  q = q && !contains(n, "position_embd") && !contains(n, "token_types");
  return q;
}

enum class Category {
  output,
  token_embd,
  attn_qkv,
  attn_kv_b,
  attn_v,
  attn_k,
  attn_q,
  attn_output,
  ffn_up,
  ffn_gate,
  ffn_down,
  other
};

// tensor_get_category: by name, the first match in this order.
Category category(const std::string& n) {
  if (n == "output.weight") return Category::output;
  if (n == "token_embd.weight" || n == "per_layer_token_embd.weight") return Category::token_embd;
  if (contains(n, "attn_qkv.weight")) return Category::attn_qkv;
  if (contains(n, "attn_kv_b.weight")) return Category::attn_kv_b;
  if (contains(n, "attn_v.weight")) return Category::attn_v;
  if (contains(n, "attn_k.weight")) return Category::attn_k;
  if (contains(n, "attn_q.weight")) return Category::attn_q;
  if (contains(n, "attn_output.weight")) return Category::attn_output;
  if (contains(n, "ffn_up")) return Category::ffn_up;
  if (contains(n, "ffn_gate")) return Category::ffn_gate;
  if (contains(n, "ffn_down")) return Category::ffn_down;
  return Category::other;
}

bool attn_v_like(Category c) {
  return c == Category::attn_v || c == Category::attn_qkv || c == Category::attn_kv_b;
}

bool is_quantized(GgmlType t) {
  return t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16;
}

// use_more_bits: the first and last eighth of the layers and every third one between.
bool use_more_bits(int64_t i, int64_t n) {
  return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

}  // namespace

std::vector<GgmlType> gguf_recipe(const std::vector<GgufTensorDesc>& tensors, GgufFileType ft,
                                  int64_t n_expert, int64_t n_layer,
                                  std::vector<std::string>* notes) {
  const GgufFileTypeInfo& info = gguf_file_type_info(ft);
  const GgmlType def = info.default_type;
  const bool k_m = ft == GgufFileType::Q4_K_M || ft == GgufFileType::Q5_K_M;
  int64_t n_attention_wv = 0, i_attention_wv = 0, i_ffn_down = 0;
  bool tied = true;  // token_embd doubles as the output head until output.weight is seen
  for (const GgufTensorDesc& t : tensors) {
    const Category c = category(t.name);
    if (attn_v_like(c)) ++n_attention_wv;
    if (c == Category::output) tied = false;
  }
  const int64_t n_exp = std::max<int64_t>(1, n_expert);
  std::vector<GgmlType> out;
  out.reserve(tensors.size());
  for (const GgufTensorDesc& t : tensors) {
    if (!allows_quantization(t)) {
      out.push_back(t.type);
      continue;
    }
    GgmlType type = def;
    if (is_quantized(def)) {
      const Category c = category(t.name);
      // The layer of an FFN tensor: from its name in a model with experts, else counted.
      const auto layer_of = [&](int64_t counted) {
        if (n_exp <= 1) return counted;
        int layer = -1;
        MOE_CHECK(std::sscanf(t.name.c_str(), "blk.%d.", &layer) == 1, "gguf",
                  "cannot read the layer of tensor '{}'", t.name);
        MOE_CHECK(layer >= 0 && layer < n_layer, "gguf",
                  "tensor '{}': layer {} outside the {} layers", t.name, layer, n_layer);
        return static_cast<int64_t>(layer);
      };
      const int64_t block = ggml_type_info(type).block;
      if (c == Category::output || (tied && c == Category::token_embd)) {
        if (ft == GgufFileType::MXFP4_MOE || t.ne[0] % block != 0)
          type = GgmlType::Q8_0;
        else if (type != GgmlType::Q8_0)
          type = GgmlType::Q6_K;
      } else if (ft == GgufFileType::MXFP4_MOE) {
        type = t.ne.size() > 2 && t.ne[2] > 1 ? GgmlType::MXFP4 : GgmlType::Q8_0;
      } else if (attn_v_like(c)) {  // attn_v, attn_qkv, attn_kv_b
        if (k_m && use_more_bits(i_attention_wv, n_attention_wv)) type = GgmlType::Q6_K;
        if (n_expert == 8) type = GgmlType::Q8_0;
        ++i_attention_wv;
      } else if (c == Category::attn_k) {
        if (n_expert == 8) type = GgmlType::Q8_0;
      } else if (c == Category::ffn_down) {
        const int64_t layer = layer_of(i_ffn_down);
        if (k_m && use_more_bits(layer, n_layer)) type = GgmlType::Q6_K;
        ++i_ffn_down;
      } else if (c == Category::attn_output) {
        if (n_expert == 8 && ft == GgufFileType::Q4_K_M) type = GgmlType::Q5_K;
      }
      // tensor_type_fallback: rows that the type's blocks do not divide.
      if (t.ne[0] % ggml_type_info(type).block != 0) {
        const GgmlType wanted = type;
        if (type == GgmlType::Q4_K)
          type = GgmlType::Q5_0;
        else if (type == GgmlType::Q5_K)
          type = GgmlType::Q5_1;
        else if (type == GgmlType::Q6_K)
          type = GgmlType::Q8_0;
        if (t.ne[0] % ggml_type_info(type).block != 0) type = GgmlType::F16;
        if (notes)
          notes->push_back(fmt::format("{}: rows of {} are not a multiple of {}'s block of {}: {}",
                                       t.name, t.ne[0], ggml_type_name(wanted),
                                       ggml_type_info(wanted).block, ggml_type_name(type)));
      }
    }
    out.push_back(type);
  }
  return out;
}

}  // namespace moe
