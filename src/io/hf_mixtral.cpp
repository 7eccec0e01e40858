// Mixtral's checkpoint layout (transformers' MixtralForCausalLM): names, shapes, config fields.
#include <cstring>
#include <nlohmann/json.hpp>

#include "moe/hf.h"
#include "moe/json_read.h"

namespace moe {

bool is_mixtral(const ModelConfig& c) {
  const MoeConfig& m = c.moe;
  return c.moe_every == 1 && c.first_dense == 0 && c.dense_layers.empty() && !c.uses_variants() &&
         m.routed_scaling_factor == 1.0 && m.router == RouterKind::topk && m.renormalize &&
         m.act == ExpertAct::swiglu && !m.expert_bias && !m.router_bias && m.n_shared == 0 &&
         m.jitter_eps == 0 && m.explore_prob == 0 && c.mtp_depth == 0;
}

nlohmann::json mixtral_config(const ModelConfig& c) {
  MOE_CHECK(is_mixtral(c), "hf", "the model is not a Mixtral ({})", c.moe.summary());
  return {{"architectures", {"MixtralForCausalLM"}},
          {"model_type", "mixtral"},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.d_model},
          {"intermediate_size", c.moe.d_ffn},
          {"num_hidden_layers", c.n_layers},
          {"num_attention_heads", c.n_heads},
          {"num_key_value_heads", c.n_kv_heads},
          {"head_dim", c.head_size()},
          {"max_position_embeddings", c.max_seq_len},
          {"rms_norm_eps", c.norm_eps},
          {"rope_theta", c.rope_theta},
          {"num_local_experts", c.moe.n_experts},
          {"num_experts_per_tok", c.moe.top_k},
          // transformers' balancing loss concatenates the layers' tokens (a mean over layers where
          // this engine sums them) and sums over the K slots (K times this engine's value), so
          // the coefficient is converted as alpha * L / K.
          {"router_aux_loss_coef", c.joint_aux_loss_coef > 0
                                       ? c.joint_aux_loss_coef
                                       : c.moe.aux_loss_coef * static_cast<double>(c.n_layers) /
                                             static_cast<double>(c.moe.top_k)},
          {"router_jitter_noise", 0.0},
          {"output_router_logits", false},
          {"tie_word_embeddings", c.tie_embeddings},
          {"hidden_act", "silu"},
          {"sliding_window", nullptr},
          {"attention_dropout", 0.0},
          {"torch_dtype", "float32"}};
}

ModelConfig config_from_mixtral(const nlohmann::json& j) {
  try {
    MOE_CHECK(j.value("model_type", std::string()) == "mixtral", "hf",
              "model_type is '{}', not mixtral", j.value("model_type", std::string()));
    ModelConfig c;
    c.vocab_size = json_at<int64_t>(j, "vocab_size", "hf");
    c.d_model = json_at<int64_t>(j, "hidden_size", "hf");
    c.n_layers = json_at<int64_t>(j, "num_hidden_layers", "hf");
    c.n_heads = json_at<int64_t>(j, "num_attention_heads", "hf");
    c.n_kv_heads = json_value(j, "num_key_value_heads", c.n_heads, "hf");
    if (j.contains("head_dim") && !j["head_dim"].is_null())
      c.head_dim = json_at<int64_t>(j, "head_dim", "hf");
    c.max_seq_len = json_value(j, "max_position_embeddings", int64_t{4096}, "hf");
    c.norm_eps = json_value(j, "rms_norm_eps", 1e-5, "hf");
    if (j.contains("rope_parameters") && j["rope_parameters"].contains("rope_theta")) {
      c.rope_theta = json_at<double>(j["rope_parameters"], "rope_theta", "hf");
    } else {
      c.rope_theta = json_value(j, "rope_theta", 1e6, "hf");
    }
    c.tie_embeddings = json_value(j, "tie_word_embeddings", false, "hf");
    c.moe.d_model = c.d_model;
    c.moe.d_ffn = json_at<int64_t>(j, "intermediate_size", "hf");
    c.moe.n_experts = json_at<int64_t>(j, "num_local_experts", "hf");
    c.moe.top_k = json_at<int64_t>(j, "num_experts_per_tok", "hf");
    // transformers' balancing loss, over all layers together.
    c.moe.aux_loss_coef = 0;
    c.joint_aux_loss_coef = json_value(j, "router_aux_loss_coef", 0.0, "hf");
    c.moe.z_loss_coef = 0;
    c.d_ffn = c.moe.d_ffn;
    c.transformers_loss = true;
    // Mistral's sliding window: each position attends to the last sliding_window positions.
    if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
        j["sliding_window"].get<int64_t>() < c.max_seq_len)
      c.sliding_window = j["sliding_window"].get<int64_t>();
    c.validate();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw_error("hf", fmt::format("bad Mixtral config.json: {}", e.what()));
  }
}

