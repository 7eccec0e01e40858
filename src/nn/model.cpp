// The transformer language model (see moe/model.h and docs/model.md): parameters, and the
// forward and backward of the whole network over one batch.
#include "moe/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "moe/kernels.h"
#include "nn/layers.h"

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
  MOE_CHECK(q_lora_rank >= 0 && kv_lora_rank >= 0, w,
            "q_lora_rank and kv_lora_rank must be >= 0, got {} and {}", q_lora_rank, kv_lora_rank);
  if (mla()) {
    MOE_CHECK(qk_nope_dim >= 0 && qk_rope_dim >= 2 && v_head_dim >= 1, w,
              "latent attention needs qk_nope_dim >= 0, qk_rope_dim >= 2 and v_head_dim >= 1, got "
              "{}, {}, {}",
              qk_nope_dim, qk_rope_dim, v_head_dim);
    MOE_CHECK(!qkv_bias && qk_norm == QkNorm::none && clip_qkv == 0, w,
              "latent attention takes no qkv_bias, qk_norm or clip_qkv");
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
  MOE_CHECK(std::isfinite(norm_eps) && norm_eps > 0, w, "norm_eps must be > 0, got {}", norm_eps);
  MOE_CHECK(moe_every >= 0 && first_dense >= 0, w,
            "moe_every and first_dense must be >= 0, got {} and {}", moe_every, first_dense);
  MOE_CHECK(std::isfinite(init_std) && init_std > 0, w, "init_std must be > 0, got {}", init_std);
  bool any_dense = false, any_moe = false;
  for (int64_t i = 0; i < n_layers; ++i) (is_moe_layer(i) ? any_moe : any_dense) = true;
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

bool ModelConfig::trainable() const {
  return norm == NormKind::rms && !qkv_bias && qk_norm == QkNorm::none && clip_qkv == 0 &&
         sliding_window == 0 && !mla() && !rope_interleave;
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
  if (c.mla()) {
    j["q_lora_rank"] = c.q_lora_rank;
    j["kv_lora_rank"] = c.kv_lora_rank;
    j["qk_nope_dim"] = c.qk_nope_dim;
    j["qk_rope_dim"] = c.qk_rope_dim;
    j["v_head_dim"] = c.v_head_dim;
  }
  if (c.rope_interleave) j["rope_interleave"] = true;
}

void from_json(const nlohmann::json& j, ModelConfig& c) {
  MOE_CHECK(j.is_object(), "model.config", "expected a JSON object, got {}", j.type_name());
  static const char* const keys[] = {
      "vocab_size",     "d_model",        "n_layers",     "n_heads",     "n_kv_heads",
      "head_dim",       "d_ffn",          "max_seq_len",  "rope_theta",  "norm_eps",
      "tie_embeddings", "moe_every",      "first_dense",  "init_std",    "moe",
      "dense_layers",   "norm",           "qkv_bias",     "qk_norm",     "clip_qkv",
      "sliding_window", "q_lora_rank",    "kv_lora_rank", "qk_nope_dim", "qk_rope_dim",
      "v_head_dim",     "rope_interleave"};
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    MOE_CHECK(std::find_if(std::begin(keys), std::end(keys),
                           [&](const char* k) { return key == k; }) != std::end(keys),
              "model.config", "unknown key '{}'", key);
  }
  try {
    c = ModelConfig{};
    c.vocab_size = j.value("vocab_size", c.vocab_size);
    c.d_model = j.value("d_model", c.d_model);
    c.n_layers = j.value("n_layers", c.n_layers);
    c.n_heads = j.value("n_heads", c.n_heads);
    c.n_kv_heads = j.value("n_kv_heads", c.n_heads);
    c.head_dim = j.value("head_dim", c.head_dim);
    c.d_ffn = j.value("d_ffn", c.d_ffn);
    c.max_seq_len = j.value("max_seq_len", c.max_seq_len);
    c.rope_theta = j.value("rope_theta", c.rope_theta);
    c.norm_eps = j.value("norm_eps", c.norm_eps);
    c.tie_embeddings = j.value("tie_embeddings", c.tie_embeddings);
    c.moe_every = j.value("moe_every", c.moe_every);
    c.first_dense = j.value("first_dense", c.first_dense);
    c.init_std = j.value("init_std", c.init_std);
    if (j.contains("moe")) c.moe = j.at("moe").get<MoeConfig>();
    c.dense_layers = j.value("dense_layers", c.dense_layers);
    if (j.contains("norm")) {
      const std::string n = j.at("norm").get<std::string>();
      MOE_CHECK(n == "rms" || n == "layer", "model.config", "norm must be rms or layer, got '{}'",
                n);
      c.norm = j.at("norm").get<NormKind>();
    }
    if (j.contains("qk_norm")) {
      const std::string n = j.at("qk_norm").get<std::string>();
      MOE_CHECK(n == "none" || n == "head" || n == "full", "model.config",
                "qk_norm must be none, head or full, got '{}'", n);
      c.qk_norm = j.at("qk_norm").get<QkNorm>();
    }
    c.qkv_bias = j.value("qkv_bias", c.qkv_bias);
    c.clip_qkv = j.value("clip_qkv", c.clip_qkv);
    c.sliding_window = j.value("sliding_window", c.sliding_window);
    c.q_lora_rank = j.value("q_lora_rank", c.q_lora_rank);
    c.kv_lora_rank = j.value("kv_lora_rank", c.kv_lora_rank);
    c.qk_nope_dim = j.value("qk_nope_dim", c.qk_nope_dim);
    c.qk_rope_dim = j.value("qk_rope_dim", c.qk_rope_dim);
    c.v_head_dim = j.value("v_head_dim", c.v_head_dim);
    c.rope_interleave = j.value("rope_interleave", c.rope_interleave);
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
  const int64_t mats = m.act == ExpertAct::swiglu ? 3 : 2;
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
  }
  for (int64_t i = 0; i < c.n_layers; ++i) {
    n.attention += attention;
    if (!c.is_moe_layer(i)) {
      n.dense_ffn += 3 * D * c.d_ffn;
      continue;
    }
    const int64_t bias = m.expert_bias ? (mats - 1) * m.d_ffn + D : 0;
    const int64_t expert = mats * D * m.d_ffn + bias;
    const int64_t sbias = m.expert_bias ? (mats - 1) * m.shared_width() + D : 0;
    n.routed_experts += m.n_experts * expert;
    active_experts += m.top_k * expert;
    n.shared_experts += m.n_shared * (mats * D * m.shared_width() + sbias);
    n.router += make_router(m)->logit_rows() * D + (m.shared_gate ? D : 0);
  }
  const int64_t common =
      n.embedding + n.norms + n.attention + n.dense_ffn + n.shared_experts + n.router;
  n.total = common + n.routed_experts;
  n.active = common + active_experts;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Model

namespace {

struct Param {
  Tensor value, grad;
};

Param make_param(const Shape& shape, DType dtype) {
  return {Tensor::zeros(shape, dtype), Tensor::zeros(shape, dtype)};
}

// What one block's forward keeps for its backward (arena pointers).
struct BlockSaved {
  void* h_in = nullptr;    // [N, D] residual stream entering the block
  void* h_mid = nullptr;   // [N, D] after the attention residual
  void* a = nullptr;       // [N, D] normalized input of the attention
  void* a_rstd = nullptr;  // [N]
  void* q = nullptr;       // [N, H, hd] rotated
  void* k = nullptr;       // [N, KV, hd] rotated
  void* v = nullptr;       // [N, KV, hd]
  void* probs = nullptr;   // [B, H, T, T]
  void* att = nullptr;     // [N, H, hd] attention output before W_o
  void* f = nullptr;       // [N, D] normalized input of the FFN
  void* f_rstd = nullptr;  // [N]
};

}  // namespace

struct Model::Impl {
  ModelConfig cfg;
  DType dtype;
  Param embed, final_norm, lm_head;
  struct Block {
    Param attn_norm, wq, wk, wv, wo, ffn_norm;
    Param b_q, b_k, b_v, q_norm, k_norm;                  // variants (model.h)
    Param wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wkv_b;  // latent attention
    MoeOutput moe_out;  // the MoE layer's last output (its vectors reused)
    std::unique_ptr<DenseFfn> dense;
    std::unique_ptr<MoeLayer> moe;
    BlockSaved saved;
  };
  std::vector<Block> blocks;
  std::vector<MoeLayer*> moe_layers;  // the blocks' MoE layers, in depth order
  // Expert parallelism: the ranks that share the batch and hold the experts (null: none).
  std::shared_ptr<const dist::ExpertGroups> groups;
  // Expert offloading: where the routed experts come from (null: the layers hold them).
  std::shared_ptr<ExpertSource> source;

  // Read-ahead for offloaded experts: a guess at the experts MoE block `next` will use, from
  // its router applied to the current layer's MoE input a [n, D] (the next layer's input is
  // not known yet; the residual stream changes little from one layer to the next).
  template <class T>
  void guess_next_experts(const T* a, int64_t n, size_t next, int64_t next_index, Arena& arena) {
    MoeLayer& m = *blocks[next].moe;
    const int64_t E = cfg.moe.n_experts, K = cfg.moe.top_k, D = cfg.d_model;
    if (m.router().logit_rows() != E) return;
    T* logits = arena.alloc<T>(n * E);
    cpu::gemm<T>(false, true, n, E, D, T(1), a, D, m.params().w_router.data<T>(), D, T(0), logits,
                 E);
    int32_t* top = arena.alloc<int32_t>(n * K);
    T* val = arena.alloc<T>(n * K);
    cpu::topk_rows<T>(top, val, logits, n, E, K);
    std::vector<int64_t> experts;
    for (int64_t i = 0; i < n * K; ++i)
      if (std::find(experts.begin(), experts.end(), top[i]) == experts.end())
        experts.push_back(top[i]);
    source->prefetch(next_index, experts);
  }
  std::vector<NamedParam> named;
  Tensor rope_cos, rope_sin;  // [max_seq_len, hd / 2]

  Impl(const ModelConfig& c, DType dt, bool routed_experts) : cfg(c), dtype(dt) {
    cfg.validate();
    MOE_CHECK(dt == DType::F32 || dt == DType::F64, "model", "dtype must be f32 or f64");
    const int64_t V = cfg.vocab_size, D = cfg.d_model, hd = cfg.head_size();
    const int64_t H = cfg.n_heads, KV = cfg.n_kv_heads;
    embed = make_param({V, D}, dt);
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      Block b;
      b.attn_norm = make_param({D}, dt);
      if (cfg.mla()) {
        const int64_t qk = cfg.qk_nope_dim + cfg.qk_rope_dim, r = cfg.q_lora_rank;
        if (r > 0) {
          b.wq_a = make_param({r, D}, dt);
          b.q_a_norm = make_param({r}, dt);
          b.wq_b = make_param({H * qk, r}, dt);
        } else {
          b.wq = make_param({H * qk, D}, dt);
        }
        b.wkv_a = make_param({cfg.kv_lora_rank + cfg.qk_rope_dim, D}, dt);
        b.kv_a_norm = make_param({cfg.kv_lora_rank}, dt);
        b.wkv_b = make_param({H * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank}, dt);
        b.wo = make_param({D, H * cfg.v_head_dim}, dt);
      } else {
        b.wq = make_param({H * hd, D}, dt);
        b.wk = make_param({KV * hd, D}, dt);
        b.wv = make_param({KV * hd, D}, dt);
        b.wo = make_param({D, H * hd}, dt);
        if (cfg.qkv_bias) {
          b.b_q = make_param({H * hd}, dt);
          b.b_k = make_param({KV * hd}, dt);
          b.b_v = make_param({KV * hd}, dt);
        }
        if (cfg.qk_norm != QkNorm::none) {
          const bool full = cfg.qk_norm == QkNorm::full;
          b.q_norm = make_param({full ? H * hd : hd}, dt);
          b.k_norm = make_param({full ? KV * hd : hd}, dt);
        }
      }
      b.ffn_norm = make_param({D}, dt);
      if (cfg.is_moe_layer(i)) {
        b.moe = std::make_unique<MoeLayer>(cfg.moe, dt, routed_experts);
      } else {
        b.dense = std::make_unique<DenseFfn>(D, cfg.d_ffn, ExpertAct::swiglu, false, dt);
      }
      blocks.push_back(std::move(b));
    }
    for (Block& b : blocks)
      if (b.moe) moe_layers.push_back(b.moe.get());
    final_norm = make_param({D}, dt);
    lm_head = cfg.tie_embeddings ? embed : make_param({V, D}, dt);
    name_params();
    const int64_t rd = cfg.rope_dim();
    rope_cos = Tensor::empty({cfg.max_seq_len, rd / 2}, dt);
    rope_sin = Tensor::empty({cfg.max_seq_len, rd / 2}, dt);
    if (dt == DType::F64) {
      nn::rope_tables(rope_cos.data<double>(), rope_sin.data<double>(), cfg.max_seq_len, rd,
                      cfg.rope_theta);
    } else {
      nn::rope_tables(rope_cos.data<float>(), rope_sin.data<float>(), cfg.max_seq_len, rd,
                      cfg.rope_theta);
    }
  }

  // The list of parameters (docs/model.md names them), built again when the MoE layers change
  // their tensors (expert parallelism keeps only the local experts).
  void name_params() {
    named.clear();
    named.push_back({"embed.weight", embed.value, embed.grad, true});
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      Block& b = blocks[static_cast<size_t>(i)];
      const std::string p = fmt::format("layers.{}.", i);
      named.push_back({p + "attn_norm.weight", b.attn_norm.value, b.attn_norm.grad, false});
      auto add = [&](const char* name, Param& q, bool decay) {
        if (q.value.defined()) named.push_back({p + name, q.value, q.grad, decay});
      };
      add("attn.wq", b.wq, true);
      add("attn.wq_a", b.wq_a, true);
      add("attn.q_a_norm", b.q_a_norm, false);
      add("attn.wq_b", b.wq_b, true);
      add("attn.wk", b.wk, true);
      add("attn.wv", b.wv, true);
      add("attn.wkv_a", b.wkv_a, true);
      add("attn.kv_a_norm", b.kv_a_norm, false);
      add("attn.wkv_b", b.wkv_b, true);
      add("attn.b_q", b.b_q, false);
      add("attn.b_k", b.b_k, false);
      add("attn.b_v", b.b_v, false);
      add("attn.q_norm", b.q_norm, false);
      add("attn.k_norm", b.k_norm, false);
      add("attn.wo", b.wo, true);
      named.push_back({p + "ffn_norm.weight", b.ffn_norm.value, b.ffn_norm.grad, false});
      if (b.moe) {
        std::vector<Tensor> grads;
        b.moe->grads().for_each([&](const std::string&, Tensor& t) { grads.push_back(t); });
        size_t k = 0;
        b.moe->params().for_each([&](const std::string& n, Tensor& t) {
          const bool routed = n.rfind("experts.", 0) == 0;
          if (routed && t.size(0) == 0) return;  // held elsewhere (offloading)
          named.push_back(
              {p + "moe." + n, t, grads[k++], true, routed, routed ? b.moe->first_expert() : 0});
        });
      } else {
        // The dense FFN stores its weights as one expert, [1, F, D]: expose them as [F, D].
        auto view = [](Tensor& t) {
          Shape s(t.shape().begin() + 1, t.shape().end());
          return Tensor::view(t.raw(), s, t.dtype());
        };
        ExpertWeights& w = b.dense->params();
        ExpertWeights& g = b.dense->grads();
        named.push_back({p + "ffn.w_gate", view(w.w_gate), view(g.w_gate), true});
        named.push_back({p + "ffn.w_up", view(w.w_up), view(g.w_up), true});
        named.push_back({p + "ffn.w_down", view(w.w_down), view(g.w_down), true});
      }
    }
    named.push_back({"norm.weight", final_norm.value, final_norm.grad, false});
    if (!cfg.tie_embeddings) named.push_back({"lm_head.weight", lm_head.value, lm_head.grad, true});
  }

  template <class T>
  // routing (when given) receives each MoE layer's losses, statistics and plan, as the training
  // forward reports them.
  Tensor decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits,
                ModelOutput* routing = nullptr);
  template <class T>
  void attention_step(Block& blk, const T* a, int64_t B, int64_t Tq, const int64_t* pos,
                      const int64_t* slot, const int64_t* start, Tensor& kc, Tensor& vc,
                      int64_t cap, T* out, Arena& arena);

  // tokens [B, T+1] (or [B, T] when targets are not needed) -> loss, and optionally gradients.
  template <class T>
  void run(const Tensor& tokens, Arena& arena, bool backward, double scale, ModelOutput& out);
};

