// The transformer language model (see moe/model.h and docs/model.md): parameters, and the
// forward and backward of the whole network over one batch.
#include "moe/model.h"

#include <omp.h>

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
  MOE_CHECK(head_size() % 2 == 0, w, "the head size must be even for rotary embeddings, got {}",
            head_size());
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
}

void from_json(const nlohmann::json& j, ModelConfig& c) {
  MOE_CHECK(j.is_object(), "model.config", "expected a JSON object, got {}", j.type_name());
  const nlohmann::json defaults = ModelConfig{};
  for (const auto& [key, value] : j.items())
    MOE_CHECK(defaults.contains(key), "model.config", "unknown key '{}'", key);
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
  for (int64_t i = 0; i < c.n_layers; ++i) {
    n.attention += D * hd * (2 * c.n_heads + 2 * c.n_kv_heads);
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
    std::unique_ptr<DenseFfn> dense;
    std::unique_ptr<MoeLayer> moe;
    BlockSaved saved;
  };
  std::vector<Block> blocks;
  std::vector<NamedParam> named;
  Tensor rope_cos, rope_sin;  // [max_seq_len, hd / 2]

  Impl(const ModelConfig& c, DType dt) : cfg(c), dtype(dt) {
    cfg.validate();
    MOE_CHECK(dt == DType::F32 || dt == DType::F64, "model", "dtype must be f32 or f64");
    const int64_t V = cfg.vocab_size, D = cfg.d_model, hd = cfg.head_size();
    const int64_t H = cfg.n_heads, KV = cfg.n_kv_heads;
    embed = make_param({V, D}, dt);
    named.push_back({"embed.weight", embed.value, embed.grad, true});
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      Block b;
      b.attn_norm = make_param({D}, dt);
      b.wq = make_param({H * hd, D}, dt);
      b.wk = make_param({KV * hd, D}, dt);
      b.wv = make_param({KV * hd, D}, dt);
      b.wo = make_param({D, H * hd}, dt);
      b.ffn_norm = make_param({D}, dt);
      if (cfg.is_moe_layer(i)) {
        b.moe = std::make_unique<MoeLayer>(cfg.moe, dt);
      } else {
        b.dense = std::make_unique<DenseFfn>(D, cfg.d_ffn, ExpertAct::swiglu, false, dt);
      }
      blocks.push_back(std::move(b));
    }
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      Block& b = blocks[static_cast<size_t>(i)];
      const std::string p = fmt::format("layers.{}.", i);
      named.push_back({p + "attn_norm.weight", b.attn_norm.value, b.attn_norm.grad, false});
      named.push_back({p + "attn.wq", b.wq.value, b.wq.grad, true});
      named.push_back({p + "attn.wk", b.wk.value, b.wk.grad, true});
      named.push_back({p + "attn.wv", b.wv.value, b.wv.grad, true});
      named.push_back({p + "attn.wo", b.wo.value, b.wo.grad, true});
      named.push_back({p + "ffn_norm.weight", b.ffn_norm.value, b.ffn_norm.grad, false});
      if (b.moe) {
        std::vector<Tensor> grads;
        b.moe->grads().for_each([&](const std::string&, Tensor& t) { grads.push_back(t); });
        size_t k = 0;
        b.moe->params().for_each([&](const std::string& n, Tensor& t) {
          named.push_back({p + "moe." + n, t, grads[k++], true});
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
    final_norm = make_param({D}, dt);
    named.push_back({"norm.weight", final_norm.value, final_norm.grad, false});
    if (!cfg.tie_embeddings) {
      lm_head = make_param({V, D}, dt);
      named.push_back({"lm_head.weight", lm_head.value, lm_head.grad, true});
    } else {
      lm_head = embed;
    }
    rope_cos = Tensor::empty({cfg.max_seq_len, hd / 2}, dt);
    rope_sin = Tensor::empty({cfg.max_seq_len, hd / 2}, dt);
    if (dt == DType::F64) {
      nn::rope_tables(rope_cos.data<double>(), rope_sin.data<double>(), cfg.max_seq_len, hd,
                      cfg.rope_theta);
    } else {
      nn::rope_tables(rope_cos.data<float>(), rope_sin.data<float>(), cfg.max_seq_len, hd,
                      cfg.rope_theta);
    }
  }

  // tokens [B, T+1] (or [B, T] when targets are not needed) -> loss, and optionally gradients.
  template <class T>
  ModelOutput run(const Tensor& tokens, Arena& arena, bool with_targets, bool backward,
                  double scale, Tensor* logits_out);
};

template <class T>
ModelOutput Model::Impl::run(const Tensor& tokens, Arena& arena, bool with_targets, bool backward,
                             double scale, Tensor* logits_out) {
  const char* w = "model";
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32, w,
            "tokens must be i32[B, T{}], got {}", with_targets ? "+1" : "", tokens.str());
  const int64_t B = tokens.size(0), T1 = tokens.size(1);
  const int64_t Tn = with_targets ? T1 - 1 : T1;
  MOE_CHECK(B >= 1 && Tn >= 1, w, "need at least one sequence of {} tokens, got {}",
            with_targets ? "two" : "one", tokens.str());
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
      if (with_targets) {
        const int32_t y = tok[b * T1 + t + 1];
        MOE_CHECK(y >= 0 && y < V, w, "token {} at [{}, {}] is outside the vocabulary [0, {})", y,
                  b, t + 1, V);
        targets[b * Tn + t] = y;
      }
    }
  const T* cosp = rope_cos.data<T>();
  const T* sinp = rope_sin.data<T>();

  // Forward.
  ModelOutput out;
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
      MoeOutput mo = blk.moe->forward(ft, arena);
      out.aux_loss += mo.aux_loss;
      out.z_loss += mo.z_loss;
      out.routing.push_back(mo.stats);
      out.plan_offsets.push_back(mo.plan_offsets);
      out.plan_experts.push_back(mo.plan_experts);
      out.top_expert.push_back(mo.top_expert);
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
  if (logits_out) *logits_out = logits;
  if (!with_targets) return out;
  T* dlogits = backward ? arena.alloc<T>(N * V) : nullptr;
  out.ce_loss = nn::cross_entropy<T>(dlogits, lg, targets, N, V, scale);
  out.loss = out.ce_loss + out.aux_loss + out.z_loss;
  if (!backward) return out;

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
  return out;
}

