// moe/gguf_model.h: llama.cpp's model files (GGUF) as models of this engine: the architecture's
// metadata mapped onto ModelConfig, and the file's tensors, under their GGUF names, given to the
// model's parameters, either as stored (views of the mapping; quantized blocks are computed from
// as they are) or converted to float32 (what training needs).
#pragma once

#include <string>
#include <vector>

#include "moe/gguf.h"
#include "moe/model.h"

namespace moe {

// The GGUF architectures (general.architecture) this engine runs.
std::vector<std::string> gguf_architectures();

// The model config of a GGUF file's metadata ({arch}.block_count, embedding_length, attention.*,
// expert_*, rope.freq_base, ...). llama.cpp's graphs fix what the file does not say: Qwen3-MoE
// renormalizes its top-k weights, Qwen2-MoE and OLMoE do not, Mixtral (arch `llama` with experts)
// does. Mixtral's converter permutes the rows of attn_q and attn_k so that rotating adjacent
// pairs gives HuggingFace's rotation of the two halves: the config rotates adjacent pairs
// (rope_interleave), which computes the same from the rows as stored. An architecture or an
// option this engine does not run is refused by name.
ModelConfig config_from_gguf(const GgufFile& f);

// Fills every parameter of `model` (made from config_from_gguf(f)) from the file: the embedding,
// output head, attention and FFN matrices and, when the model was made without routed experts,
// its experts (an ExpertSource of views) stay as stored with `stored`; norms, biases and routers
// are converted to float32. Without `stored` every tensor is converted to the model's float32
// parameters. Every tensor must be there with its shape. Without `experts` the routed experts
// are left to the source the model already has (an ExpertCache: offloading).
void load_gguf_weights(Model& model, const GgufFile& f, bool stored, bool experts = true);

// The GGUF tensor name of the model parameter `ours` (params()' names, docs/model.md):
// "layers.3.attn.wq" -> "blk.3.attn_q.weight", "layers.0.moe.experts.w_gate" ->
// "blk.0.ffn_gate_exps.weight", ...; empty for a parameter llama.cpp's files have no name for.
// `arch` (general.architecture) names the few tensors an architecture's converter names its own
// way (gpt-oss's FFN norm is post_attention_norm).
std::string gguf_tensor_name(const std::string& ours, const std::string& arch = "");

}  // namespace moe