template <class T>
void Model::Impl::run(const Tensor& tokens, Arena& arena, bool backward, double scale,
                      ModelOutput& out) {
  const char* w = "model";
  MOE_CHECK(
      cfg.trainable(), w,
      "training covers RMSNorm, rotary grouped-query attention and SwiGLU/MoE layers; this "
      "model uses variants (LayerNorm, qkv bias, q/k norm, clipping, sliding window or latent "
      "attention) that run in inference only for now");
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32, w,
            "tokens must be i32[B, T+1], got {}", tokens.str());
  const int64_t B = tokens.size(0), T1 = tokens.size(1);
  const int64_t Tn = T1 - 1;
  MOE_CHECK(B >= 1 && Tn >= 1, w, "need at least one sequence of two tokens, got {}", tokens.str());
  MOE_CHECK(Tn <= cfg.max_seq_len, w, "sequence length {} exceeds max_seq_len = {}", Tn,
            cfg.max_seq_len);
  const int64_t V = cfg.vocab_size, D = cfg.d_model, H = cfg.n_heads, KV = cfg.n_kv_heads;
  const int64_t hd = cfg.head_size(), N = B * Tn;
  const int32_t* tok = tokens.data<int32_t>();
  int32_t* inputs = arena.alloc<int32_t>(N);
  int32_t* targets = arena.alloc<int32_t>(N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      const int32_t x = tok[b * T1 + t];
      MOE_CHECK(x >= 0 && x < V, w, "token {} at [{}, {}] is outside the vocabulary [0, {})", x, b,
                t, V);
      inputs[b * Tn + t] = x;
      const int32_t y = tok[b * T1 + t + 1];
      MOE_CHECK(y >= 0 && y < V, w, "token {} at [{}, {}] is outside the vocabulary [0, {})", y, b,
                t + 1, V);
      targets[b * Tn + t] = y;
    }
  const T* cosp = rope_cos.data<T>();
  const T* sinp = rope_sin.data<T>();

  // Forward. `out` keeps its vectors' capacity: one entry per MoE layer, assigned in place.
  const size_t n_moe = moe_layers.size();
  out.loss = out.ce_loss = out.aux_loss = out.z_loss = 0;
  out.routing.resize(n_moe);
  out.plan_offsets.resize(n_moe);
  out.plan_experts.resize(n_moe);
  out.top_expert.resize(n_moe);
  size_t mi = 0;
  T* h = arena.alloc<T>(N * D);
  nn::embedding_forward<T>(h, inputs, embed.value.data<T>(), N, D);
  for (Block& blk : blocks) {
    BlockSaved& s = blk.saved;
    s.h_in = h;
    T* a = arena.alloc<T>(N * D);
    T* a_rstd = arena.alloc<T>(N);
    nn::rmsnorm_forward<T>(a, a_rstd, h, blk.attn_norm.value.data<T>(), N, D, cfg.norm_eps);
    T* q = arena.alloc<T>(N * H * hd);
    T* k = arena.alloc<T>(N * KV * hd);
    T* v = arena.alloc<T>(N * KV * hd);
    cpu::gemm<T>(false, true, N, H * hd, D, T(1), a, D, blk.wq.value.data<T>(), D, T(0), q, H * hd);
    cpu::gemm<T>(false, true, N, KV * hd, D, T(1), a, D, blk.wk.value.data<T>(), D, T(0), k,
                 KV * hd);
    cpu::gemm<T>(false, true, N, KV * hd, D, T(1), a, D, blk.wv.value.data<T>(), D, T(0), v,
                 KV * hd);
    nn::rope_apply<T>(q, cosp, sinp, B, Tn, H, hd, false);
    nn::rope_apply<T>(k, cosp, sinp, B, Tn, KV, hd, false);
    T* probs = arena.alloc<T>(B * H * Tn * Tn);
    T* att = arena.alloc<T>(N * H * hd);
    nn::attention_forward<T>(att, probs, q, k, v, B, Tn, H, KV, hd);
    T* h_mid = arena.alloc<T>(N * D);
    std::memcpy(h_mid, h, static_cast<size_t>(N * D) * sizeof(T));
    cpu::gemm<T>(false, true, N, D, H * hd, T(1), att, H * hd, blk.wo.value.data<T>(), H * hd, T(1),
                 h_mid, D);
    T* f = arena.alloc<T>(N * D);
    T* f_rstd = arena.alloc<T>(N);
    nn::rmsnorm_forward<T>(f, f_rstd, h_mid, blk.ffn_norm.value.data<T>(), N, D, cfg.norm_eps);
    Tensor ft = Tensor::view(f, {N, D}, dtype_of<T>());
    Tensor y;
    if (blk.moe) {
      MoeOutput& mo = blk.moe_out;
      blk.moe->forward(ft, arena, mo);
      out.aux_loss += mo.aux_loss;
      out.z_loss += mo.z_loss;
      out.routing[mi] = mo.stats;
      out.plan_offsets[mi] = mo.plan_offsets;
      out.plan_experts[mi] = mo.plan_experts;
      out.top_expert[mi] = mo.top_expert;
      ++mi;
      y = mo.y;
    } else {
      y = blk.dense->forward(ft, arena);
    }
    T* h_out = arena.alloc<T>(N * D);
    const T* yp = y.data<T>();
    for (int64_t i = 0; i < N * D; ++i) h_out[i] = h_mid[i] + yp[i];
    s = {h, h_mid, a, a_rstd, q, k, v, probs, att, f, f_rstd};
    h = h_out;
  }
  T* z = arena.alloc<T>(N * D);
  T* z_rstd = arena.alloc<T>(N);
  nn::rmsnorm_forward<T>(z, z_rstd, h, final_norm.value.data<T>(), N, D, cfg.norm_eps);
  Tensor logits = arena.tensor({B, Tn, V}, dtype_of<T>());
  T* lg = logits.data<T>();
  cpu::gemm<T>(false, true, N, V, D, T(1), z, D, lm_head.value.data<T>(), D, T(0), lg, V);
  T* dlogits = backward ? arena.alloc<T>(N * V) : nullptr;
  if (groups) {
    // This rank holds N of the batch's tokens: the loss is the mean over all of them.
    const double nd = static_cast<double>(N), n_all = groups->world.sum(nd);
    const double ce = nn::cross_entropy<T>(dlogits, arena.alloc<double>(N), lg, targets, N, V,
                                           scale * nd / n_all);
    out.ce_loss = groups->world.sum(ce * nd) / n_all;
  } else {
    out.ce_loss = nn::cross_entropy<T>(dlogits, arena.alloc<double>(N), lg, targets, N, V, scale);
  }
  out.loss = out.ce_loss + out.aux_loss + out.z_loss;
  if (!backward) return;

  // Backward.
  T* dz = arena.alloc<T>(N * D);
  cpu::gemm<T>(true, false, V, D, N, T(1), dlogits, V, z, D, T(1), lm_head.grad.data<T>(), D);
  cpu::gemm<T>(false, false, N, D, V, T(1), dlogits, V, lm_head.value.data<T>(), D, T(0), dz, D);
  T* dh = arena.alloc<T>(N * D);
  nn::rmsnorm_backward<T>(dh, final_norm.grad.data<T>(), dz, h, final_norm.value.data<T>(), z_rstd,
                          N, D);
  T* tmp = arena.alloc<T>(N * D);
  T* dq = arena.alloc<T>(N * H * hd);
  T* dk = arena.alloc<T>(N * KV * hd);
  T* dv = arena.alloc<T>(N * KV * hd);
  T* datt = arena.alloc<T>(N * H * hd);
  T* scratch = arena.alloc<T>(static_cast<int64_t>(omp_get_max_threads()) * 2 * Tn * Tn);
  Tensor dh_t = Tensor::view(dh, {N, D}, dtype_of<T>());
  Tensor df_t = Tensor::view(tmp, {N, D}, dtype_of<T>());
  for (size_t li = blocks.size(); li-- > 0;) {
    Block& blk = blocks[li];
    BlockSaved& s = blk.saved;
    // h_out = h_mid + FFN(RMSNorm(h_mid)).
    if (blk.moe) {
      blk.moe->backward(dh_t, df_t, arena, scale, scale);
    } else {
      blk.dense->backward(dh_t, df_t, arena);
    }
    T* dmid = arena.alloc<T>(N * D);
    nn::rmsnorm_backward<T>(dmid, blk.ffn_norm.grad.data<T>(), tmp, static_cast<T*>(s.h_mid),
                            blk.ffn_norm.value.data<T>(), static_cast<T*>(s.f_rstd), N, D);
    for (int64_t i = 0; i < N * D; ++i) dh[i] += dmid[i];
    // h_mid = h_in + att W_o^T.
    cpu::gemm<T>(true, false, D, H * hd, N, T(1), dh, D, static_cast<T*>(s.att), H * hd, T(1),
                 blk.wo.grad.data<T>(), H * hd);
    cpu::gemm<T>(false, false, N, H * hd, D, T(1), dh, D, blk.wo.value.data<T>(), H * hd, T(0),
                 datt, H * hd);
    nn::attention_backward<T>(dq, dk, dv, scratch, datt, static_cast<T*>(s.q), static_cast<T*>(s.k),
                              static_cast<T*>(s.v), static_cast<T*>(s.probs), B, Tn, H, KV, hd);
    nn::rope_apply<T>(dq, cosp, sinp, B, Tn, H, hd, true);
    nn::rope_apply<T>(dk, cosp, sinp, B, Tn, KV, hd, true);
    const T* a = static_cast<T*>(s.a);
    cpu::gemm<T>(true, false, H * hd, D, N, T(1), dq, H * hd, a, D, T(1), blk.wq.grad.data<T>(), D);
    cpu::gemm<T>(true, false, KV * hd, D, N, T(1), dk, KV * hd, a, D, T(1), blk.wk.grad.data<T>(),
                 D);
    cpu::gemm<T>(true, false, KV * hd, D, N, T(1), dv, KV * hd, a, D, T(1), blk.wv.grad.data<T>(),
                 D);
    cpu::gemm<T>(false, false, N, D, H * hd, T(1), dq, H * hd, blk.wq.value.data<T>(), D, T(0), tmp,
                 D);
    cpu::gemm<T>(false, false, N, D, KV * hd, T(1), dk, KV * hd, blk.wk.value.data<T>(), D, T(1),
                 tmp, D);
    cpu::gemm<T>(false, false, N, D, KV * hd, T(1), dv, KV * hd, blk.wv.value.data<T>(), D, T(1),
                 tmp, D);
    nn::rmsnorm_backward<T>(dmid, blk.attn_norm.grad.data<T>(), tmp, static_cast<T*>(s.h_in),
                            blk.attn_norm.value.data<T>(), static_cast<T*>(s.a_rstd), N, D);
    for (int64_t i = 0; i < N * D; ++i) dh[i] += dmid[i];
  }
  nn::embedding_backward<T>(embed.grad.data<T>(), dh, inputs, N, D);
}

