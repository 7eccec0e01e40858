// moe/hf.h: the HuggingFace checkpoint layout for the architectures the project's model shares:
// config.json fields and tensor names of Mixtral (MixtralForCausalLM), so that a model trained
// here loads in transformers and a Mixtral checkpoint loads here.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <utility>
#include <vector>

#include "moe/model.h"
#include "moe/safetensors.h"

namespace moe {

// True when the model is exactly a Mixtral: every layer a softmax top-k MoE with renormalized
// weights, SwiGLU experts without biases, no shared experts.
bool is_mixtral(const ModelConfig& cfg);
// transformers' MixtralConfig fields for the model (only when is_mixtral).
nlohmann::json mixtral_config(const ModelConfig& cfg);
// The model config of a Mixtral config.json (top-level rope_theta or rope_parameters).
ModelConfig config_from_mixtral(const nlohmann::json& j);

// The model's weights under Mixtral's names (one tensor per expert).
std::vector<std::pair<std::string, Tensor>> mixtral_tensors(Model& model);
// The Mixtral tensors of our parameter `name` whose whole tensor has `shape` (a routed one: one
// per expert, in order, each [F, D] or [D, F]): (name, shape), in file order.
std::vector<std::pair<std::string, Shape>> mixtral_entries(const std::string& name,
                                                           const Shape& shape);
// Fills the model from Mixtral-named tensors; every tensor must be there with its shape.
void load_mixtral_tensors(Model& model, const SafetensorsFile& file);

// ---------------------------------------------------------------------------------------------
// Any supported architecture (model_type): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
// deepseek_v3, dbrx.

std::vector<std::string> hf_model_types();
// The tensor names of routed expert e of model layer `layer` in a checkpoint of `model_type`
// that stores one tensor per expert: its gate, up and down projections.
std::vector<std::string> hf_expert_names(const std::string& model_type, int64_t layer, int64_t e);
// The model config of a config.json (both rope spellings; unsupported options refused).
ModelConfig config_from_hf(const nlohmann::json& j);

// The tensors of a HuggingFace model folder: model.safetensors, or the shards named by
// model.safetensors.index.json (read when first used; a shard name must be a plain file name in
// the folder, so an index cannot reach outside it).
class HfTensors {
 public:
  explicit HfTensors(const std::string& dir);
  bool has(const std::string& name) const;
  const Tensor& get(const std::string& name);
  // The tensor as its file stores it (the file stays mapped while this object lives).
  const StoredTensor& stored(const std::string& name);
  // A view of it in its stored dtype that keeps its file mapped (SafetensorsFile::view).
  Tensor view(const std::string& name);
  // SafetensorsFile::drop for tensor `name` (after get and a copy).
  void drop(const std::string& name);
  // SafetensorsFile::set_prefault for every shard, read already or later.
  void set_prefault(bool on);
  // Bytes of the checkpoint's weight files (model.safetensors, or every shard the index names).
  uint64_t file_bytes() const;

 private:
  std::string dir_;
  bool prefault_ = false;
  std::map<std::string, std::string> where_;  // tensor -> shard file
  SafetensorsFile& shard_of(const std::string& name);
  std::map<std::string, SafetensorsFile> shards_;
};

// Fills every parameter of `model` (made from config_from_hf) from the checkpoint's tensors
// under the architecture's names and layouts: one tensor per expert or transformers' fused
// gate_up_proj / down_proj, DBRX's fused Wqkv and [E*F, D] expert matrices, and DeepSeek-V3's
// e_score_correction_bias (the router's selection bias).
// With `stored` (a model made with routed_experts false), the weight matrices stay as the files
// store them (bf16, f16, f32), views of the mapped files the model computes from
// (Model::set_weight), and the routed experts come from an ExpertSource of such views; norms,
// biases and routers are read into float32.
void load_hf_weights(Model& model, const std::string& model_type, HfTensors& src,
                     bool stored = false);
// One layer's routed experts as stacked tensors: gate and up [E, F, D], down [E, D, F] in any
// stored type, and optionally float32 biases [E, F], [E, F], [E, D].
struct StackedExperts {
  Tensor gate, up, down, b_gate, b_up, b_down;
  std::vector<ExpertView> views() const;  // each expert's, sharing these tensors
};
// gpt-oss's routed experts of one layer (src/io/hf_gpt_oss.cpp): MXFP4 (ggml's blocks, rewritten
// from the checkpoint's _blocks and _scales) or bf16 (from the transposed bf16 layout), with
// their biases.
StackedExperts gpt_oss_experts(const ModelConfig& c, HfTensors& src, int64_t layer);

// Routed experts as views of mapped files (per MoE layer, each expert's ExpertView), any number
// of them at once: the ExpertSource of a checkpoint computed from as stored.
std::shared_ptr<ExpertSource> stored_expert_source(std::vector<std::vector<ExpertView>> layers);
// The inverse: the model's float32 tensors (or, with `grads`, their gradients) under the
// architecture's names and layouts, routed experts one tensor per expert or, with
// `fused_experts`, transformers' fused gate_up_proj / down_proj; DeepSeek-V3's selection bias
// too (not with grads). Views of the model's memory where the layouts agree, copies elsewhere.
std::vector<std::pair<std::string, Tensor>> hf_tensors(Model& model, const std::string& model_type,
                                                       bool fused_experts, bool grads = false);

// The HuggingFace checkpoint a model was loaded from, so that what is trained from it is saved
// the same way: its folder, model_type, config.json as written, and whether its routed experts
// are stored fused (transformers' gate_up_proj / down_proj) rather than one tensor per expert.
struct HfOrigin {
  std::string dir, model_type, config_text;
  bool fused_experts = false;
};
HfOrigin hf_origin(const std::string& dir);
// Writes `model` (made from origin's config) into folder `dir` (created) as a checkpoint of that
// architecture and layout, each file atomically: origin's config.json, the weights under its
// names (hf_tensors), and its tokenizer and generation files copied.
void save_hf_model(Model& model, const HfOrigin& origin, const std::string& dir);

}  // namespace moe
