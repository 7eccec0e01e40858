// GGUF model files as models (moe/gguf_model.h): llama.cpp's metadata keys and tensor names
// (its llama-arch.cpp and convert_hf_to_gguf.py) mapped onto this engine's config and parameters.
// The config goes through the HuggingFace config.json the file's metadata stands for, so that one
// mapping (hf_config.cpp) knows each architecture's variants and refuses what is not supported.
#include "moe/gguf_model.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "moe/error.h"
#include "moe/hf.h"

namespace moe {

namespace {

using nlohmann::json;

const char* const kWhere = "gguf";

// Metadata of the file's architecture: "{arch}.{key}".
struct Meta {
  const GgufFile& f;
  std::string arch;
  std::string key(const std::string& k) const { return arch + "." + k; }
  bool has(const std::string& k) const { return f.has(key(k)); }
  int64_t i(const std::string& k) const { return f.get_i64(key(k)); }
  int64_t i_or(const std::string& k, int64_t fallback) const { return has(k) ? i(k) : fallback; }
  double d(const std::string& k) const { return f.get_f64(key(k)); }
  double d_or(const std::string& k, double fallback) const { return has(k) ? d(k) : fallback; }
};

// The vocabulary size: the token list's length, or the embedding's rows.
int64_t vocab_size(const GgufFile& f) {
  if (f.has("tokenizer.ggml.tokens"))
    return static_cast<int64_t>(f.get_array_size("tokenizer.ggml.tokens"));
  return f.tensor("token_embd.weight").ne[1];
}

// The fields every architecture shares (Llama's names in config.json).
json common_config(const Meta& m) {
  const GgufFile& f = m.f;
  json j;
  j["vocab_size"] = vocab_size(f);
  j["hidden_size"] = m.i("embedding_length");
  j["num_hidden_layers"] = m.i("block_count");
  j["num_attention_heads"] = m.i("attention.head_count");
  j["num_key_value_heads"] = m.i_or("attention.head_count_kv", m.i("attention.head_count"));
  j["max_position_embeddings"] = m.i_or("context_length", 4096);
  j["rms_norm_eps"] = m.d("attention.layer_norm_rms_epsilon");
  j["rope_theta"] = m.d_or("rope.freq_base", 10000.0);
  j["tie_word_embeddings"] = !f.has_tensor("output.weight");
  if (m.has("attention.key_length") && m.arch != "deepseek2") {
    const int64_t k = m.i("attention.key_length");
    MOE_CHECK(m.i_or("attention.value_length", k) == k, kWhere,
              "{}: {} = {} and {} = {}: keys and values of different widths are not supported",
              f.path, m.key("attention.key_length"), k, m.key("attention.value_length"),
              m.i("attention.value_length"));
    j["head_dim"] = k;
  }
  if (m.has("rope.scaling.type")) {
    // llama.cpp's YaRN: the blended range always rounded out to whole pairs (its
    // ggml_rope_yarn_corr_dims), the attention factor 0.1 ln(factor) + 1 unless DeepSeek's
    // yarn_log_multiplier says otherwise (deepseek2_config).
    const std::string type = f.get_string(m.key("rope.scaling.type"));
    MOE_CHECK(type == "none" || type == "yarn", kWhere,
              "{}: rope scaling '{}' is not supported (none, yarn)", f.path, type);
    MOE_CHECK(m.d_or("rope.scaling.attn_factor", 1.0) == 1.0, kWhere,
              "{}: {} other than 1 is not supported", f.path, m.key("rope.scaling.attn_factor"));
    if (type == "yarn") {
      json y = {{"rope_type", "yarn"},
                {"factor", m.d("rope.scaling.factor")},
                {"original_max_position_embeddings",
                 m.i_or("rope.scaling.original_context_length", m.i_or("context_length", 4096))},
                {"beta_fast", m.d_or("rope.scaling.yarn_beta_fast", 32.0)},
                {"beta_slow", m.d_or("rope.scaling.yarn_beta_slow", 1.0)},
                {"truncate", true}};
      j["rope_scaling"] = y;
    }
  }
  j["num_experts_per_tok"] = m.i("expert_used_count");
  return j;
}

// The sizes the metadata declares, against the tensors the file holds, before a model of those
// sizes is made: a file cannot make the engine allocate more than its own tensors describe.
void check_sizes_against_tensors(const GgufFile& f, const ModelConfig& c) {
  const auto expect_ne = [&](const std::string& name, std::initializer_list<int64_t> ne) {
    MOE_CHECK(f.has_tensor(name), kWhere, "{}: no tensor '{}'", f.path, name);
    const GgufTensor& t = f.tensor(name);
    std::string want, got;
    for (int64_t d : ne) want += (want.empty() ? "" : ", ") + std::to_string(d);
    for (int i = 0; i < t.n_dims; ++i)
      got += (got.empty() ? "" : ", ") + std::to_string(t.ne[static_cast<size_t>(i)]);
    MOE_CHECK(want == got, kWhere, "{}: '{}' has ne [{}]; the metadata's sizes make it [{}]",
              f.path, name, got, want);
  };
  MOE_CHECK(c.n_layers <= static_cast<int64_t>(f.tensors.size()), kWhere,
            "{}: {} layers declared, but the file holds {} tensors", f.path, c.n_layers,
            f.tensors.size());
  expect_ne("token_embd.weight", {c.d_model, c.vocab_size});
  const int64_t hd = c.head_size();
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    expect_ne(b + "attn_norm.weight", {c.d_model});
    if (i > 0 && i + 1 < c.n_layers) continue;  // the first and last layers in full
    if (c.mla()) {
      const int64_t qk = c.qk_nope_dim + c.qk_rope_dim;
      if (c.q_lora_rank > 0)
        expect_ne(b + "attn_q_b.weight", {c.q_lora_rank, c.n_heads * qk});
      else
        expect_ne(b + "attn_q.weight", {c.d_model, c.n_heads * qk});
      expect_ne(b + "attn_kv_a_mqa.weight", {c.d_model, c.kv_lora_rank + c.qk_rope_dim});
    } else {
      expect_ne(b + "attn_q.weight", {c.d_model, c.n_heads * hd});
      expect_ne(b + "attn_k.weight", {c.d_model, c.n_kv_heads * hd});
    }
    if (c.is_moe_layer(i))
      expect_ne(b + "ffn_gate_exps.weight", {c.d_model, c.moe.d_ffn, c.moe.n_experts});
  }
}

}  // namespace