// ---------------------------------------------------------------------------------------------
// Inference with a key/value cache

namespace {

// y [n, d] = x [n, k] W^T (+ b).
template <class T>
void linear(T* y, const T* x, const Tensor& w, const Tensor* b, int64_t n) {
  const int64_t d = w.size(0), k = w.size(1);
  cpu::gemm<T>(false, true, n, d, k, T(1), x, k, w.data<T>(), k, T(0), y, d);
  if (b && b->defined()) {
    const T* bp = b->data<T>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) y[i * d + j] += bp[j];
  }
}

// RMSNorm of n rows of width d in place.
template <class T>
void rmsnorm_inplace(T* x, const T* g, int64_t n, int64_t d, double eps, Arena& arena) {
  T* rstd = arena.alloc<T>(n);
  nn::rmsnorm_forward<T>(x, rstd, x, g, n, d, eps);
}

}  // namespace

template <class T>
void Model::Impl::attention_step(Block& blk, const T* a, int64_t B, int64_t Tq, const int64_t* pos,
                                 const int64_t* slot, const int64_t* start, Tensor& kc, Tensor& vc,
                                 int64_t cap, T* out, Arena& arena) {
  const int64_t N = B * Tq, H = cfg.n_heads;
  const int64_t KVh = kc.size(2), dk = kc.size(3), dv = vc.size(3);
  const T* cosp = rope_cos.data<T>();
  const T* sinp = rope_sin.data<T>();
  T* q = arena.alloc<T>(N * H * dk);
  T* k = arena.alloc<T>(N * KVh * dk);
  T* v = arena.alloc<T>(N * KVh * dv);
  double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  if (cfg.mla()) {
    // DeepSeek-V2 (DeepSeek-AI 2024, section 2.1): q from x or from its low-rank compression;
    // [c_kv, k_rope] = x W_kv_a^T; [k_nope, v] per head = RMSNorm(c_kv) W_kv_b^T.
    const int64_t nope = cfg.qk_nope_dim, rd = cfg.qk_rope_dim, r = cfg.kv_lora_rank;
    if (cfg.q_lora_rank > 0) {
      T* cq = arena.alloc<T>(N * cfg.q_lora_rank);
      linear<T>(cq, a, blk.wq_a.value, nullptr, N);
      rmsnorm_inplace<T>(cq, blk.q_a_norm.value.data<T>(), N, cfg.q_lora_rank, cfg.norm_eps, arena);
      linear<T>(q, cq, blk.wq_b.value, nullptr, N);
    } else {
      linear<T>(q, a, blk.wq.value, nullptr, N);
    }
    T* ckv = arena.alloc<T>(N * (r + rd));
    linear<T>(ckv, a, blk.wkv_a.value, nullptr, N);
    T* c = arena.alloc<T>(N * r);
    for (int64_t i = 0; i < N; ++i)
      std::memcpy(c + i * r, ckv + i * (r + rd), static_cast<size_t>(r) * sizeof(T));
    rmsnorm_inplace<T>(c, blk.kv_a_norm.value.data<T>(), N, r, cfg.norm_eps, arena);
    T* kvb = arena.alloc<T>(N * H * (nope + dv));
    linear<T>(kvb, c, blk.wkv_b.value, nullptr, N);
    nn::rope_at<T>(ckv, cosp, sinp, pos, N, 1, r + rd, r, rd, cfg.rope_interleave);
    nn::rope_at<T>(q, cosp, sinp, pos, N, H, dk, nope, rd, cfg.rope_interleave);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t hh = 0; hh < H; ++hh) {
        const T* src = kvb + (i * H + hh) * (nope + dv);
        T* kd = k + (i * H + hh) * dk;
        std::memcpy(kd, src, static_cast<size_t>(nope) * sizeof(T));
        std::memcpy(kd + nope, ckv + i * (r + rd) + r, static_cast<size_t>(rd) * sizeof(T));
        std::memcpy(v + (i * H + hh) * dv, src + nope, static_cast<size_t>(dv) * sizeof(T));
      }
  } else {
    linear<T>(q, a, blk.wq.value, &blk.b_q.value, N);
    linear<T>(k, a, blk.wk.value, &blk.b_k.value, N);
    linear<T>(v, a, blk.wv.value, &blk.b_v.value, N);
    if (cfg.clip_qkv > 0) {
      const T c = static_cast<T>(cfg.clip_qkv);
      for (T* p : {q, k, v}) {
        const int64_t n = N * (p == q ? H : KVh) * dk;
        for (int64_t i = 0; i < n; ++i) p[i] = std::clamp(p[i], -c, c);
      }
    }
    if (cfg.qk_norm == QkNorm::full) {
      rmsnorm_inplace<T>(q, blk.q_norm.value.data<T>(), N, H * dk, cfg.norm_eps, arena);
      rmsnorm_inplace<T>(k, blk.k_norm.value.data<T>(), N, KVh * dk, cfg.norm_eps, arena);
    } else if (cfg.qk_norm == QkNorm::head) {
      rmsnorm_inplace<T>(q, blk.q_norm.value.data<T>(), N * H, dk, cfg.norm_eps, arena);
      rmsnorm_inplace<T>(k, blk.k_norm.value.data<T>(), N * KVh, dk, cfg.norm_eps, arena);
    }
    nn::rope_at<T>(q, cosp, sinp, pos, N, H, dk, 0, dk, cfg.rope_interleave);
    nn::rope_at<T>(k, cosp, sinp, pos, N, KVh, dk, 0, dk, cfg.rope_interleave);
  }
  // Append the new keys and values to the cache, then attend.
  T* kcp = kc.data<T>();
  T* vcp = vc.data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tq; ++t) {
      const int64_t row = (slot[b] * cap + start[b] + t) * KVh;
      std::memcpy(kcp + row * dk, k + (b * Tq + t) * KVh * dk,
                  static_cast<size_t>(KVh * dk) * sizeof(T));
      std::memcpy(vcp + row * dv, v + (b * Tq + t) * KVh * dv,
                  static_cast<size_t>(KVh * dv) * sizeof(T));
    }
  T* att = arena.alloc<T>(N * H * dv);
  nn::attention_cached<T>(att, q, kcp, vcp, slot, start, B, Tq, H, KVh, dk, dv, cap,
                          cfg.sliding_window, scale);
  linear<T>(out, att, blk.wo.value, nullptr, N);
}

