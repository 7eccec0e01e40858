// HuggingFace checkpoints of the MoE architectures people run (see moe/hf.h): every tensor, under
// its architecture's name and layout, copied into the model's parameters or kept as a view of the
// mapped files (config.json is read by hf_config.cpp).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "moe/hf.h"
#include "moe/json_read.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

using nlohmann::json;

const char* const kWhere = "hf";

// Where an architecture keeps each tensor (the llama-style names; DBRX is handled apart).
struct Names {
  std::string moe = "mlp.";                                            // the MoE block, in a layer
  std::string router = "gate.weight";                                  // in the MoE block
  std::string gate = "gate_proj", up = "up_proj", down = "down_proj";  // expert projections
  std::string shared;       // the shared experts' MLP, in the MoE block
  std::string shared_gate;  // the shared gate, in the MoE block
};

Names names_for(const std::string& type) {
  Names n;
  if (type == "mixtral") {
    n.moe = "block_sparse_moe.";
    n.gate = "w1";
    n.up = "w3";
    n.down = "w2";
  } else if (type == "qwen2_moe") {
    n.shared = "shared_expert.";
    n.shared_gate = "shared_expert_gate.weight";
  } else if (type == "deepseek_v2" || type == "deepseek_v3") {
    n.shared = "shared_experts.";
  } else if (type == "gpt_oss") {
    n.router = "router.weight";
  }
  return n;
}

// Copies src (any float dtype) into dst; src must have `shape`, or be that shape with leading
// dimensions merged ([E*F, D] for [E, F, D]) or dropped ([F, D] for [1, F, D]).
void copy_into(void* dst, DType dtype, const Tensor& src, const Shape& shape,
               const std::string& name) {
  Tensor f = src.dtype() == dtype ? src : src.to(dtype);
  const Shape& s = f.shape();
  bool merged =
      shape.size() == 3 && s.size() == 2 && s[0] == shape[0] * shape[1] && s[1] == shape[2];
  if (merged) f = Tensor::view(f.raw(), shape, dtype);
  f.expect(kWhere, name.c_str(), shape, dtype);
  std::memcpy(dst, f.raw(), f.nbytes());
}

// The experts of MoE layer `layer`, through Model::expert: per-expert tensors
// "<prefix>experts.<e>.<proj>.weight", or transformers' fused "<prefix>experts.gate_up_proj"
// [E, 2F, D] (gate rows first) and "<prefix>experts.down_proj" [E, D, F].
void load_experts(Model& model, int64_t layer, HfTensors& src, const std::string& prefix,
                  const Names& n) {
  const int64_t E = model.config().moe.n_experts;
  const bool fused = !src.has(prefix + "experts.0." + n.gate + ".weight") &&
                     src.has(prefix + "experts.gate_up_proj");
  Tensor gate_up, down;
  if (fused) {
    const ExpertView x = model.expert(layer, 0);
    const int64_t F = x.w_gate.size(0), D = x.w_gate.size(1);
    const std::string gu = prefix + "experts.gate_up_proj", dn = prefix + "experts.down_proj";
    gate_up = src.get(gu).to(DType::F32);
    gate_up.expect(kWhere, gu.c_str(), {E, 2 * F, D}, DType::F32);
    down = src.get(dn).to(DType::F32);
    down.expect(kWhere, dn.c_str(), {E, D, F}, DType::F32);
  }
  for (int64_t e = 0; e < E; ++e) {
    ExpertView x = model.expert(layer, e);
    if (fused) {
      const int64_t FD = x.w_gate.numel();
      const float* g = gate_up.data<float>() + 2 * e * FD;
      copy_into(x.w_gate.raw(), x.w_gate.dtype(),
                Tensor::view(const_cast<float*>(g), x.w_gate.shape(), DType::F32), x.w_gate.shape(),
                prefix + "experts.gate_up_proj");
      copy_into(x.w_up.raw(), x.w_up.dtype(),
                Tensor::view(const_cast<float*>(g + FD), x.w_up.shape(), DType::F32),
                x.w_up.shape(), prefix + "experts.gate_up_proj");
      copy_into(x.w_down.raw(), x.w_down.dtype(),
                Tensor::view(down.data<float>() + e * FD, x.w_down.shape(), DType::F32),
                x.w_down.shape(), prefix + "experts.down_proj");
      continue;
    }
    const std::string p = prefix + "experts." + std::to_string(e) + ".";
    for (auto [dst, proj] : {std::pair<Tensor*, const std::string*>{&x.w_gate, &n.gate},
                             {&x.w_up, &n.up},
                             {&x.w_down, &n.down}}) {
      const std::string name = p + *proj + ".weight";
      copy_into(dst->raw(), dst->dtype(), src.get(name), dst->shape(), name);
      src.drop(name);
    }
  }
}

}  // namespace