std::vector<std::string> gguf_architectures() {
  return {"qwen3moe", "qwen2moe", "olmoe", "llama", "deepseek2", "gpt-oss"};
}

namespace {

// DeepSeek-V2/V3 (llama.cpp's deepseek2): multi-head latent attention, leading dense layers,
// shared experts, and the gating function as a number (llama_expert_gating_func_type: 1 softmax,
// the V2 router, 2 sigmoid with the selection bias exp_probs_b and group-limited top-k, V3's).
// The MLA sizes are those of the decompressed heads (key_length_mla, value_length_mla); files
// from converters older than those keys give them as key_length and value_length.
void deepseek2_config(const Meta& m, json& j) {
  const GgufFile& f = m.f;
  const int64_t gating = m.i_or("expert_gating_func", 1);
  MOE_CHECK(gating == 1 || gating == 2, kWhere,
            "{}: {} = {} is not supported (1 softmax, 2 sigmoid)", f.path,
            m.key("expert_gating_func"), gating);
  const bool v3 = gating == 2;
  j["model_type"] = v3 ? "deepseek_v3" : "deepseek_v2";
  j.erase("head_dim");
  const int64_t rope = m.i("rope.dimension_count");
  const int64_t k = m.i_or("attention.key_length_mla", m.i("attention.key_length"));
  MOE_CHECK(k > rope, kWhere, "{}: a key of {} values cannot hold {} rotated ones", f.path, k,
            rope);
  j["qk_rope_head_dim"] = rope;
  j["qk_nope_head_dim"] = k - rope;
  j["v_head_dim"] = m.i_or("attention.value_length_mla", m.i("attention.value_length"));
  j["kv_lora_rank"] = m.i("attention.kv_lora_rank");
  j["q_lora_rank"] = m.i_or("attention.q_lora_rank", 0);
  j["intermediate_size"] = m.i("feed_forward_length");
  j["moe_intermediate_size"] = m.i("expert_feed_forward_length");
  j["n_routed_experts"] = m.i("expert_count");
  j["n_shared_experts"] = m.i_or("expert_shared_count", 0);
  j["first_k_dense_replace"] = m.i_or("leading_dense_block_count", 0);
  j["routed_scaling_factor"] = m.d_or("expert_weights_scale", 1.0);
  j["norm_topk_prob"] = m.has("expert_weights_norm") && f.get_bool(m.key("expert_weights_norm"));
  const int64_t groups = m.i_or("expert_group_count", 1);
  if (v3) {
    j["topk_method"] = "noaux_tc";
    j["n_group"] = groups;
    j["topk_group"] = m.i_or("expert_group_used_count", 1);
  } else {
    // llama.cpp ranks V2's groups by their two best scores, transformers' group_limited_greedy
    // by the best one: neither is run here.
    MOE_CHECK(groups <= 1, kWhere,
              "{}: DeepSeek-V2's group-limited routing ({} = {}) is not supported yet", f.path,
              m.key("expert_group_count"), groups);
    j["topk_method"] = "greedy";
  }
  // Rotation of adjacent pairs, from the rows as the converter writes them (not permuted).
  j["rope_interleave"] = true;
  // YaRN: the converter writes 0.1 * mscale_all_dim as yarn_log_multiplier (llama.cpp divides it
  // back); mscale is 1, or for V2 files mscale_all_dim itself (llama.cpp's special case).
  if (j.contains("rope_scaling") && m.has("rope.scaling.yarn_log_multiplier")) {
    const double all = m.d("rope.scaling.yarn_log_multiplier") / 0.1;
    j["rope_scaling"]["mscale_all_dim"] = all;
    j["rope_scaling"]["mscale"] = v3 || all == 1.0 ? 1.0 : all;
  }
}

}  // namespace