template <class T>
Tensor Model::Impl::decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                           const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits,
                           ModelOutput* routing) {
  const char* w = "model.decode";
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32, w,
            "tokens must be i32[B, T], got {}", tokens.str());
  const int64_t B = tokens.size(0), Tq = tokens.size(1), N = B * Tq;
  const int64_t V = cfg.vocab_size, D = cfg.d_model;
  MOE_CHECK(B >= 1 && Tq >= 1, w, "need at least one token, got {}", tokens.str());
  MOE_CHECK(cache.k.size() == blocks.size() && cache.v.size() == blocks.size(), w,
            "the cache was not made by this model");
  MOE_CHECK(slots.empty() || static_cast<int64_t>(slots.size()) == B, w,
            "{} slots for {} sequences", slots.size(), B);
  int64_t* slot = arena.alloc<int64_t>(B);
  int64_t* start = arena.alloc<int64_t>(B);
  int64_t* pos = arena.alloc<int64_t>(N);
  for (int64_t b = 0; b < B; ++b) {
    slot[b] = slots.empty() ? b : slots[static_cast<size_t>(b)];
    MOE_CHECK(slot[b] >= 0 && slot[b] < cache.slots, w, "slot {} is outside the cache's {} slots",
              slot[b], cache.slots);
    for (int64_t c = 0; c < b; ++c)
      MOE_CHECK(slot[c] != slot[b], w, "slot {} is given twice", slot[b]);
    start[b] = cache.length[static_cast<size_t>(slot[b])];
    MOE_CHECK(start[b] + Tq <= cache.capacity, w,
              "sequence in slot {} would reach {} positions, beyond the cache's {}", slot[b],
              start[b] + Tq, cache.capacity);
    for (int64_t t = 0; t < Tq; ++t) pos[b * Tq + t] = start[b] + t;
  }
  const int32_t* tok = tokens.data<int32_t>();
  for (int64_t i = 0; i < N; ++i)
    MOE_CHECK(tok[i] >= 0 && tok[i] < V, w,
              "token {} at [{}, {}] is outside the vocabulary [0, {})", tok[i], i / Tq, i % Tq, V);
  auto norm = [&](T* out, const T* x, const Param& g, int64_t n) {
    if (cfg.norm == NormKind::layer) {
      nn::layernorm_forward<T>(out, x, g.value.data<T>(), n, D, cfg.norm_eps);
    } else {
      T* rstd = arena.alloc<T>(n);
      nn::rmsnorm_forward<T>(out, rstd, x, g.value.data<T>(), n, D, cfg.norm_eps);
    }
  };
  T* h = arena.alloc<T>(N * D);
  nn::embedding_forward<T>(h, tok, embed.value.data<T>(), N, D);
  T* a = arena.alloc<T>(N * D);
  T* o = arena.alloc<T>(N * D);
  if (router_logits) router_logits->clear();
  if (routing) {
    const size_t n_moe = moe_layers.size();
    routing->aux_loss = routing->z_loss = 0;
    routing->routing.resize(n_moe);
    routing->plan_offsets.resize(n_moe);
    routing->plan_experts.resize(n_moe);
    routing->top_expert.resize(n_moe);
  }
  size_t mi = 0;
  for (size_t li = 0; li < blocks.size(); ++li) {
    Block& blk = blocks[li];
    norm(a, h, blk.attn_norm, N);
    attention_step<T>(blk, a, B, Tq, pos, slot, start, cache.k[li], cache.v[li], cache.capacity, o,
                      arena);
    for (int64_t i = 0; i < N * D; ++i) h[i] += o[i];
    norm(a, h, blk.ffn_norm, N);
    const Tensor at = Tensor::view(a, {N, D}, dtype_of<T>());
    Tensor y;
    if (blk.moe) {
      if (source && source->wants_prefetch())
        for (size_t next = li + 1; next < blocks.size(); ++next)
          if (blocks[next].moe) {
            guess_next_experts<T>(a, N, next, static_cast<int64_t>(mi) + 1, arena);
            break;
          }
      const bool was = blk.moe->training();
      blk.moe->set_training(false);
      MoeOutput mo = blk.moe->forward(at, arena);
      blk.moe->set_training(was);
      if (router_logits) router_logits->push_back(mo.router_logits);
      if (routing) {
        routing->aux_loss += mo.aux_loss;
        routing->z_loss += mo.z_loss;
        routing->routing[mi] = mo.stats;
        routing->plan_offsets[mi] = mo.plan_offsets;
        routing->plan_experts[mi] = mo.plan_experts;
        routing->top_expert[mi] = mo.top_expert;
      }
      ++mi;
      y = mo.y;
    } else {
      y = blk.dense->forward(at, arena);
    }
    const T* yp = y.data<T>();
    for (int64_t i = 0; i < N * D; ++i) h[i] += yp[i];
  }
  for (int64_t b = 0; b < B; ++b) cache.length[static_cast<size_t>(slot[b])] += Tq;
  norm(a, h, final_norm, N);
  Tensor logits = arena.tensor({B, Tq, V}, dtype_of<T>());
  cpu::gemm<T>(false, true, N, V, D, T(1), a, D, lm_head.value.data<T>(), D, T(0), logits.data<T>(),
               V);
  return logits;
}