// Routed experts kept as the checkpoint stores them: per layer, each expert's views of the mapped
// files (one tensor per expert, or slices of stacked tensors); nothing is read until an expert
// runs.
class StoredExperts : public ExpertSource {
 public:
  explicit StoredExperts(std::vector<std::vector<ExpertView>> layers)
      : layers_(std::move(layers)) {}
  void observe(int64_t, const std::vector<int64_t>&, int64_t) override {}
  ExpertView acquire(int64_t layer, int64_t e) override {
    return layers_[static_cast<size_t>(layer)][static_cast<size_t>(e)];
  }
  void release(int64_t, int64_t) override {}
  bool all_at_once() const override { return true; }

 private:
  std::vector<std::vector<ExpertView>> layers_;
};

std::shared_ptr<ExpertSource> stored_expert_source(std::vector<std::vector<ExpertView>> layers) {
  return std::make_shared<StoredExperts>(std::move(layers));
}

std::vector<ExpertView> StackedExperts::views() const {
  const int64_t E = gate.size(0), F = gate.size(1), D = gate.size(2);
  std::vector<ExpertView> out(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    ExpertView& v = out[static_cast<size_t>(e)];
    v.w_gate = gate.view_at(e * F * D, {F, D});
    v.w_up = up.view_at(e * F * D, {F, D});
    v.w_down = down.view_at(e * D * F, {D, F});
    if (b_gate.defined()) v.b_gate = b_gate.view_at(e * F, {F});
    if (b_up.defined()) v.b_up = b_up.view_at(e * F, {F});
    if (b_down.defined()) v.b_down = b_down.view_at(e * D, {D});
  }
  return out;
}

