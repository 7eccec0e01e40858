// moe/gguf_write.h: models written as llama.cpp's GGUF files (`moe quantize --out FILE.gguf`):
// llama.cpp's metadata keys, tensor names and tokenizer keys for the architectures this engine
// reads from GGUF, the tensors in the types llama-quantize's recipes choose, quantized by ggml's
// reference quantizers (quantize_row in moe/gguf.h), so that the tensors are the bytes
// llama-quantize writes from the same values.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "moe/gguf.h"

namespace moe {

// llama.cpp's file types (llama_ftype) that can be written: a default tensor type and a recipe.
enum class GgufFileType { F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, MXFP4_MOE };

struct GgufFileTypeInfo {
  GgufFileType type;
  const char* name;       // as llama-quantize names it
  uint32_t llama_ftype;   // general.file_type
  GgmlType default_type;  // of the weight matrices the recipe does not single out
  const char* help;
};
const std::vector<GgufFileTypeInfo>& gguf_file_types();
const GgufFileTypeInfo& gguf_file_type_info(GgufFileType t);
// By name, case-insensitive ("Q4_K_M", "q8_0", "MXFP4" for MXFP4_MOE); unknown names throw
// moe::Error listing the known ones.
GgufFileType parse_gguf_file_type(const std::string& name);

// One tensor as the recipe sees it: its GGUF name, ne, and the type it has in the source (what it
// keeps when it is not to be quantized).
struct GgufTensorDesc {
  std::string name;
  std::vector<int64_t> ne;
  GgmlType type = GgmlType::F32;
};

// llama.cpp's choice of type for every tensor (llama-quant.cpp's llama_tensor_get_type, no
// imatrix, no overrides): weight matrices (2-D or 3-D "*weight" tensors, counting dimensions as
// ggml_n_dims does ([D, 1] is 1-D); not norms, not the routers' ffn_gate_inp) get the file type's
// default, except for the mixes' rules (Q4_K_M:
// output.weight Q6_K; attn_v and ffn_down Q6_K in the layers of use_more_bits; attn_output Q5_K,
// attn_k and attn_v Q8_0 when the model has exactly 8 experts; MXFP4_MOE: expert tensors
// (ne[2] > 1) MXFP4, the other matrices Q8_0); a row length that is not a multiple of the chosen
// type's block falls back as llama.cpp falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then
// F16), each such fallback added to `notes` naming the tensor. n_expert: {arch}.expert_count;
// n_layer: {arch}.block_count.
std::vector<GgmlType> gguf_recipe(const std::vector<GgufTensorDesc>& tensors, GgufFileType ft,
                                  int64_t n_expert, int64_t n_layer,
                                  std::vector<std::string>* notes = nullptr);

struct GgufWriteReport {
  std::string architecture;
  int64_t tensors = 0;
  std::map<std::string, int64_t> types;  // tensors per ggml type name
  uint64_t bytes = 0;                    // of the file
  std::vector<std::string> notes;        // fallbacks, requantized tensors
  std::string str() const;               // "27 tensors (Q4_K 8, ...), 3.2 MiB"
};

// Writes `out` (a .gguf file, atomically: a temporary file renamed once complete; never the
// input) from the model at `model`: a GGUF file (requantizing: its metadata and tensors as
// llama-quantize keeps them, the tensors converted by the recipe, through float32, or copied when
// the type stays), or a folder load_model reads (a HuggingFace checkpoint or one of this
// engine's: the model in float32 memory, its config as the architecture's metadata, its
// parameters under llama.cpp's names and layouts, its tokenizer.json as tokenizer.ggml.*).
// `progress(name, done, total)` follows the tensors. Models llama.cpp's architectures cannot
// express (docs/gguf.md) are refused by name.
GgufWriteReport write_gguf_model(
    const std::string& model, const std::string& out, GgufFileType ft,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress = {});

}  // namespace moe
