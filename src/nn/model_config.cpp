// The model's configuration (see moe/model.h): validation, JSON, and parameter counts computed
// from the config alone.
#include <algorithm>
#include <array>
#include <cmath>
#include <nlohmann/json.hpp>

#include "moe/json_read.h"
#include "moe/model.h"

namespace moe {

// ---------------------------------------------------------------------------------------------
// Config

void ModelConfig::validate() const {
  const char* w = "model.config";
  MOE_CHECK(vocab_size >= 2, w, "vocab_size must be >= 2, got {}", vocab_size);
  MOE_CHECK(d_model >= 1, w, "d_model must be >= 1, got {}", d_model);
  MOE_CHECK(n_layers >= 1, w, "n_layers must be >= 1, got {}", n_layers);
  MOE_CHECK(n_heads >= 1, w, "n_heads must be >= 1, got {}", n_heads);
  MOE_CHECK(n_kv_heads >= 1 && n_heads % n_kv_heads == 0, w,
            "n_kv_heads must be >= 1 and divide n_heads = {}, got {}", n_heads, n_kv_heads);
  MOE_CHECK(head_dim >= 0, w, "head_dim must be >= 0 (0: d_model / n_heads), got {}", head_dim);
  MOE_CHECK(head_dim > 0 || d_model % n_heads == 0, w,
            "d_model = {} is not divisible by n_heads = {} (set head_dim)", d_model, n_heads);
  MOE_CHECK(rope_dim() % 2 == 0, w, "the rotated width must be even for rotary embeddings, got {}",
            rope_dim());
  MOE_CHECK(std::isfinite(clip_qkv) && clip_qkv >= 0, w, "clip_qkv must be >= 0, got {}", clip_qkv);
  MOE_CHECK(sliding_window >= 0, w, "sliding_window must be >= 0, got {}", sliding_window);
  MOE_CHECK(window_layers.empty() || sliding_window > 0, w,
            "window_layers needs a sliding_window > 0");
  for (size_t i = 0; i < window_layers.size(); ++i)
    MOE_CHECK(window_layers[i] >= 0 && window_layers[i] < n_layers, w,
              "window_layers[{}] = {} is not a layer index in [0, {})", i, window_layers[i],
              n_layers);
  MOE_CHECK(q_lora_rank >= 0 && kv_lora_rank >= 0, w,
            "q_lora_rank and kv_lora_rank must be >= 0, got {} and {}", q_lora_rank, kv_lora_rank);
  if (mla()) {
    MOE_CHECK(qk_nope_dim >= 0 && qk_rope_dim >= 2 && v_head_dim >= 1, w,
              "latent attention needs qk_nope_dim >= 0, qk_rope_dim >= 2 and v_head_dim >= 1, got "
              "{}, {}, {}",
              qk_nope_dim, qk_rope_dim, v_head_dim);
    MOE_CHECK(!qkv_bias && qk_norm == QkNorm::none && clip_qkv == 0 && !attn_sinks && !o_bias, w,
              "latent attention takes no qkv_bias, qk_norm, clip_qkv, attn_sinks or o_bias");
  } else {
    MOE_CHECK(q_lora_rank == 0, w, "q_lora_rank needs latent attention (kv_lora_rank > 0)");
  }
  for (size_t i = 0; i < dense_layers.size(); ++i)
    MOE_CHECK(dense_layers[i] >= 0 && dense_layers[i] < n_layers, w,
              "dense_layers[{}] = {} is not a layer index in [0, {})", i, dense_layers[i],
              n_layers);
  MOE_CHECK(max_seq_len >= 1, w, "max_seq_len must be >= 1, got {}", max_seq_len);
  MOE_CHECK(std::isfinite(rope_theta) && rope_theta > 0, w, "rope_theta must be > 0, got {}",
            rope_theta);
  {
    const RopeScaling& y = rope_scaling;
    MOE_CHECK(std::isfinite(y.factor) && y.factor >= 1, w,
              "rope_scaling.factor must be >= 1, got {}", y.factor);
    MOE_CHECK(y.original_max >= 0, w, "rope_scaling.original_max must be >= 0, got {}",
              y.original_max);
    MOE_CHECK(std::isfinite(y.beta_fast) && std::isfinite(y.beta_slow) && y.beta_fast > 0 &&
                  y.beta_slow > 0,
              w, "rope_scaling's beta_fast and beta_slow must be > 0, got {} and {}", y.beta_fast,
              y.beta_slow);
    MOE_CHECK(std::isfinite(y.attention_factor) && y.attention_factor >= 0, w,
              "rope_scaling.attention_factor must be >= 0, got {}", y.attention_factor);
  }
  MOE_CHECK(std::isfinite(attn_scale_mult) && attn_scale_mult > 0, w,
            "attn_scale_mult must be > 0, got {}", attn_scale_mult);
  MOE_CHECK(std::isfinite(norm_eps) && norm_eps > 0, w, "norm_eps must be > 0, got {}", norm_eps);
  MOE_CHECK(moe_every >= 0 && first_dense >= 0, w,
            "moe_every and first_dense must be >= 0, got {} and {}", moe_every, first_dense);
  MOE_CHECK(std::isfinite(init_std) && init_std > 0, w, "init_std must be > 0, got {}", init_std);
  MOE_CHECK(std::isfinite(joint_aux_loss_coef) && joint_aux_loss_coef >= 0, w,
            "joint_aux_loss_coef must be >= 0, got {}", joint_aux_loss_coef);
  MOE_CHECK(joint_aux_loss_coef == 0 || (moe.router == RouterKind::topk && moe.aux_loss_coef == 0),
            w, "joint_aux_loss_coef needs the topk router and moe.aux_loss_coef = 0");
  MOE_CHECK(mtp_depth >= 0 && mtp_depth <= 16, w, "mtp_depth must be in [0, 16], got {}",
            mtp_depth);
  MOE_CHECK(std::isfinite(mtp_weight) && mtp_weight >= 0, w, "mtp_weight must be >= 0, got {}",
            mtp_weight);
  MOE_CHECK(mtp_depth == 0 || mtp_depth + 2 <= max_seq_len, w,
            "mtp_depth = {} needs sequences of at least {} tokens, but max_seq_len = {}", mtp_depth,
            mtp_depth + 2, max_seq_len);
  MOE_CHECK(mtp_depth == 0 || joint_aux_loss_coef == 0, w,
            "mtp_depth = {} with joint_aux_loss_coef = {}: the joint balancing loss covers the "
            "main layers only; give the MoE layers their own aux_loss_coef",
            mtp_depth, joint_aux_loss_coef);
  bool any_dense = false, any_moe = false;
  for (int64_t i = 0; i < n_layers + mtp_depth; ++i) (is_moe_layer(i) ? any_moe : any_dense) = true;
  MOE_CHECK(!any_dense || d_ffn >= 1, w, "d_ffn must be >= 1 for the dense layers, got {}", d_ffn);
  if (any_moe) {
    MOE_CHECK(moe.d_model == d_model, w, "moe.d_model = {} must equal d_model = {}", moe.d_model,
              d_model);
    moe.validate();
  }
}

bool ModelConfig::is_moe_layer(int64_t i) const {
  if (std::find(dense_layers.begin(), dense_layers.end(), i) != dense_layers.end()) return false;
  return moe_every > 0 && i >= first_dense && (i + 1) % moe_every == 0;
}

std::vector<double> ModelConfig::rope_inv_freq() const {
  const int64_t rd = rope_dim(), half = rd / 2;
  const double base = rope_theta, d = static_cast<double>(rd);
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    f[static_cast<size_t>(i)] = std::pow(base, -2.0 * static_cast<double>(i) / d);
  if (!rope_scaling.yarn()) return f;
  const RopeScaling& y = rope_scaling;
  const double ctx = static_cast<double>(y.original_max > 0 ? y.original_max : max_seq_len);
  // The pair index at which a frequency turns `turns` times over the original context.
  const auto pair_of = [&](double turns) {
    return d * std::log(ctx / (turns * 2 * M_PI)) / (2 * std::log(base));
  };
  double lo = pair_of(y.beta_fast), hi = pair_of(y.beta_slow);
  if (y.truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  lo = std::max(lo, 0.0);
  hi = std::min(hi, d - 1);
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    // ramp 0 below lo (fast pairs keep their frequency), 1 above hi (slow pairs interpolate).
    const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
    double& v = f[static_cast<size_t>(i)];
    v = v / y.factor * ramp + v * (1 - ramp);
  }
  return f;
}

double ModelConfig::rope_attention_factor() const {
  if (!rope_scaling.yarn()) return 1.0;
  if (rope_scaling.attention_factor > 0) return rope_scaling.attention_factor;
  return rope_scaling.factor <= 1 ? 1.0 : 0.1 * std::log(rope_scaling.factor) + 1.0;
}

int64_t ModelConfig::window_of(int64_t i) const {
  if (window_layers.empty()) return sliding_window;
  return std::find(window_layers.begin(), window_layers.end(), i) != window_layers.end()
             ? sliding_window
             : 0;
}

bool ModelConfig::uses_variants() const {
  return !(norm == NormKind::rms && !qkv_bias && qk_norm == QkNorm::none && clip_qkv == 0 &&
           sliding_window == 0 && !attn_sinks && !o_bias && !mla() && !rope_interleave);
}

NLOHMANN_JSON_SERIALIZE_ENUM(NormKind, {{NormKind::rms, "rms"}, {NormKind::layer, "layer"}})
NLOHMANN_JSON_SERIALIZE_ENUM(QkNorm, {{QkNorm::none, "none"},
                                      {QkNorm::head, "head"},
                                      {QkNorm::full, "full"}})

void to_json(nlohmann::json& j, const ModelConfig& c) {
  j = {{"vocab_size", c.vocab_size},
       {"d_model", c.d_model},
       {"n_layers", c.n_layers},
       {"n_heads", c.n_heads},
       {"n_kv_heads", c.n_kv_heads},
       {"head_dim", c.head_dim},
       {"d_ffn", c.d_ffn},
       {"max_seq_len", c.max_seq_len},
       {"rope_theta", c.rope_theta},
       {"norm_eps", c.norm_eps},
       {"tie_embeddings", c.tie_embeddings},
       {"moe_every", c.moe_every},
       {"first_dense", c.first_dense},
       {"init_std", c.init_std},
       {"moe", c.moe}};
  // The architecture variants are written only when used, so the project's configs stay short.
  const ModelConfig d;
  if (!c.dense_layers.empty()) j["dense_layers"] = c.dense_layers;
  if (c.norm != d.norm) j["norm"] = c.norm;
  if (c.qkv_bias) j["qkv_bias"] = true;
  if (c.qk_norm != d.qk_norm) j["qk_norm"] = c.qk_norm;
  if (c.clip_qkv != 0) j["clip_qkv"] = c.clip_qkv;
  if (c.sliding_window != 0) j["sliding_window"] = c.sliding_window;
  if (!c.window_layers.empty()) j["window_layers"] = c.window_layers;
  if (c.attn_sinks) j["attn_sinks"] = true;
  if (c.o_bias) j["o_bias"] = true;
  if (c.mla()) {
    j["q_lora_rank"] = c.q_lora_rank;
    j["kv_lora_rank"] = c.kv_lora_rank;
    j["qk_nope_dim"] = c.qk_nope_dim;
    j["qk_rope_dim"] = c.qk_rope_dim;
    j["v_head_dim"] = c.v_head_dim;
  }
  if (c.rope_interleave) j["rope_interleave"] = true;
  if (c.rope_scaling.yarn())
    j["rope_scaling"] = {{"type", "yarn"},
                         {"factor", c.rope_scaling.factor},
                         {"original_max", c.rope_scaling.original_max},
                         {"beta_fast", c.rope_scaling.beta_fast},
                         {"beta_slow", c.rope_scaling.beta_slow},
                         {"attention_factor", c.rope_scaling.attention_factor},
                         {"truncate", c.rope_scaling.truncate}};
  if (c.attn_scale_mult != 1.0) j["attn_scale_mult"] = c.attn_scale_mult;
  if (c.joint_aux_loss_coef != 0) j["joint_aux_loss_coef"] = c.joint_aux_loss_coef;
  if (c.transformers_loss) j["transformers_loss"] = true;
  if (c.mtp_depth != 0) {
    j["mtp_depth"] = c.mtp_depth;
    j["mtp_weight"] = c.mtp_weight;
  }
}

void from_json(const nlohmann::json& j, ModelConfig& c) {
  MOE_CHECK(j.is_object(), "model.config", "expected a JSON object, got {}", j.type_name());
  static const char* const keys[] = {"vocab_size",
                                     "d_model",
                                     "n_layers",
                                     "n_heads",
                                     "n_kv_heads",
                                     "head_dim",
                                     "d_ffn",
                                     "max_seq_len",
                                     "rope_theta",
                                     "norm_eps",
                                     "tie_embeddings",
                                     "moe_every",
                                     "first_dense",
                                     "init_std",
                                     "moe",
                                     "dense_layers",
                                     "norm",
                                     "qkv_bias",
                                     "qk_norm",
                                     "clip_qkv",
                                     "sliding_window",
                                     "window_layers",
                                     "attn_sinks",
                                     "o_bias",
                                     "q_lora_rank",
                                     "kv_lora_rank",
                                     "qk_nope_dim",
                                     "qk_rope_dim",
                                     "v_head_dim",
                                     "rope_interleave",
                                     "rope_scaling",
                                     "attn_scale_mult",
                                     "joint_aux_loss_coef",
                                     "transformers_loss",
                                     "mtp_depth",
                                     "mtp_weight"};
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    MOE_CHECK(std::find_if(std::begin(keys), std::end(keys),
                           [&](const char* k) { return key == k; }) != std::end(keys),
              "model.config", "unknown key '{}'", key);
  }
  try {
    c = ModelConfig{};
    json_into(j, "vocab_size", c.vocab_size, "model.config");
    json_into(j, "d_model", c.d_model, "model.config");
    json_into(j, "n_layers", c.n_layers, "model.config");
    json_into(j, "n_heads", c.n_heads, "model.config");
    c.n_kv_heads = json_value(j, "n_kv_heads", c.n_heads, "model.config");
    json_into(j, "head_dim", c.head_dim, "model.config");
    json_into(j, "d_ffn", c.d_ffn, "model.config");
    json_into(j, "max_seq_len", c.max_seq_len, "model.config");
    json_into(j, "rope_theta", c.rope_theta, "model.config");
    json_into(j, "norm_eps", c.norm_eps, "model.config");
    json_into(j, "tie_embeddings", c.tie_embeddings, "model.config");
    json_into(j, "moe_every", c.moe_every, "model.config");
    json_into(j, "first_dense", c.first_dense, "model.config");
    json_into(j, "init_std", c.init_std, "model.config");
    if (j.contains("moe")) c.moe = j.at("moe").get<MoeConfig>();
    json_into(j, "dense_layers", c.dense_layers, "model.config");
    if (j.contains("norm")) {
      const auto n = json_at<std::string>(j, "norm", "model.config");
      MOE_CHECK(n == "rms" || n == "layer", "model.config", "norm must be rms or layer, got '{}'",
                n);
      c.norm = j.at("norm").get<NormKind>();
    }
    if (j.contains("qk_norm")) {
      const auto n = json_at<std::string>(j, "qk_norm", "model.config");
      MOE_CHECK(n == "none" || n == "head" || n == "full", "model.config",
                "qk_norm must be none, head or full, got '{}'", n);
      c.qk_norm = j.at("qk_norm").get<QkNorm>();
    }
    json_into(j, "qkv_bias", c.qkv_bias, "model.config");
    json_into(j, "clip_qkv", c.clip_qkv, "model.config");
    json_into(j, "sliding_window", c.sliding_window, "model.config");
    json_into(j, "window_layers", c.window_layers, "model.config");
    json_into(j, "attn_sinks", c.attn_sinks, "model.config");
    json_into(j, "o_bias", c.o_bias, "model.config");
    json_into(j, "q_lora_rank", c.q_lora_rank, "model.config");
    json_into(j, "kv_lora_rank", c.kv_lora_rank, "model.config");
    json_into(j, "qk_nope_dim", c.qk_nope_dim, "model.config");
    json_into(j, "qk_rope_dim", c.qk_rope_dim, "model.config");
    json_into(j, "v_head_dim", c.v_head_dim, "model.config");
    json_into(j, "rope_interleave", c.rope_interleave, "model.config");
    json_into(j, "attn_scale_mult", c.attn_scale_mult, "model.config");
    if (j.contains("rope_scaling")) {
      const nlohmann::json& y = j.at("rope_scaling");
      MOE_CHECK(y.is_object() && y.value("type", std::string()) == "yarn", "model.config",
                "rope_scaling must be an object of type yarn");
      for (const auto& item : y.items())
        MOE_CHECK(item.key() == "type" || item.key() == "factor" || item.key() == "original_max" ||
                      item.key() == "beta_fast" || item.key() == "beta_slow" ||
                      item.key() == "attention_factor" || item.key() == "truncate",
                  "model.config", "unknown key 'rope_scaling.{}'", item.key());
      RopeScaling& r = c.rope_scaling;
      json_into(y, "factor", r.factor, "model.config");
      json_into(y, "original_max", r.original_max, "model.config");
      json_into(y, "beta_fast", r.beta_fast, "model.config");
      json_into(y, "beta_slow", r.beta_slow, "model.config");
      json_into(y, "attention_factor", r.attention_factor, "model.config");
      json_into(y, "truncate", r.truncate, "model.config");
    }
    json_into(j, "joint_aux_loss_coef", c.joint_aux_loss_coef, "model.config");
    json_into(j, "transformers_loss", c.transformers_loss, "model.config");
    json_into(j, "mtp_depth", c.mtp_depth, "model.config");
    json_into(j, "mtp_weight", c.mtp_weight, "model.config");
  } catch (const nlohmann::json::exception& e) {
    throw_error("model.config", fmt::format("bad value: {}", e.what()));
  }
}