namespace {

// Views of MoE layer `layer`'s experts as stored: "<prefix>experts.<e>.<proj>.weight", or rows
// of the fused "<prefix>experts.gate_up_proj" [E, 2F, D] (gate rows first) and
// "<prefix>experts.down_proj" [E, D, F].
std::vector<ExpertView> stored_experts(const ModelConfig& c, HfTensors& src,
                                       const std::string& prefix, const Names& n) {
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  std::vector<ExpertView> out(static_cast<size_t>(E));
  const bool fused = !src.has(prefix + "experts.0." + n.gate + ".weight") &&
                     src.has(prefix + "experts.gate_up_proj");
  if (fused) {
    const std::string gu = prefix + "experts.gate_up_proj", dn = prefix + "experts.down_proj";
    const Tensor g = src.view(gu), d = src.view(dn);
    MOE_CHECK(g.shape() == Shape({E, 2 * F, D}), kWhere, "{} must be [{}, {}, {}], got {}", gu, E,
              2 * F, D, g.str());
    MOE_CHECK(d.shape() == Shape({E, D, F}), kWhere, "{} must be [{}, {}, {}], got {}", dn, E, D, F,
              d.str());
    // int8 (moe quantize): a scale per stored row beside each, [E, 2F] and [E, D].
    const Tensor gs = g.dtype() == DType::I8 ? src.view(gu + "_scale") : Tensor();
    const Tensor ds = d.dtype() == DType::I8 ? src.view(dn + "_scale") : Tensor();
    for (int64_t e = 0; e < E; ++e) {
      ExpertView& v = out[static_cast<size_t>(e)];
      v.w_gate = g.view_at(2 * e * F * D, {F, D});
      v.w_up = g.view_at((2 * e + 1) * F * D, {F, D});
      v.w_down = d.view_at(e * D * F, {D, F});
      if (gs.defined()) {
        v.s_gate = gs.view_at(2 * e * F, {F});
        v.s_up = gs.view_at((2 * e + 1) * F, {F});
      }
      if (ds.defined()) v.s_down = ds.view_at(e * D, {D});
    }
    return out;
  }
  for (int64_t e = 0; e < E; ++e) {
    const std::string p = prefix + "experts." + std::to_string(e) + ".";
    ExpertView& v = out[static_cast<size_t>(e)];
    for (auto [dst, proj, shape] :
         {std::tuple<Tensor*, const std::string*, Shape>{&v.w_gate, &n.gate, {F, D}},
          {&v.w_up, &n.up, {F, D}},
          {&v.w_down, &n.down, {D, F}}}) {
      const std::string name = p + *proj + ".weight";
      *dst = src.view(name);
      MOE_CHECK(dst->shape() == shape, kWhere, "{} must be {}, got {}", name, shape_str(shape),
                dst->str());
    }
    // int8 experts (moe quantize): each matrix's row scales beside it.
    v.s_gate = v.w_gate.dtype() == DType::I8 ? src.view(p + n.gate + ".weight_scale") : Tensor();
    v.s_up = v.w_up.dtype() == DType::I8 ? src.view(p + n.up + ".weight_scale") : Tensor();
    v.s_down = v.w_down.dtype() == DType::I8 ? src.view(p + n.down + ".weight_scale") : Tensor();
  }
  return out;
}

// The model-wide tensors' names in a checkpoint.
struct TopNames {
  const char* embed;
  const char* norm;
  const char* lm_head;
};

// Copies the model-wide tensors by name and hands every layer's parameter to
// per_layer(layer, rest, param, take), where rest is its name after "layers.<i>." and take(name)
// copies the checkpoint's tensor `name` into it.
// Weights to keep as stored: (our name, a view of the checkpoint's tensor), installed with
// Model::set_weight once the parameter list is no longer walked.
using Views = std::vector<std::pair<std::string, Tensor>>;

// Whether tensor `theirs` may stay as stored for our parameter `ours`: a weight matrix stored
// as f32, bf16 or f16.
bool keep_stored(Model& model, HfTensors& src, const std::string& ours, const std::string& theirs) {
  const std::string& d = src.stored(theirs).dtype;
  return model.is_weight_matrix(ours) && (d == "F32" || d == "BF16" || d == "F16");
}

template <class Fn>
void load_params(Model& model, HfTensors& src, const TopNames& top, Views* views, Fn&& per_layer) {
  for (NamedParam& p : model.params()) {
    auto take = [&](const std::string& theirs) {
      if (views && keep_stored(model, src, p.name, theirs)) {
        views->emplace_back(p.name, src.view(theirs));
        return;
      }
      copy_into(p.value.raw(), p.value.dtype(), src.get(theirs), p.value.shape(), theirs);
      src.drop(theirs);
    };
    if (p.name == "embed.weight") {
      take(top.embed);
    } else if (p.name == "norm.weight") {
      take(top.norm);
    } else if (p.name == "lm_head.weight") {
      take(top.lm_head);
    } else {
      const size_t dot = p.name.find('.', 7);  // layers.<i>.<rest>
      per_layer(std::stoll(p.name.substr(7, dot - 7)), p.name.substr(dot + 1), p, take);
    }
  }
}

// The checkpoint's name of our layer-i tensor `rest` (its name after "layers.<i>."), for the
// tensors that map one to one; empty for the routed experts (load_experts, expert_tensors).
std::string layer_name(const Names& n, int64_t i, const std::string& rest) {
  const std::string L = "model.layers." + std::to_string(i) + ".";
  const std::string A = L + "self_attn.";
  const std::string M = L + n.moe;
  static const std::pair<const char*, const char*> attn[] = {
      {"attn.wq", "q_proj.weight"},
      {"attn.wk", "k_proj.weight"},
      {"attn.wv", "v_proj.weight"},
      {"attn.wo", "o_proj.weight"},
      {"attn.b_q", "q_proj.bias"},
      {"attn.b_k", "k_proj.bias"},
      {"attn.b_v", "v_proj.bias"},
      {"attn.q_norm", "q_norm.weight"},
      {"attn.k_norm", "k_norm.weight"},
      {"attn.wq_a", "q_a_proj.weight"},
      {"attn.q_a_norm", "q_a_layernorm.weight"},
      {"attn.wq_b", "q_b_proj.weight"},
      {"attn.wkv_a", "kv_a_proj_with_mqa.weight"},
      {"attn.kv_a_norm", "kv_a_layernorm.weight"},
      {"attn.wkv_b", "kv_b_proj.weight"},
      {"attn.b_o", "o_proj.bias"},
      {"attn.sinks", "sinks"}};
  for (const auto& [a, b] : attn)
    if (rest == a) return A + b;
  // DeepSeek-V3's multi-token prediction module k: layer num_hidden_layers + k - 1.
  if (rest == "enorm.weight" || rest == "hnorm.weight" || rest == "eh_proj.weight" ||
      rest == "shared_head.norm.weight")
    return L + rest;
  if (rest == "attn_norm.weight") return L + "input_layernorm.weight";
  if (rest == "ffn_norm.weight") return L + "post_attention_layernorm.weight";
  if (rest == "ffn.w_gate") return L + "mlp.gate_proj.weight";
  if (rest == "ffn.w_up") return L + "mlp.up_proj.weight";
  if (rest == "ffn.w_down") return L + "mlp.down_proj.weight";
  if (rest == "moe.router.weight") return M + n.router;
  if (rest == "moe.router.bias") return M + "router.bias";
  if (!n.shared.empty()) {
    if (rest == "moe.shared.w_gate") return M + n.shared + "gate_proj.weight";
    if (rest == "moe.shared.w_up") return M + n.shared + "up_proj.weight";
    if (rest == "moe.shared.w_down") return M + n.shared + "down_proj.weight";
  }
  if (rest == "moe.shared.gate" && !n.shared_gate.empty()) return M + n.shared_gate;
  return "";
}

void load_llama_like(Model& model, const std::string& type, HfTensors& src, Views* views) {
  const Names n = names_for(type);
  const std::vector<MoeLayer*>& moes = model.moe_layers();
  size_t moe_index = 0;
  int64_t layer = -1;
  const TopNames top{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  const bool gpt_oss = type == "gpt_oss";
  if (views) {  // the routed experts as stored, from a source of views
    std::vector<std::vector<ExpertView>> layers;
    const ModelConfig& c = model.config();
    for (int64_t i = 0; i < c.n_layers + c.mtp_depth; ++i)
      if (c.is_moe_layer(i))
        layers.push_back(gpt_oss ? gpt_oss_experts(model.config(), src, i).views()
                                 : stored_experts(model.config(), src,
                                                  "model.layers." + std::to_string(i) + "." + n.moe,
                                                  n));
    model.set_expert_source(stored_expert_source(std::move(layers)));
  }
  StackedExperts oss;  // gpt-oss, float32 parameters: the current layer's, converted once
  load_params(
      model, src, top, views, [&](int64_t i, const std::string& rest, NamedParam& p, auto& take) {
        const std::string M = "model.layers." + std::to_string(i) + "." + n.moe;
        if (i != layer) {
          layer = i;
          if (model.config().is_moe_layer(i)) {
            // DeepSeek-V3's selection bias is a buffer, not a parameter.
            MoeLayer* m = moes[moe_index++];
            if (std::vector<double>* b = m->router().selection_bias()) {
              const std::string name = M + "gate.e_score_correction_bias";
              const Tensor t = src.get(name).to(DType::F64);
              t.expect(kWhere, name.c_str(), {static_cast<int64_t>(b->size())}, DType::F64);
              b->assign(t.data<double>(), t.data<double>() + t.numel());
            }
          }
        }
        if (const std::string name = layer_name(n, i, rest); !name.empty()) {
          take(name);
        } else if (gpt_oss && rest.rfind("moe.experts.", 0) == 0) {
          if (rest == "moe.experts.w_gate") oss = gpt_oss_experts(model.config(), src, i);
          const std::string part = rest.substr(12);
          const Tensor& t = part == "w_gate"   ? oss.gate
                            : part == "w_up"   ? oss.up
                            : part == "w_down" ? oss.down
                            : part == "b_gate" ? oss.b_gate
                            : part == "b_up"   ? oss.b_up
                                               : oss.b_down;
          MOE_CHECK(t.defined(), kWhere, "{}: the experts are read with w_gate first", p.name);
          copy_into(p.value.raw(), p.value.dtype(), t.to(DType::F32), p.value.shape(), p.name);
        } else if (rest == "moe.experts.w_gate") {
          load_experts(model, i, src, M, n);  // all three projections of every expert
        } else if (rest == "moe.experts.w_up" || rest == "moe.experts.w_down") {
          // loaded with w_gate
        } else {
          throw_error(kWhere, fmt::format("{} has no {} tensor", p.name, type));
        }
      });
}

// DBRX's experts of block i as stored: rows of w1 and v1 [E F, D] (gate and up), and of w2
// [E F, D], which holds each expert's down projection with its input rows (down_in_rows); int8
// ones with their scales [E F] per stored row.
std::vector<ExpertView> dbrx_stored_experts(const ModelConfig& c, HfTensors& src, int64_t i) {
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  const std::string B = "transformer.blocks." + std::to_string(i) + ".ffn.experts.mlp.";
  Tensor m[3], sc[3];
  const char* names[3] = {"w1", "v1", "w2"};
  for (int k = 0; k < 3; ++k) {
    m[k] = src.view(B + names[k]);
    MOE_CHECK(m[k].shape() == Shape({E * F, D}), kWhere, "{}{} must be [{}, {}], got {}", B,
              names[k], E * F, D, m[k].str());
    if (m[k].dtype() == DType::I8) sc[k] = src.view(B + names[k] + "_scale");
  }
  std::vector<ExpertView> out(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    ExpertView& v = out[static_cast<size_t>(e)];
    Tensor* w[3] = {&v.w_gate, &v.w_up, &v.w_down};
    Tensor* s[3] = {&v.s_gate, &v.s_up, &v.s_down};
    for (int k = 0; k < 3; ++k) {
      *w[k] = m[k].view_at(e * F * D, {F, D});
      if (sc[k].defined()) *s[k] = sc[k].view_at(e * F, {F});
    }
    v.down_in_rows = true;
  }
  return out;
}

void load_dbrx(Model& model, HfTensors& src, Views* views) {
  const ModelConfig& c = model.config();
  const int64_t hd = c.head_size(), H = c.n_heads, KV = c.n_kv_heads, D = c.d_model;
  const TopNames top{"transformer.wte.weight", "transformer.norm_f.weight", "lm_head.weight"};
  if (views) {  // the routed experts as stored, from a source of views
    std::vector<std::vector<ExpertView>> layers;
    for (int64_t i = 0; i < c.n_layers; ++i)
      if (c.is_moe_layer(i)) layers.push_back(dbrx_stored_experts(c, src, i));
    model.set_expert_source(stored_expert_source(std::move(layers)));
  }
  load_params(
      model, src, top, views, [&](int64_t i, const std::string& rest, NamedParam& p, auto& take) {
        const std::string B = "transformer.blocks." + std::to_string(i) + ".";
        const std::string A = B + "norm_attn_norm.";
        if (rest == "attn_norm.weight") {
          take(A + "norm_1.weight");
        } else if (rest == "ffn_norm.weight") {
          take(A + "norm_2.weight");
        } else if (rest == "attn.wo") {
          take(A + "attn.out_proj.weight");
        } else if (rest == "attn.wq" || rest == "attn.wk" || rest == "attn.wv") {
          // Wqkv [(H + 2 KV) hd, D] = [W_q; W_k; W_v].
          const std::string name = A + "attn.Wqkv.weight";
          const int64_t row0 = rest == "attn.wq" ? 0 : rest == "attn.wk" ? H * hd : (H + KV) * hd;
          if (views && keep_stored(model, src, p.name, name)) {
            const Tensor t = src.view(name);
            MOE_CHECK(t.shape() == Shape({(H + 2 * KV) * hd, D}), kWhere, "{} must be [{}, {}]",
                      name, (H + 2 * KV) * hd, D);
            views->emplace_back(p.name, t.view_at(row0 * D, p.value.shape()));
            return;
          }
          const Tensor& t = src.get(name);
          const Tensor f = t.dtype() == p.value.dtype() ? t : t.to(p.value.dtype());
          f.expect(kWhere, name.c_str(), {(H + 2 * KV) * hd, D}, p.value.dtype());
          std::memcpy(p.value.raw(),
                      static_cast<const char*>(f.raw()) +
                          static_cast<size_t>(row0 * D) * dtype_size(f.dtype()),
                      p.value.nbytes());
        } else if (rest == "moe.router.weight") {
          take(B + "ffn.router.layer.weight");
        } else if (rest == "moe.experts.w_gate") {
          take(B + "ffn.experts.mlp.w1");  // [E F, D] is [E, F, D]
        } else if (rest == "moe.experts.w_up") {
          take(B + "ffn.experts.mlp.v1");
        } else if (rest == "moe.experts.w_down") {
          // w2 [E F, D]: expert e computes h w2_e with w2_e [F, D], so W_down[e] = w2_e^T.
          const std::string name = B + "ffn.experts.mlp.w2";
          const int64_t E = p.value.size(0), F = p.value.size(2);
          const Tensor f = src.get(name).to(DType::F64);
          f.expect(kWhere, name.c_str(), {E * F, D}, DType::F64);
          const double* s = f.data<double>();
          for (int64_t e = 0; e < E; ++e)
            for (int64_t d = 0; d < D; ++d)
              for (int64_t k = 0; k < F; ++k) {
                const double v = s[(e * F + k) * D + d];
                const int64_t at = (e * D + d) * F + k;
                if (p.value.dtype() == DType::F64) {
                  p.value.data<double>()[at] = v;
                } else {
                  p.value.data<float>()[at] = static_cast<float>(v);
                }
              }
        } else {
          throw_error(kWhere, fmt::format("{} has no dbrx tensor", p.name));
        }
      });
}

}  // namespace

std::vector<std::string> hf_expert_names(const std::string& model_type, int64_t layer, int64_t e) {
  MOE_CHECK(model_type != "dbrx", kWhere,
            "dbrx stores its experts fused in one tensor per projection, not one per expert");
  const Names n = names_for(model_type);
  const std::string p = fmt::format("model.layers.{}.{}experts.{}.", layer, n.moe, e);
  return {p + n.gate + ".weight", p + n.up + ".weight", p + n.down + ".weight"};
}

// ---------------------------------------------------------------------------------------------
// HfTensors

HfTensors::HfTensors(const std::string& dir) : dir_(dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    shards_.emplace("model.safetensors", load_safetensors(single.string()));
    for (const auto& [name, t] : shards_.begin()->second.stored) where_[name] = "model.safetensors";
    return;
  }
  MOE_CHECK(fs::exists(index), kWhere, "{} has neither model.safetensors nor {}", dir,
            index.filename().string());
  std::ifstream f(index);
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    throw_error(kWhere, fmt::format("{} is not valid JSON: {}", index.string(), e.what()));
  }
  MOE_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), kWhere,
            "{} has no weight_map object", index.string());
  for (const auto& [name, shard] : j["weight_map"].items()) {
    MOE_CHECK(shard.is_string(), kWhere, "{}: the shard of '{}' is not a string", index.string(),
              name);
    const std::string s = shard.get<std::string>();
    // A shard is a plain file name in the model folder: no folders, no way out of it.
    MOE_CHECK(!s.empty() && s.find('/') == std::string::npos && s.find('\\') == std::string::npos &&
                  s != "." && s != "..",
              kWhere, "{}: shard '{}' of '{}' is not a file in the model folder", index.string(), s,
              name);
    where_[name] = s;
  }
}