ModelConfig config_from_gguf(const GgufFile& f) {
  const Meta m{f, f.get_string("general.architecture")};
  const std::string& arch = m.arch;
  std::string known;
  for (const std::string& a : gguf_architectures()) known += (known.empty() ? "" : ", ") + a;
  const std::vector<std::string> archs = gguf_architectures();
  MOE_CHECK(std::find(archs.begin(), archs.end(), arch) != archs.end(), kWhere,
            "{}: architecture '{}' is not supported ({})", f.path, arch, known);
  MOE_CHECK(m.has("expert_count") && m.i("expert_count") > 0, kWhere,
            "{}: a '{}' model without experts ({} missing or 0) is a dense model, which this "
            "engine does not run",
            f.path, arch, m.key("expert_count"));
  json j = common_config(m);
  const int64_t E = m.i("expert_count");
  // The expert width: expert_feed_forward_length where the converter writes it (Qwen), else
  // feed_forward_length (Mixtral, OLMoE).
  const int64_t F = m.i_or("expert_feed_forward_length", m.i("feed_forward_length"));
  if (arch == "deepseek2") {
    deepseek2_config(m, j);
  } else if (arch == "gpt-oss") {
    // llama.cpp's graph (openai-moe): the window on the even layers, SwiGLU clamped at 7.
    j["model_type"] = "gpt_oss";
    j["num_local_experts"] = E;
    j["intermediate_size"] = F;
    j["attention_bias"] = true;
    j["swiglu_limit"] = 7.0;
    j["sliding_window"] = m.i("attention.sliding_window");
    json types = json::array();
    for (int64_t i = 0; i < m.i("block_count"); ++i)
      types.push_back(i % 2 == 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
  } else if (arch == "llama") {
    j["model_type"] = "mixtral";
    j["num_local_experts"] = E;
    j["intermediate_size"] = F;
    if (m.has("rope.dimension_count") && !j.contains("head_dim"))
      j["head_dim"] = m.i("rope.dimension_count");
  } else {
    j["model_type"] = arch == "qwen3moe" ? "qwen3_moe" : arch == "qwen2moe" ? "qwen2_moe" : "olmoe";
    j["num_experts"] = E;
    j["moe_intermediate_size"] = F;
    j["intermediate_size"] = m.i_or("feed_forward_length", F);
    // llama.cpp's build_moe_ffn renormalizes the top-k weights for Qwen3-MoE only.
    j["norm_topk_prob"] = arch == "qwen3moe";
    if (arch == "qwen2moe") {
      j["qkv_bias"] = f.has_tensor("blk.0.attn_q.bias");
      if (m.has("expert_shared_feed_forward_length"))
        j["shared_expert_intermediate_size"] = m.i("expert_shared_feed_forward_length");
    }
  }
  ModelConfig c = config_from_hf(j);
  // Mixtral's q and k rows come permuted for rotation of adjacent pairs (see the header).
  if (arch == "llama") c.rope_interleave = true;
  c.validate();
  check_sizes_against_tensors(f, c);
  return c;
}

namespace {}  // namespace

std::string gguf_tensor_name(const std::string& ours, const std::string& arch) {
  if (ours == "embed.weight") return "token_embd.weight";
  if (ours == "norm.weight") return "output_norm.weight";
  if (ours == "lm_head.weight") return "output.weight";
  if (ours.rfind("layers.", 0) != 0) return "";
  const size_t dot = ours.find('.', 7);
  if (dot == std::string::npos) return "";
  const std::string blk = "blk." + ours.substr(7, dot - 7) + ".", rest = ours.substr(dot + 1);
  if (rest == "ffn_norm.weight" && arch == "gpt-oss") return blk + "post_attention_norm.weight";
  static const std::pair<const char*, const char*> kNames[] = {
      {"attn_norm.weight", "attn_norm.weight"},
      {"ffn_norm.weight", "ffn_norm.weight"},
      {"attn.sinks", "attn_sinks.weight"},
      {"attn.b_o", "attn_output.bias"},
      {"moe.router.bias", "ffn_gate_inp.bias"},
      {"moe.experts.b_gate", "ffn_gate_exps.bias"},
      {"moe.experts.b_up", "ffn_up_exps.bias"},
      {"moe.experts.b_down", "ffn_down_exps.bias"},
      {"attn.wq", "attn_q.weight"},
      {"attn.wk", "attn_k.weight"},
      {"attn.wv", "attn_v.weight"},
      {"attn.wo", "attn_output.weight"},
      {"attn.b_q", "attn_q.bias"},
      {"attn.b_k", "attn_k.bias"},
      {"attn.b_v", "attn_v.bias"},
      {"attn.q_norm", "attn_q_norm.weight"},
      {"attn.k_norm", "attn_k_norm.weight"},
      {"attn.wq_a", "attn_q_a.weight"},
      {"attn.q_a_norm", "attn_q_a_norm.weight"},
      {"attn.wq_b", "attn_q_b.weight"},
      {"attn.wkv_a", "attn_kv_a_mqa.weight"},
      {"attn.kv_a_norm", "attn_kv_a_norm.weight"},
      {"attn.wkv_b", "attn_kv_b.weight"},
      {"ffn.w_gate", "ffn_gate.weight"},
      {"ffn.w_up", "ffn_up.weight"},
      {"ffn.w_down", "ffn_down.weight"},
      {"moe.router.weight", "ffn_gate_inp.weight"},
      {"moe.experts.w_gate", "ffn_gate_exps.weight"},
      {"moe.experts.w_up", "ffn_up_exps.weight"},
      {"moe.experts.w_down", "ffn_down_exps.weight"},
      {"moe.shared.w_gate", "ffn_gate_shexp.weight"},
      {"moe.shared.w_up", "ffn_up_shexp.weight"},
      {"moe.shared.w_down", "ffn_down_shexp.weight"},
      {"moe.shared.gate", "ffn_gate_inp_shexp.weight"}};
  for (const auto& [a, b] : kNames)
    if (rest == a) return blk + b;
  return "";
}

namespace {

// A shape without its leading dimensions of 1 ([F, D] for [1, F, D]).
Shape squeezed(const Shape& s) {
  Shape o;
  size_t i = 0;
  while (i + 1 < s.size() && s[i] == 1) ++i;
  for (; i < s.size(); ++i) o.push_back(s[i]);
  return o;
}

// The file's tensor `name` with the shape `want` (up to leading dimensions of 1).
Tensor checked_view(const GgufFile& f, const std::string& name, const Shape& want,
                    const std::string& ours) {
  MOE_CHECK(f.has_tensor(name), kWhere, "{}: no tensor '{}' (for {})", f.path, name, ours);
  const Tensor t = f.view(name);
  MOE_CHECK(squeezed(t.shape()) == squeezed(want), kWhere,
            "{}: '{}' must be {} (in ggml's order, ne reversed), got {}", f.path, name,
            shape_str(want), t.str());
  return t;
}

// Views of the routed experts of MoE layer `layer`: expert e's [F, D] / [D, F] slices of the
// stacked ffn_{gate,up,down}_exps tensors [E, F, D] and [E, D, F].
std::vector<ExpertView> expert_views(const ModelConfig& c, const GgufFile& f, int64_t layer) {
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  const std::string blk = "blk." + std::to_string(layer) + ".";
  const Tensor g = checked_view(f, blk + "ffn_gate_exps.weight", {E, F, D}, "the experts");
  const Tensor u = checked_view(f, blk + "ffn_up_exps.weight", {E, F, D}, "the experts");
  const Tensor d = checked_view(f, blk + "ffn_down_exps.weight", {E, D, F}, "the experts");
  StackedExperts x{g, u, d, {}, {}, {}};
  if (c.moe.expert_bias) {  // gpt-oss: float32 [E, F] and [E, D]
    const auto bias = [&](const char* part, int64_t width) {
      const std::string name = blk + "ffn_" + part + "_exps.bias";
      return checked_view(f, name, {E, width}, "the experts' biases").to(DType::F32);
    };
    x.b_gate = bias("gate", F);
    x.b_up = bias("up", F);
    x.b_down = bias("down", D);
  }
  return x.views();
}

// MLA's key-and-value decompression kv_b [H * (nope + v), kv_lora] (HuggingFace's kv_b_proj),
// from the two halves today's converter writes instead: attn_k_b [H, kv_lora, nope] (each head's
// key rows transposed) and attn_v_b [H, v, kv_lora]. Values as float32 (exact for every type).
Tensor kv_b_from_halves(const ModelConfig& c, const GgufFile& f, const std::string& blk) {
  const int64_t H = c.n_heads, R = c.kv_lora_rank, N = c.qk_nope_dim, V = c.v_head_dim;
  const Tensor kb =
      checked_view(f, blk + "attn_k_b.weight", {H, R, N}, "attn.wkv_b").to(DType::F32);
  const Tensor vb =
      checked_view(f, blk + "attn_v_b.weight", {H, V, R}, "attn.wkv_b").to(DType::F32);
  Tensor out = Tensor::empty({H * (N + V), R}, DType::F32);
  const float* k = kb.data<float>();
  const float* v = vb.data<float>();
  float* o = out.data<float>();
  for (int64_t h = 0; h < H; ++h) {
    float* head = o + h * (N + V) * R;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < N; ++i) head[i * R + r] = k[(h * R + r) * N + i];
    std::copy(v + h * V * R, v + (h + 1) * V * R, head + N * R);
  }
  return out;
}

// The parameter `ours` from the file: its tensor, or what it is made of.
Tensor param_tensor(const ModelConfig& c, const GgufFile& f, const std::string& ours,
                    const Shape& want) {
  const std::string name = gguf_tensor_name(ours, f.get_string("general.architecture"));
  MOE_CHECK(!name.empty(), kWhere, "{}: parameter {} has no GGUF tensor name", f.path, ours);
  const std::string suffix = "attn_kv_b.weight";
  if (c.mla() && name.size() > suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
      !f.has_tensor(name)) {
    const Tensor t = kv_b_from_halves(c, f, name.substr(0, name.size() - suffix.size()));
    MOE_CHECK(t.shape() == want, kWhere, "{}: {} must be {}, got {}", f.path, ours, shape_str(want),
              t.str());
    return t;
  }
  return checked_view(f, name, want, ours);
}

// The routers' selection biases (DeepSeek-V3's e_score_correction_bias): exp_probs_b.bias of
// each MoE layer, zero where the file has none (as llama.cpp reads it).
void load_selection_biases(Model& model, const GgufFile& f) {
  const ModelConfig& c = model.config();
  size_t mi = 0;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    if (!c.is_moe_layer(i)) continue;
    std::vector<double>* bias = model.moe_layers()[mi++]->router().selection_bias();
    if (bias == nullptr) continue;
    const std::string name = "blk." + std::to_string(i) + ".exp_probs_b.bias";
    if (!f.has_tensor(name)) continue;
    const Tensor t = checked_view(f, name, {c.moe.n_experts}, "the selection bias").to(DType::F32);
    bias->assign(t.data<float>(), t.data<float>() + t.numel());
  }
}

}  // namespace

void load_gguf_weights(Model& model, const GgufFile& f, bool stored, bool experts) {
  const ModelConfig& c = model.config();
  const std::vector<MoeLayer*>& moes = model.moe_layers();
  const bool expert_source =
      stored && experts && !moes.empty() && moes[0]->params().experts.w_up.numel() == 0;
  if (expert_source) {
    std::vector<std::vector<ExpertView>> layers;
    for (int64_t i = 0; i < c.n_layers; ++i)
      if (c.is_moe_layer(i)) layers.push_back(expert_views(c, f, i));
    model.set_expert_source(stored_expert_source(std::move(layers)));
  }
  std::vector<std::pair<std::string, Tensor>> views;  // installed once the list is walked
  for (NamedParam& p : model.params()) {
    const Tensor t = param_tensor(c, f, p.name, p.value.shape());
    if (stored && model.is_weight_matrix(p.name)) {
      views.emplace_back(p.name, t);
      continue;
    }
    const Tensor v = t.dtype() == p.value.dtype() ? t : t.to(p.value.dtype());
    std::memcpy(p.value.raw(), v.raw(), p.value.nbytes());
  }
  for (const auto& [ours, t] : views) model.set_weight(ours, t);
  load_selection_biases(model, f);
}

}  // namespace moe