ParamCount count_params(const ModelConfig& c) {
  c.validate();
  ParamCount n;
  const int64_t D = c.d_model, hd = c.head_size();
  n.embedding = c.vocab_size * D * (c.tie_embeddings ? 1 : 2);
  n.norms = D * (2 * c.n_layers + 1);
  int64_t active_experts = 0;
  const MoeConfig& m = c.moe;
  const int64_t mats = gated(m.act) ? 3 : 2;
  const int64_t H = c.n_heads, KV = c.n_kv_heads;
  int64_t attention = 0;  // one layer's
  if (c.mla()) {
    const int64_t qk = c.qk_nope_dim + c.qk_rope_dim;
    attention +=
        c.q_lora_rank > 0 ? D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk : D * H * qk;
    attention += D * (c.kv_lora_rank + c.qk_rope_dim) + c.kv_lora_rank;
    attention += c.kv_lora_rank * H * (c.qk_nope_dim + c.v_head_dim) + H * c.v_head_dim * D;
  } else {
    attention += D * hd * (2 * H + 2 * KV);
    if (c.qkv_bias) attention += hd * (H + 2 * KV);
    if (c.qk_norm == QkNorm::head) attention += 2 * hd;
    if (c.qk_norm == QkNorm::full) attention += hd * (H + KV);
    if (c.attn_sinks) attention += H;
    if (c.o_bias) attention += D;
  }
  // One block's FFN: {dense, routed experts, the top_k's share, shared experts, router}.
  const auto ffn = [&](int64_t i) -> std::array<int64_t, 5> {
    if (!c.is_moe_layer(i)) return {3 * D * c.d_ffn, 0, 0, 0, 0};
    const int64_t bias = m.expert_bias ? (mats - 1) * m.d_ffn + D : 0;
    const int64_t expert = mats * D * m.d_ffn + bias;
    const int64_t sbias = m.expert_bias ? (mats - 1) * m.shared_width() + D : 0;
    return {0, m.n_experts * expert, m.top_k * expert,
            m.n_shared * (mats * D * m.shared_width() + sbias),
            make_router(m)->logit_rows() * (D + (m.router_bias ? 1 : 0)) + (m.shared_gate ? D : 0)};
  };
  for (int64_t i = 0; i < c.n_layers; ++i) {
    n.attention += attention;
    const auto f = ffn(i);
    n.dense_ffn += f[0];
    n.routed_experts += f[1];
    active_experts += f[2];
    n.shared_experts += f[3];
    n.router += f[4];
  }
  // An MTP module: enorm, hnorm, its block's two norms and final norm, W_eh [D, 2D], a block.
  for (int64_t k = 0; k < c.mtp_depth; ++k) {
    const auto f = ffn(c.n_layers + k);
    n.mtp += 5 * D + 2 * D * D + attention + f[0] + f[1] + f[3] + f[4];
  }
  const int64_t common =
      n.embedding + n.norms + n.attention + n.dense_ffn + n.shared_experts + n.router;
  n.total = common + n.routed_experts + n.mtp;
  n.active = common + active_experts;
  return n;
}

}  // namespace moe