void HfTensors::set_prefault(bool on) {
  prefault_ = on;
  for (auto& [name, shard] : shards_) shard.set_prefault(on);
}

uint64_t HfTensors::file_bytes() const {
  std::set<std::string> files;
  for (const auto& [name, file] : where_) files.insert(file);
  uint64_t bytes = 0;
  for (const std::string& f : files) {
    std::error_code ec;
    const uintmax_t n = fs::file_size(fs::path(dir_) / f, ec);
    if (!ec) bytes += n;  // a missing shard is reported when it is read
  }
  return bytes;
}

bool HfTensors::has(const std::string& name) const { return where_.count(name) > 0; }

SafetensorsFile& HfTensors::shard_of(const std::string& name) {
  auto it = where_.find(name);
  MOE_CHECK(it != where_.end(), kWhere, "the checkpoint in {} has no tensor '{}'", dir_, name);
  auto s = shards_.find(it->second);
  if (s == shards_.end()) {
    const fs::path path = fs::path(dir_) / it->second;
    MOE_CHECK(fs::exists(path), kWhere, "shard {} is missing", path.string());
    s = shards_.emplace(it->second, load_safetensors(path.string())).first;
    s->second.set_prefault(prefault_);
  }
  MOE_CHECK(s->second.has(name), kWhere, "shard {} has no tensor '{}' (the index says so)",
            it->second, name);
  return s->second;
}

