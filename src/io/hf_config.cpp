// config.json of each HuggingFace MoE architecture (moe/hf.h) mapped onto ModelConfig: the
// fields each model_type names, read strictly (a field of the wrong kind is an error, not its
// default), and the options this engine does not implement refused by name.
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/hf.h"
#include "moe/json_read.h"

namespace moe {

namespace {

using nlohmann::json;

const char* const kWhere = "hf";

int64_t get_int(const json& j, const char* key) { return json_at<int64_t>(j, key, kWhere); }

// An optional field read strictly (moe/json_read.h): missing or null (transformers' "not set")
// gives the fallback, a value of the wrong kind is an error rather than the fallback.
template <class T>
T optional(const json& j, const char* key, T fallback) {
  const auto it = j.find(key);
  return it == j.end() || it->is_null() ? fallback : json_as<T>(*it, kWhere, key);
}

int64_t int_or(const json& j, const char* key, int64_t fallback) {
  return optional(j, key, fallback);
}
double num_or(const json& j, const char* key, double fallback) {
  return optional(j, key, fallback);
}
bool bool_or(const json& j, const char* key, bool fallback) { return optional(j, key, fallback); }

// YaRN's mscale (transformers' get_mscale): 0.1 m ln(factor) + 1, 1 for factor <= 1.
double yarn_mscale(double factor, double m) {
  return factor <= 1 ? 1.0 : 0.1 * m * std::log(factor) + 1.0;
}

// The rope scaling object (rope_parameters in transformers 5, rope_scaling before), or null.
const json* rope_scaling_of(const json& j) {
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!j.contains(key) || !j[key].is_object()) continue;
    const json& s = j[key];
    std::string type = "default";
    if (s.contains("rope_type") && s["rope_type"].is_string()) type = s["rope_type"];
    if (s.contains("type") && s["type"].is_string()) type = s["type"];
    MOE_CHECK(type == "default" || type == "yarn", kWhere,
              "rope scaling '{}' is not supported (default, yarn)", type);
    if (type == "yarn") return &s;
  }
  return nullptr;
}

// rope_theta from rope_parameters (transformers 5) or the top level (older files), and YaRN's
// parameters as transformers' _compute_yarn_parameters reads them; other scalings are refused
// rather than silently ignored.
void read_rope(const json& j, ModelConfig& c, double fallback) {
  const json* params = j.contains("rope_parameters") && j["rope_parameters"].is_object()
                           ? &j["rope_parameters"]
                           : nullptr;
  c.rope_theta = params && params->contains("rope_theta") ? num_or(*params, "rope_theta", fallback)
                                                          : num_or(j, "rope_theta", fallback);
  const json* y = rope_scaling_of(j);
  if (!y) return;
  RopeScaling& r = c.rope_scaling;
  r.factor = json_at<double>(*y, "factor", kWhere);
  r.original_max = int_or(*y, "original_max_position_embeddings", c.max_seq_len);
  r.beta_fast = num_or(*y, "beta_fast", 32.0);
  r.beta_slow = num_or(*y, "beta_slow", 1.0);
  r.truncate = bool_or(*y, "truncate", true);
  r.attention_factor = num_or(*y, "attention_factor", 0.0);
  const double m = num_or(*y, "mscale", 0.0), m_all = num_or(*y, "mscale_all_dim", 0.0);
  if (r.attention_factor == 0 && m != 0 && m_all != 0)
    r.attention_factor = yarn_mscale(r.factor, m) / yarn_mscale(r.factor, m_all);
}

// The fields every architecture spells the same way (Llama's names).
ModelConfig llama_like(const json& j) {
  ModelConfig c;
  c.vocab_size = get_int(j, "vocab_size");
  c.d_model = get_int(j, "hidden_size");
  c.n_layers = get_int(j, "num_hidden_layers");
  c.n_heads = get_int(j, "num_attention_heads");
  c.n_kv_heads = int_or(j, "num_key_value_heads", c.n_heads);
  c.head_dim = int_or(j, "head_dim", 0);
  c.max_seq_len = int_or(j, "max_position_embeddings", 4096);
  c.norm_eps = num_or(j, "rms_norm_eps", 1e-6);
  c.tie_embeddings = bool_or(j, "tie_word_embeddings", false);
  c.d_ffn = int_or(j, "intermediate_size", 0);
  read_rope(j, c, 10000.0);
  MOE_CHECK(j.value("hidden_act", std::string("silu")) == "silu", kWhere,
            "hidden_act '{}' is not supported (silu only)", j.value("hidden_act", std::string()));
  c.moe.d_model = c.d_model;
  c.moe.act = ExpertAct::swiglu;
  c.moe.z_loss_coef = 0;
  // transformers' balancing loss is taken over all MoE layers together.
  c.moe.aux_loss_coef = 0;
  c.joint_aux_loss_coef = num_or(j, "router_aux_loss_coef", 0.0);
  return c;
}