KvCache Model::make_cache(int64_t slots, int64_t capacity) const {
  MOE_CHECK(slots >= 1 && capacity >= 1 && capacity <= cfg_.max_seq_len, "model.cache",
            "need slots >= 1 and capacity in [1, max_seq_len = {}], got {} and {}",
            cfg_.max_seq_len, slots, capacity);
  KvCache c;
  c.slots = slots;
  c.capacity = capacity;
  c.length.assign(static_cast<size_t>(slots), 0);
  const int64_t H = cfg_.n_heads;
  const int64_t heads = cfg_.mla() ? H : cfg_.n_kv_heads;
  const int64_t dk = cfg_.mla() ? cfg_.qk_nope_dim + cfg_.qk_rope_dim : cfg_.head_size();
  const int64_t dv = cfg_.mla() ? cfg_.v_head_dim : cfg_.head_size();
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    c.k.push_back(Tensor::zeros({slots, capacity, heads, dk}, impl_->dtype));
    c.v.push_back(Tensor::zeros({slots, capacity, heads, dv}, impl_->dtype));
  }
  return c;
}

Tensor Model::decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                     const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits) {
  return impl_->dtype == DType::F64
             ? impl_->decode<double>(tokens, cache, arena, slots, router_logits)
             : impl_->decode<float>(tokens, cache, arena, slots, router_logits);
}