Model::Model(const ModelConfig& cfg, DType dtype)
    : cfg_(cfg), impl_(std::make_unique<Impl>(cfg, dtype)) {}
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

std::vector<MoeLayer*> Model::moe_layers() {
  std::vector<MoeLayer*> out;
  for (auto& b : impl_->blocks)
    if (b.moe) out.push_back(b.moe.get());
  return out;
}

ModelOutput Model::forward(const Tensor& tokens, Arena& arena) {
  return impl_->dtype == DType::F64 ? impl_->run<double>(tokens, arena, true, false, 1, nullptr)
                                    : impl_->run<float>(tokens, arena, true, false, 1, nullptr);
}

ModelOutput Model::forward_backward(const Tensor& tokens, Arena& arena, double grad_scale) {
  return impl_->dtype == DType::F64
             ? impl_->run<double>(tokens, arena, true, true, grad_scale, nullptr)
             : impl_->run<float>(tokens, arena, true, true, grad_scale, nullptr);
}

Tensor Model::logits(const Tensor& tokens, Arena& arena) {
  Tensor out;
  if (impl_->dtype == DType::F64) {
    impl_->run<double>(tokens, arena, false, false, 1, &out);
  } else {
    impl_->run<float>(tokens, arena, false, false, 1, &out);
  }
  return out;
}

}  // namespace moe