// Qwen2-MoE, Qwen3-MoE, OLMoE: softmax top-k, optional renormalization, every
// decoder_sparse_step-th layer MoE except mlp_only_layers.
void qwen_like_moe(const json& j, ModelConfig& c) {
  c.moe.n_experts =
      j.contains("num_experts") ? get_int(j, "num_experts") : get_int(j, "num_local_experts");
  c.moe.top_k = get_int(j, "num_experts_per_tok");
  c.moe.d_ffn = int_or(j, "moe_intermediate_size", c.d_ffn);
  c.moe.renormalize = bool_or(j, "norm_topk_prob", false);
  c.moe_every = int_or(j, "decoder_sparse_step", 1);
  if (j.contains("mlp_only_layers") && j["mlp_only_layers"].is_array())
    c.dense_layers = json_as<std::vector<int64_t>>(j["mlp_only_layers"], kWhere, "mlp_only_layers");
  MOE_CHECK(!bool_or(j, "use_sliding_window", false), kWhere,
            "Qwen's per-layer sliding window (use_sliding_window) is not supported yet");
}

ModelConfig deepseek_config(const json& j, bool v3) {
  ModelConfig c = llama_like(j);
  // With YaRN, transformers' DeepSeek attention scales its scores by mscale(factor,
  // mscale_all_dim)^2 too.
  if (const json* y = rope_scaling_of(j)) {
    const double m_all = num_or(*y, "mscale_all_dim", 0.0);
    if (m_all != 0) c.attn_scale_mult = std::pow(yarn_mscale(c.rope_scaling.factor, m_all), 2);
  }
  c.head_dim = 0;
  c.q_lora_rank = int_or(j, "q_lora_rank", 0);
  c.kv_lora_rank = get_int(j, "kv_lora_rank");
  c.qk_nope_dim = get_int(j, "qk_nope_head_dim");
  c.qk_rope_dim = get_int(j, "qk_rope_head_dim");
  c.v_head_dim = get_int(j, "v_head_dim");
  c.n_kv_heads = c.n_heads;
  // Both rotate interleaved pairs: V2 through complex multiplication, V3 when rope_interleave.
  c.rope_interleave = v3 ? bool_or(j, "rope_interleave", true) : true;
  c.joint_aux_loss_coef = 0;  // transformers' DeepSeek models add no balancing loss
  c.first_dense = int_or(j, "first_k_dense_replace", 0);
  c.moe_every = int_or(j, "moe_layer_freq", 1);
  MoeConfig& m = c.moe;
  m.n_experts = get_int(j, "n_routed_experts");
  m.top_k = get_int(j, "num_experts_per_tok");
  m.d_ffn = get_int(j, "moe_intermediate_size");
  m.renormalize = bool_or(j, "norm_topk_prob", false);
  m.routed_scaling_factor = num_or(j, "routed_scaling_factor", 1.0);
  // The shared experts are one MLP of width n_shared * moe_intermediate_size.
  const int64_t shared = int_or(j, "n_shared_experts", 0);
  if (shared > 0) {
    m.n_shared = 1;
    m.d_shared_ffn = shared * m.d_ffn;
  }
  const std::string method = j.value("topk_method", std::string(v3 ? "noaux_tc" : "greedy"));
  if (v3) {
    MOE_CHECK(method == "noaux_tc", kWhere, "topk_method '{}' is not supported for deepseek_v3",
              method);
    m.router = RouterKind::deepseek;
    m.n_group = int_or(j, "n_group", 1);
    m.topk_group = int_or(j, "topk_group", 1);
    // transformers keeps e_score_correction_bias fixed (a buffer); so does fine-tuning here.
    m.bias_update_rate = 0;
  } else {
    MOE_CHECK(method == "greedy", kWhere,
              "topk_method '{}' is not supported yet for deepseek_v2 (greedy only)", method);
    m.router = RouterKind::topk;
  }
  return c;
}

// gpt-oss (transformers' GptOssConfig): q/k/v and output biases, a sink logit per head, the
// sliding window on the layers layer_types names "sliding_attention", a router with a bias
// whose top-k logits go through a softmax (the same weights as a softmax over all, renormalized
// over the top k), experts with biases and the clamped SwiGLU.
ModelConfig gpt_oss_config(const json& j) {
  ModelConfig c = llama_like(j);
  c.qkv_bias = c.o_bias = bool_or(j, "attention_bias", true);
  c.attn_sinks = true;
  c.sliding_window = int_or(j, "sliding_window", 0);
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    const auto types = json_as<std::vector<std::string>>(j["layer_types"], kWhere, "layer_types");
    MOE_CHECK(static_cast<int64_t>(types.size()) == c.n_layers, kWhere,
              "layer_types has {} entries for {} layers", types.size(), c.n_layers);
    for (size_t i = 0; i < types.size(); ++i) {
      MOE_CHECK(types[i] == "sliding_attention" || types[i] == "full_attention", kWhere,
                "layer_types[{}] = '{}' (sliding_attention or full_attention)", i, types[i]);
      if (types[i] == "sliding_attention") c.window_layers.push_back(static_cast<int64_t>(i));
    }
    if (c.window_layers.empty()) c.sliding_window = 0;
  }
  MoeConfig& m = c.moe;
  m.n_experts = get_int(j, "num_local_experts");
  m.top_k = j.contains("num_experts_per_tok") ? get_int(j, "num_experts_per_tok")
                                              : get_int(j, "experts_per_token");
  m.d_ffn = get_int(j, "intermediate_size");
  m.act = ExpertAct::swiglu_oai;
  m.swiglu_limit = num_or(j, "swiglu_limit", 7.0);
  m.expert_bias = true;
  m.router_bias = true;
  m.renormalize = true;
  // transformers adds the balancing loss only when the model outputs its router logits.
  if (!bool_or(j, "output_router_logits", false)) c.joint_aux_loss_coef = 0;
  return c;
}