Model::Model(const ModelConfig& cfg, DType dtype, bool routed_experts)
    : cfg_(cfg), impl_(std::make_unique<Impl>(cfg, dtype, routed_experts)) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

DType Model::dtype() const { return impl_->dtype; }
std::vector<NamedParam>& Model::params() { return impl_->named; }

int64_t Model::n_params() const {
  int64_t n = 0;
  for (const NamedParam& p : impl_->named) n += p.value.numel();
  return n;
}

void Model::init(Rng& rng) {
  for (NamedParam& p : impl_->named) {
    if (p.name.find("norm") != std::string::npos) {
      p.value.fill(1.0);
    } else if (p.name.find(".b_") != std::string::npos) {
      p.value.fill(0.0);
    } else {
      rng.fill_normal(p.value, 0, cfg_.init_std);
    }
  }
  for (MoeLayer* m : moe_layers()) {
    Rng stream(rng.next_u64());
    // Seeds the layer's routing noise stream without touching its weights.
    m->reseed_noise(stream.next_u64());
  }
}

void Model::zero_grad() {
  for (NamedParam& p : impl_->named) p.grad.fill(0.0);
}

void Model::set_training(bool training) {
  for (MoeLayer* m : moe_layers()) m->set_training(training);
}

const std::vector<MoeLayer*>& Model::moe_layers() { return impl_->moe_layers; }

