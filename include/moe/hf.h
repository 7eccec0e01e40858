// moe/hf.h: the HuggingFace checkpoint layout for the architectures the project's model shares:
// config.json fields and tensor names of Mixtral (MixtralForCausalLM), so that a model trained
// here loads in transformers and a Mixtral checkpoint loads here.
#pragma once

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
// Fills the model from Mixtral-named tensors; every tensor must be there with its shape.
void load_mixtral_tensors(Model& model, const SafetensorsFile& file);

}  // namespace moe