ModelConfig dbrx_config(const json& j) {
  MOE_CHECK(j.contains("attn_config") && j.contains("ffn_config"), kWhere,
            "a dbrx config.json needs attn_config and ffn_config");
  const json& a = j["attn_config"];
  const json& f = j["ffn_config"];
  ModelConfig c;
  c.vocab_size = get_int(j, "vocab_size");
  c.d_model = get_int(j, "d_model");
  c.n_layers = get_int(j, "n_layers");
  c.n_heads = get_int(j, "n_heads");
  c.n_kv_heads = int_or(a, "kv_n_heads", c.n_heads);
  c.max_seq_len = int_or(j, "max_seq_len", 2048);
  c.norm = NormKind::layer;
  c.norm_eps = 1e-5;
  c.clip_qkv = num_or(a, "clip_qkv", 0.0);
  c.tie_embeddings = bool_or(j, "tie_word_embeddings", false);
  read_rope(j, c, num_or(a, "rope_theta", 10000.0));
  if (!(j.contains("rope_parameters") && j["rope_parameters"].contains("rope_theta")))
    c.rope_theta = num_or(a, "rope_theta", 10000.0);
  MoeConfig& m = c.moe;
  m.d_model = c.d_model;
  m.d_ffn = get_int(f, "ffn_hidden_size");
  m.n_experts = get_int(f, "moe_num_experts");
  m.top_k = get_int(f, "moe_top_k");
  const double p = num_or(f, "moe_normalize_expert_weights", 0.0);
  MOE_CHECK(p == 0.0 || p == 1.0, kWhere,
            "moe_normalize_expert_weights = {} is not supported (1 or none)", p);
  m.renormalize = p == 1.0;
  m.z_loss_coef = 0;
  m.aux_loss_coef = 0;
  c.joint_aux_loss_coef = num_or(f, "moe_loss_weight", 0.0);
  c.d_ffn = m.d_ffn;
  return c;
}

}  // namespace

std::vector<std::string> hf_model_types() {
  return {"mixtral",     "qwen2_moe",   "qwen3_moe", "olmoe",
          "deepseek_v2", "deepseek_v3", "dbrx",      "gpt_oss"};
}

ModelConfig config_from_hf(const json& j) {
  MOE_CHECK(j.is_object(), kWhere, "config.json is not a JSON object");
  const std::string type = j.value("model_type", std::string());
  try {
    ModelConfig c;
    if (type == "mixtral") {
      c = config_from_mixtral(j);
    } else if (type == "qwen2_moe") {
      c = llama_like(j);
      qwen_like_moe(j, c);
      c.qkv_bias = bool_or(j, "qkv_bias", true);
      const int64_t shared = int_or(j, "shared_expert_intermediate_size", 0);
      if (shared > 0) {
        c.moe.n_shared = 1;
        c.moe.d_shared_ffn = shared;
        c.moe.shared_gate = true;
      }
    } else if (type == "qwen3_moe") {
      c = llama_like(j);
      qwen_like_moe(j, c);
      c.qk_norm = QkNorm::head;
      c.qkv_bias = bool_or(j, "attention_bias", false);
    } else if (type == "olmoe") {
      c = llama_like(j);
      qwen_like_moe(j, c);
      c.qk_norm = QkNorm::full;
      c.clip_qkv = num_or(j, "clip_qkv", 0.0);
      c.qkv_bias = bool_or(j, "attention_bias", false);
      c.norm_eps = num_or(j, "rms_norm_eps", 1e-5);
    } else if (type == "deepseek_v2" || type == "deepseek_v3") {
      c = deepseek_config(j, type == "deepseek_v3");
    } else if (type == "dbrx") {
      c = dbrx_config(j);
    } else if (type == "gpt_oss") {
      c = gpt_oss_config(j);
    } else {
      std::string known;
      for (const std::string& t : hf_model_types()) known += (known.empty() ? "" : ", ") + t;
      throw_error(kWhere, fmt::format("model_type '{}' is not supported ({})", type, known));
    }
    if (c.d_ffn == 0) c.d_ffn = c.moe.d_ffn;
    c.transformers_loss = true;
    c.validate();
    return c;
  } catch (const json::exception& e) {
    throw_error(kWhere, fmt::format("bad {} config.json: {}", type, e.what()));
  }
}

}  // namespace moe