namespace {

// Our name -> Mixtral's, for everything but the fused expert tensors.
std::string mixtral_name(const std::string& ours) {
  if (ours == "embed.weight") return "model.embed_tokens.weight";
  if (ours == "norm.weight") return "model.norm.weight";
  if (ours == "lm_head.weight") return ours;
  // layers.<i>.<rest>
  const size_t dot = ours.find('.', 7);
  const std::string prefix = "model." + ours.substr(0, dot + 1);
  const std::string rest = ours.substr(dot + 1);
  if (rest == "attn_norm.weight") return prefix + "input_layernorm.weight";
  if (rest == "ffn_norm.weight") return prefix + "post_attention_layernorm.weight";
  if (rest == "attn.wq") return prefix + "self_attn.q_proj.weight";
  if (rest == "attn.wk") return prefix + "self_attn.k_proj.weight";
  if (rest == "attn.wv") return prefix + "self_attn.v_proj.weight";
  if (rest == "attn.wo") return prefix + "self_attn.o_proj.weight";
  if (rest == "moe.router.weight") return prefix + "block_sparse_moe.gate.weight";
  return "";
}

// Mixtral's per-expert names: w1 = gate, w3 = up, w2 = down.
const char* expert_suffix(const std::string& rest) {
  if (rest == "moe.experts.w_gate") return "w1";
  if (rest == "moe.experts.w_up") return "w3";
  if (rest == "moe.experts.w_down") return "w2";
  return nullptr;
}

template <class Fn>
void for_each_mapping(Model& model, Fn&& fn) {
  for (NamedParam& p : model.params()) {
    const std::string name = mixtral_name(p.name);
    if (!name.empty()) {
      fn(name, p.value, int64_t{-1});
      continue;
    }
    const size_t dot = p.name.find('.', 7);
    const char* w = expert_suffix(p.name.substr(dot + 1));
    MOE_CHECK(w != nullptr, "hf", "{} has no Mixtral name", p.name);
    const std::string prefix = "model." + p.name.substr(0, dot + 1) + "block_sparse_moe.experts.";
    // A rank's share of the experts (expert parallelism) starts at p.first_expert.
    for (int64_t e = 0; e < p.value.size(0); ++e)
      fn(prefix + std::to_string(p.first_expert + e) + "." + w + ".weight", p.value, e);
  }
}

}  // namespace

std::vector<std::pair<std::string, Shape>> mixtral_entries(const std::string& name,
                                                           const Shape& shape) {
  if (const std::string m = mixtral_name(name); !m.empty()) return {{m, shape}};
  const size_t dot = name.find('.', 7);
  const char* w = expert_suffix(name.substr(dot + 1));
  MOE_CHECK(w != nullptr, "hf", "{} has no Mixtral name", name);
  const std::string prefix = "model." + name.substr(0, dot + 1) + "block_sparse_moe.experts.";
  const Shape one(shape.begin() + 1, shape.end());
  std::vector<std::pair<std::string, Shape>> out;
  for (int64_t e = 0; e < shape[0]; ++e)
    out.emplace_back(prefix + std::to_string(e) + "." + w + ".weight", one);
  return out;
}

std::vector<std::pair<std::string, Tensor>> mixtral_tensors(Model& model) {
  MOE_CHECK(is_mixtral(model.config()), "hf", "the model is not a Mixtral");
  std::vector<std::pair<std::string, Tensor>> out;
  for_each_mapping(model, [&](const std::string& name, Tensor& t, int64_t e) {
    if (e < 0) {
      out.emplace_back(name, t);
    } else {
      const Shape s(t.shape().begin() + 1, t.shape().end());
      const int64_t n = shape_numel(s);
      out.emplace_back(name, Tensor::view(static_cast<char*>(t.raw()) +
                                              static_cast<size_t>(e * n) * dtype_size(t.dtype()),
                                          s, t.dtype()));
    }
  });
  return out;
}

void load_mixtral_tensors(Model& model, const SafetensorsFile& file) {
  MOE_CHECK(is_mixtral(model.config()), "hf", "the model is not a Mixtral");
  for (auto& [name, dst] : mixtral_tensors(model)) {
    const Tensor& src = file.at(name);
    const Tensor f = src.dtype() == dst.dtype() ? src : src.to(dst.dtype());
    f.expect("hf", name.c_str(), dst.shape(), dst.dtype());
    std::memcpy(dst.raw(), f.raw(), f.nbytes());
    file.drop(name);
  }
}

}  // namespace moe