void Model::set_expert_parallel(const dist::ExpertGroups& groups) {
  MOE_CHECK(!impl_->groups, "model", "the model is already split over ranks");
  for (MoeLayer* m : impl_->moe_layers) m->set_expert_parallel(groups);
  impl_->groups = std::make_shared<const dist::ExpertGroups>(groups);
  impl_->name_params();
}

const dist::ExpertGroups* Model::expert_parallel() const { return impl_->groups.get(); }

void Model::set_expert_source(const std::shared_ptr<ExpertSource>& source) {
  for (size_t i = 0; i < impl_->moe_layers.size(); ++i)
    impl_->moe_layers[i]->set_expert_source(source, static_cast<int64_t>(i));
  impl_->source = source;
  impl_->name_params();
}

ExpertView Model::expert(int64_t layer, int64_t e) {
  MOE_CHECK(layer >= 0 && layer < cfg_.n_layers && impl_->blocks[static_cast<size_t>(layer)].moe,
            "model", "layer {} is not an MoE layer", layer);
  return impl_->blocks[static_cast<size_t>(layer)].moe->expert(e);
}

ModelOutput Model::forward(const Tensor& tokens, Arena& arena) {
  if (!cfg_.trainable()) {
    // Architecture variants: the loss from the inference path (cross-entropy only).
    MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32 && tokens.size(1) >= 2, "model",
              "tokens must be i32[B, T+1] with T >= 1, got {}", tokens.str());
    const int64_t B = tokens.size(0), T = tokens.size(1) - 1, V = cfg_.vocab_size;
    Tensor inputs = Tensor::empty({B, T}, DType::I32);
    Tensor targets = Tensor::empty({B * T}, DType::I32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        inputs.data<int32_t>()[b * T + t] = tokens.data<int32_t>()[b * (T + 1) + t];
        const int32_t y = tokens.data<int32_t>()[b * (T + 1) + t + 1];
        MOE_CHECK(y >= 0 && y < V, "model",
                  "token {} at [{}, {}] is outside the vocabulary [0, {})", y, b, t + 1, V);
        targets.data<int32_t>()[b * T + t] = y;
      }
    // The routing too, as the training forward reports it (moe inspect reads it).
    ModelOutput out;
    KvCache cache = make_cache(B, T);
    const Tensor logits = impl_->dtype == DType::F64
                              ? impl_->decode<double>(inputs, cache, arena, {}, nullptr, &out)
                              : impl_->decode<float>(inputs, cache, arena, {}, nullptr, &out);
    out.ce_loss =
        impl_->dtype == DType::F64
            ? nn::cross_entropy<double>(nullptr, arena.alloc<double>(B * T), logits.data<double>(),
                                        targets.data<int32_t>(), B * T, V, 1)
            : nn::cross_entropy<float>(nullptr, arena.alloc<double>(B * T), logits.data<float>(),
                                       targets.data<int32_t>(), B * T, V, 1);
    out.loss = out.ce_loss + out.aux_loss + out.z_loss;
    return out;
  }
  ModelOutput out;
  if (impl_->dtype == DType::F64) {
    impl_->run<double>(tokens, arena, false, 1, out);
  } else {
    impl_->run<float>(tokens, arena, false, 1, out);
  }
  return out;
}

void Model::forward_backward(const Tensor& tokens, Arena& arena, double grad_scale,
                             ModelOutput& out) {
  if (impl_->dtype == DType::F64) {
    impl_->run<double>(tokens, arena, true, grad_scale, out);
  } else {
    impl_->run<float>(tokens, arena, true, grad_scale, out);
  }
}

ModelOutput Model::forward_backward(const Tensor& tokens, Arena& arena, double grad_scale) {
  ModelOutput out;
  forward_backward(tokens, arena, grad_scale, out);
  return out;
}

Tensor Model::logits(const Tensor& tokens, Arena& arena, std::vector<Tensor>* router_logits) {
  MOE_CHECK(tokens.ndim() == 2, "model", "tokens must be i32[B, T], got {}", tokens.str());
  KvCache cache = make_cache(tokens.size(0), std::max<int64_t>(1, tokens.size(1)));
  return decode(tokens, cache, arena, {}, router_logits);
}

}  // namespace moe