const Tensor& HfTensors::get(const std::string& name) { return shard_of(name).at(name); }

const StoredTensor& HfTensors::stored(const std::string& name) {
  return shard_of(name).stored.at(name);
}

Tensor HfTensors::view(const std::string& name) { return shard_of(name).view(name); }

void HfTensors::drop(const std::string& name) {
  auto it = where_.find(name);
  if (it == where_.end()) return;
  auto s = shards_.find(it->second);
  if (s == shards_.end()) return;
  s->second.drop(name);
}

namespace {

// A [rows, cols] matrix stored transposed: out [cols, rows].
Tensor transposed(const float* x, int64_t rows, int64_t cols) {
  Tensor t = Tensor::empty({cols, rows}, DType::F32);
  float* o = t.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) o[c * rows + r] = x[r * cols + c];
  return t;
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> hf_tensors(Model& model, const std::string& model_type,
                                                       bool fused_experts, bool grads) {
  MOE_CHECK(model.dtype() == DType::F32, kWhere, "HuggingFace tensors are written from float32");
  const ModelConfig& c = model.config();
  const bool dbrx = model_type == "dbrx";
  const Names n = names_for(model_type);
  std::vector<std::pair<std::string, Tensor>> out;
  const auto slice = [](const Tensor& t, int64_t e) {  // expert e of [E, ...]
    const Shape s(t.shape().begin() + 1, t.shape().end());
    const int64_t k = shape_numel(s);
    return Tensor::view(const_cast<float*>(t.data<float>()) + e * k, s, DType::F32);
  };
  std::vector<NamedParam>& params = model.params();
  for (size_t pi = 0; pi < params.size(); ++pi) {
    NamedParam& p = params[pi];
    Tensor& t = grads ? p.grad : p.value;
    if (p.name == "embed.weight") {
      out.emplace_back(dbrx ? "transformer.wte.weight" : "model.embed_tokens.weight", t);
      continue;
    }
    if (p.name == "norm.weight") {
      out.emplace_back(dbrx ? "transformer.norm_f.weight" : "model.norm.weight", t);
      continue;
    }
    if (p.name == "lm_head.weight") {
      out.emplace_back("lm_head.weight", t);
      continue;
    }
    const size_t dot = p.name.find('.', 7);
    const int64_t i = std::stoll(p.name.substr(7, dot - 7));
    const std::string rest = p.name.substr(dot + 1);
    if (dbrx) {
      const std::string B = "transformer.blocks." + std::to_string(i) + ".";
      const std::string A = B + "norm_attn_norm.";
      const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
      if (rest == "attn_norm.weight") {
        out.emplace_back(A + "norm_1.weight", t);
      } else if (rest == "ffn_norm.weight") {
        out.emplace_back(A + "norm_2.weight", t);
      } else if (rest == "attn.wo") {
        out.emplace_back(A + "attn.out_proj.weight", t);
      } else if (rest == "attn.wq") {
        // Wqkv = [W_q; W_k; W_v]: wq, wk and wv follow each other in params().
        const Tensor& k = grads ? params[pi + 1].grad : params[pi + 1].value;
        const Tensor& v = grads ? params[pi + 2].grad : params[pi + 2].value;
        Tensor qkv = Tensor::empty({t.size(0) + k.size(0) + v.size(0), D}, DType::F32);
        char* o = static_cast<char*>(qkv.raw());
        for (const Tensor* part : {static_cast<const Tensor*>(&t), &k, &v}) {
          std::memcpy(o, part->raw(), part->nbytes());
          o += part->nbytes();
        }
        out.emplace_back(A + "attn.Wqkv.weight", qkv);
      } else if (rest == "attn.wk" || rest == "attn.wv") {
        // written with wq
      } else if (rest == "moe.router.weight") {
        out.emplace_back(B + "ffn.router.layer.weight", t);
      } else if (rest == "moe.experts.w_gate") {
        out.emplace_back(B + "ffn.experts.mlp.w1", Tensor::view(t.raw(), {E * F, D}, DType::F32));
      } else if (rest == "moe.experts.w_up") {
        out.emplace_back(B + "ffn.experts.mlp.v1", Tensor::view(t.raw(), {E * F, D}, DType::F32));
      } else if (rest == "moe.experts.w_down") {
        // w2 [E F, D] holds each expert's W_down [D, F] transposed.
        Tensor w2 = Tensor::empty({E * F, D}, DType::F32);
        for (int64_t e = 0; e < E; ++e) {
          const Tensor te = transposed(t.data<float>() + e * D * F, D, F);
          std::memcpy(w2.data<float>() + e * F * D, te.raw(), te.nbytes());
        }
        out.emplace_back(B + "ffn.experts.mlp.w2", w2);
      } else {
        throw_error(kWhere, fmt::format("{} has no dbrx tensor", p.name));
      }
      continue;
    }
    if (const std::string name = layer_name(n, i, rest); !name.empty()) {
      // The shared experts are one MLP there: [1, F, D] here is [F, D] there.
      if (rest.rfind("moe.shared.w_", 0) == 0 && t.ndim() == 3 && t.size(0) == 1)
        out.emplace_back(name, Tensor::view(t.raw(), {t.size(1), t.size(2)}, DType::F32));
      else
        out.emplace_back(name, t);
      continue;
    }
    const std::string M = "model.layers." + std::to_string(i) + "." + n.moe;
    const int64_t E = t.size(0);
    if (model_type == "gpt_oss") {
      // transformers' unquantized layout: gate_up_proj [E, D, 2F] (input rows; gate and up
      // columns interleaved) with its bias [E, 2F], down_proj [E, F, D] and its bias [E, D].
      const auto next = [&] { return grads ? params[pi + 1].grad : params[pi + 1].value; };
      if (rest == "moe.experts.w_gate" || rest == "moe.experts.b_gate") {
        const bool w = rest == "moe.experts.w_gate";
        const Tensor up = next();
        const int64_t F = t.size(1), D = w ? t.size(2) : 1;
        Tensor gu =
            w ? Tensor::empty({E, D, 2 * F}, DType::F32) : Tensor::empty({E, 2 * F}, DType::F32);
        float* o = gu.data<float>();
        for (int64_t e = 0; e < E; ++e)
          for (int64_t f = 0; f < F; ++f)
            for (int64_t d = 0; d < D; ++d) {
              o[(e * D + d) * 2 * F + 2 * f] = t.data<float>()[(e * F + f) * D + d];
              o[(e * D + d) * 2 * F + 2 * f + 1] = up.data<float>()[(e * F + f) * D + d];
            }
        out.emplace_back(M + (w ? "experts.gate_up_proj" : "experts.gate_up_proj_bias"), gu);
      } else if (rest == "moe.experts.w_down") {
        const int64_t D = t.size(1), F = t.size(2);
        Tensor dp = Tensor::empty({E, F, D}, DType::F32);
        for (int64_t e = 0; e < E; ++e)
          for (int64_t d = 0; d < D; ++d)
            for (int64_t f = 0; f < F; ++f)
              dp.data<float>()[(e * F + f) * D + d] = t.data<float>()[(e * D + d) * F + f];
        out.emplace_back(M + "experts.down_proj", dp);
      } else if (rest == "moe.experts.b_down") {
        out.emplace_back(M + "experts.down_proj_bias", t);
      } else if (rest != "moe.experts.w_up" && rest != "moe.experts.b_up") {
        throw_error(kWhere, fmt::format("{} has no gpt_oss tensor", p.name));
      }
      continue;
    }
    if (fused_experts) {
      if (rest == "moe.experts.w_gate") {  // gate_up_proj [E, 2F, D]: gate rows, then up rows
        const Tensor& up = grads ? params[pi + 1].grad : params[pi + 1].value;
        const int64_t FD = shape_numel(Shape(t.shape().begin() + 1, t.shape().end()));
        Tensor gu = Tensor::empty({E, 2 * t.size(1), t.size(2)}, DType::F32);
        for (int64_t e = 0; e < E; ++e) {
          std::memcpy(gu.data<float>() + 2 * e * FD, t.data<float>() + e * FD,
                      static_cast<size_t>(FD) * sizeof(float));
          std::memcpy(gu.data<float>() + (2 * e + 1) * FD, up.data<float>() + e * FD,
                      static_cast<size_t>(FD) * sizeof(float));
        }
        out.emplace_back(M + "experts.gate_up_proj", gu);
      } else if (rest == "moe.experts.w_down") {
        out.emplace_back(M + "experts.down_proj", t);
      } else if (rest != "moe.experts.w_up") {
        throw_error(kWhere, fmt::format("{} has no {} tensor", p.name, model_type));
      }
      continue;
    }
    const char* proj = rest == "moe.experts.w_gate"   ? n.gate.c_str()
                       : rest == "moe.experts.w_up"   ? n.up.c_str()
                       : rest == "moe.experts.w_down" ? n.down.c_str()
                                                      : nullptr;
    MOE_CHECK(proj, kWhere, "{} has no {} tensor", p.name, model_type);
    for (int64_t e = 0; e < E; ++e)
      out.emplace_back(fmt::format("{}experts.{}.{}.weight", M, e, proj), slice(t, e));
  }
  // DeepSeek-V3's MTP modules also carry the embedding and output head they share (the same
  // tensors), which vLLM and SGLang read there.
  for (int64_t k = 0; k < c.mtp_depth; ++k) {
    const std::string L = fmt::format("model.layers.{}.", c.n_layers + k);
    for (NamedParam& p : params) {
      Tensor& t = grads ? p.grad : p.value;
      if (p.name == "embed.weight") out.emplace_back(L + "embed_tokens.weight", t);
      if (p.name == (c.tie_embeddings ? "embed.weight" : "lm_head.weight"))
        out.emplace_back(L + "shared_head.head.weight", t);
    }
  }
  if (!grads) {
    // DeepSeek-V3's selection bias (a buffer, float32 in transformers).
    for (int64_t i = 0, mi = 0; i < c.n_layers + c.mtp_depth; ++i) {
      if (!c.is_moe_layer(i)) continue;
      const std::vector<double>* b =
          model.moe_layers()[static_cast<size_t>(mi++)]->router().selection_bias();
      if (!b) continue;
      Tensor t = Tensor::empty({static_cast<int64_t>(b->size())}, DType::F32);
      for (size_t e = 0; e < b->size(); ++e) t.data<float>()[e] = static_cast<float>((*b)[e]);
      out.emplace_back(fmt::format("model.layers.{}.{}gate.e_score_correction_bias", i, n.moe), t);
    }
  }
  return out;
}

void load_hf_weights(Model& model, const std::string& model_type, HfTensors& src, bool stored) {
  Views views;
  if (model_type == "dbrx") {
    load_dbrx(model, src, stored ? &views : nullptr);
  } else {
    load_llama_like(model, model_type, src, stored ? &views : nullptr);
  }
  for (const auto& [name, t] : views) model.set_weight(name, t);
}

HfOrigin hf_origin(const std::string& dir) {
  HfOrigin o;
  o.dir = dir;
  std::ifstream f(fs::path(dir) / "config.json", std::ios::binary);
  MOE_CHECK(f.good(), kWhere, "cannot read {}/config.json", dir);
  std::ostringstream text;
  text << f.rdbuf();
  o.config_text = text.str();
  json j;
  try {
    j = json::parse(o.config_text);
  } catch (const json::exception& e) {
    throw_error(kWhere, fmt::format("{}/config.json is not valid JSON: {}", dir, e.what()));
  }
  const ModelConfig c = config_from_hf(j);
  o.model_type = j.value("model_type", std::string());
  if (o.model_type != "dbrx") {
    const HfTensors tensors(dir);
    for (int64_t i = 0; i < c.n_layers; ++i)
      if (c.is_moe_layer(i)) {
        o.fused_experts = tensors.has(
            fmt::format("model.layers.{}.{}experts.gate_up_proj", i, names_for(o.model_type).moe));
        break;
      }
  }
  return o;
}

void save_hf_model(Model& model, const HfOrigin& origin, const std::string& dir) {
  fs::create_directories(dir);
  std::string config = origin.config_text;
  const int64_t mtp = model.config().mtp_depth;
  if (mtp > 0 && json::parse(config).value("num_nextn_predict_layers", int64_t{0}) != mtp) {
    // The MTP modules' count, in DeepSeek-V3's key.
    json j = json::parse(config);
    j["num_nextn_predict_layers"] = mtp;
    config = j.dump(2) + "\n";
  }
  if (origin.model_type == "gpt_oss") {
    // The experts are written unquantized (float32): the MXFP4 quantization_config no longer
    // describes them.
    json j = json::parse(config);
    if (j.contains("quantization_config")) {
      j.erase("quantization_config");
      config = j.dump(2) + "\n";
    }
  }
  write_file_atomic((fs::path(dir) / "config.json").string(), config);
  save_safetensors((fs::path(dir) / "model.safetensors").string(),
                   hf_tensors(model, origin.model_type, origin.fused_experts), {{"format", "pt"}});
  for (const char* file : {"generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "tokenizer.model", "special_tokens_map.json"}) {
    const fs::path from = fs::path(origin.dir) / file;
    if (fs::exists(from))
      fs::copy_file(from, fs::path(dir) / file, fs::copy_options::overwrite_existing);
  }
}

}  // namespace moe
