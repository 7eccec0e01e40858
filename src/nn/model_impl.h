// The model's internals (see moe/model.h), shared by model.cpp (parameters, the training
// forward and backward, decoding) and attention.cpp (every attention variant, both ways).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/kernels.h"
#include "moe/model.h"
#include "moe/weights.h"
#include "nn/layers.h"

namespace moe {

struct Param {
  Tensor value, grad;
  bool frozen = false;  // its weight gradient is not computed (Model::set_experts_only)
};

inline Param make_param(const Shape& shape, DType dtype) {
  return {Tensor::zeros(shape, dtype), Tensor::zeros(shape, dtype)};
}

// What one block's forward keeps for its backward (arena pointers; null where the architecture
// has no use for them).
struct BlockSaved {
  void* h_in = nullptr;    // [N, D] residual stream entering the block
  void* h_mid = nullptr;   // [N, D] after the attention residual
  void* a = nullptr;       // [N, D] normalized input of the attention
  void* a_rstd = nullptr;  // [N] (RMSNorm)
  void* f = nullptr;       // [N, D] normalized input of the FFN
  void* f_rstd = nullptr;  // [N] (RMSNorm)
  // Attention: its inputs q [N, H, dk], k [N, KVh, dk] (rotated), v [N, KVh, dv], the
  // probabilities [B, H, T, T] and its output [N, H, dv] before W_o.
  void *q = nullptr, *k = nullptr, *v = nullptr, *probs = nullptr, *att = nullptr;
  // The projections before clip_qkv clamped them [N, .] (DBRX).
  void *q_lin = nullptr, *k_lin = nullptr, *v_lin = nullptr;
  // The q/k norms' inputs and 1/rms (Qwen3-MoE per head, OLMoE over the projection).
  void *q_pre = nullptr, *k_pre = nullptr, *q_rstd = nullptr, *k_rstd = nullptr;
  // Latent attention: the q compression a W_q_a^T before and after its norm [N, q_lora_rank]
  // and 1/rms; the kv compression c before and after its norm [N, kv_lora_rank] and 1/rms.
  void *cq = nullptr, *cqn = nullptr, *cq_rstd = nullptr;
  void *c = nullptr, *cn = nullptr, *c_rstd = nullptr;
};

// Buffers the blocks' backward reuses from block to block, sized for N rows of sequences of Tn.
template <class T>
struct BackwardScratch {
  T *tmp, *dmid, *dq, *dkk, *dvv, *datt, *scratch;
};

// What an MTP module's training forward keeps for its backward (arena pointers): over its Nk =
// B * Tk rows, the previous representation's rows h [Nk, D], the tokens k ahead [Nk], their
// normed embeddings and normed h concatenated [Nk, 2D] with both 1/rms [Nk], the block's output
// [Nk, D], its normed output g [Nk, D] with 1/rms, and d loss / d logits [Nk, V].
struct MtpSaved {
  int64_t Tk = 0;
  int32_t* tokens = nullptr;
  void *h = nullptr, *emb = nullptr, *cat = nullptr, *e_rstd = nullptr, *h_rstd = nullptr;
  void *out = nullptr, *g = nullptr, *g_rstd = nullptr, *dlogits = nullptr;
};

struct Model::Impl {
  ModelConfig cfg;
  DType dtype;
  Param embed, final_norm, lm_head;
  struct Block {
    Param attn_norm, wq, wk, wv, wo, ffn_norm;
    Param b_q, b_k, b_v, q_norm, k_norm;                  // variants (model.h)
    Param wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wkv_b;  // latent attention
    Param sinks, b_o;    // attention sinks [H] and the output projection's bias [D] (gpt-oss)
    int64_t window = 0;  // the sliding window of this layer (0: none)
    MoeOutput moe_out;   // the MoE layer's last output (its vectors reused)
    std::unique_ptr<DenseFfn> dense;
    std::unique_ptr<MoeLayer> moe;
    BlockSaved saved;
  };
  std::vector<Block> blocks;
  // A multi-token prediction module (ModelConfig::mtp_depth): the norms of the embedding and of
  // the previous representation, their projection W_eh [D, 2D], a block, its final norm.
  struct MtpModule {
    Param enorm, hnorm, eh_proj, norm;
    Block block;
    MtpSaved saved;
  };
  std::vector<MtpModule> mtp;
  // The blocks' MoE layers in depth order, then the MTP modules'; the first n_main_moe are the
  // main model's.
  std::vector<MoeLayer*> moe_layers;
  size_t n_main_moe = 0;
  // A block's attention parameters, by their names after "layers.<i>.", in params() order;
  // `matrix`: a weight matrix (weight decay applies; may be kept as stored), or a norm or bias.
  struct BlockParam {
    const char* name;
    Param Block::*member;
    bool matrix;
  };
  static constexpr BlockParam kAttentionParams[] = {{"attn.wq", &Block::wq, true},
                                                    {"attn.wq_a", &Block::wq_a, true},
                                                    {"attn.q_a_norm", &Block::q_a_norm, false},
                                                    {"attn.wq_b", &Block::wq_b, true},
                                                    {"attn.wk", &Block::wk, true},
                                                    {"attn.wv", &Block::wv, true},
                                                    {"attn.wkv_a", &Block::wkv_a, true},
                                                    {"attn.kv_a_norm", &Block::kv_a_norm, false},
                                                    {"attn.wkv_b", &Block::wkv_b, true},
                                                    {"attn.b_q", &Block::b_q, false},
                                                    {"attn.b_k", &Block::b_k, false},
                                                    {"attn.b_v", &Block::b_v, false},
                                                    {"attn.q_norm", &Block::q_norm, false},
                                                    {"attn.k_norm", &Block::k_norm, false},
                                                    {"attn.sinks", &Block::sinks, false},
                                                    {"attn.wo", &Block::wo, true},
                                                    {"attn.b_o", &Block::b_o, false}};
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
  bool stored = false;  // some weights are kept as the checkpoint stores them (Model::set_weight)
  // Where parameter `name` lives (its holder's tensor, in the holder's own shape) and whether it
  // is a weight matrix (may be kept as stored); null when the model has no such tensor.
  Tensor* weight_slot(const std::string& name, bool* matrix);
  static Tensor* block_slot(Block& blk, const std::string& rest, bool* matrix);

  // The embedding rows of tokens [n] into out [n, D]: from a table in T, or (T = float) one kept
  // as stored (bf16, f16), each row widened exactly.
  template <class T>
  void embed_rows(T* out, const int32_t* tokens, int64_t n) const {
    const int64_t D = cfg.d_model;
    if (embed.value.dtype() == dtype_of<T>()) {
      nn::embedding_forward<T>(out, tokens, embed.value.data<T>(), n, D);
    } else if constexpr (std::is_same_v<T, float>) {
      const WeightMatrix w = as_weight(embed.value);
      for (int64_t i = 0; i < n; ++i)
        cpu::weight_rows_f32(w, tokens[i], tokens[i] + 1, out + i * D);
    } else {
      throw_error("model", "a model with weights as stored decodes in float32 only");
    }
  }

  // Block i of the depth (the MTP modules' blocks follow the main ones: n_layers + k).
  Block make_block(int64_t i, bool routed_experts, const dist::ExpertGroups* ep) const {
    const DType dt = dtype;
    const int64_t D = cfg.d_model, hd = cfg.head_size();
    const int64_t H = cfg.n_heads, KV = cfg.n_kv_heads;
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
    if (cfg.attn_sinks) b.sinks = make_param({H}, dt);
    if (cfg.o_bias) b.b_o = make_param({D}, dt);
    b.window = cfg.window_of(i);
    b.ffn_norm = make_param({D}, dt);
    if (cfg.is_moe_layer(i)) {
      b.moe = ep ? std::make_unique<MoeLayer>(cfg.moe, dt, *ep)
                 : std::make_unique<MoeLayer>(cfg.moe, dt, routed_experts);
    } else {
      b.dense = std::make_unique<DenseFfn>(D, cfg.d_ffn, ExpertAct::swiglu, false, dt);
    }
    return b;
  }

  Impl(const ModelConfig& c, DType dt, bool routed_experts, const dist::ExpertGroups* ep = nullptr)
      : cfg(c), dtype(dt) {
    cfg.validate();
    MOE_CHECK(dt == DType::F32 || dt == DType::F64, "model", "dtype must be f32 or f64");
    const int64_t V = cfg.vocab_size, D = cfg.d_model;
    embed = make_param({V, D}, dt);
    for (int64_t i = 0; i < cfg.n_layers; ++i) blocks.push_back(make_block(i, routed_experts, ep));
    for (int64_t k = 0; k < cfg.mtp_depth; ++k) {
      MtpModule m;
      m.enorm = make_param({D}, dt);
      m.hnorm = make_param({D}, dt);
      m.eh_proj = make_param({D, 2 * D}, dt);
      m.block = make_block(cfg.n_layers + k, routed_experts, ep);
      m.norm = make_param({D}, dt);
      mtp.push_back(std::move(m));
    }
    for (Block& b : blocks)
      if (b.moe) moe_layers.push_back(b.moe.get());
    n_main_moe = moe_layers.size();
    if (ep) groups = std::make_shared<const dist::ExpertGroups>(*ep);
    for (MtpModule& m : mtp)
      if (m.block.moe) moe_layers.push_back(m.block.moe.get());
    final_norm = make_param({D}, dt);
    lm_head = cfg.tie_embeddings ? embed : make_param({V, D}, dt);
    name_params();
    const int64_t rd = cfg.rope_dim();
    rope_cos = Tensor::empty({cfg.max_seq_len, rd / 2}, dt);
    rope_sin = Tensor::empty({cfg.max_seq_len, rd / 2}, dt);
    const std::vector<double> inv_freq = cfg.rope_inv_freq();
    const double mscale = cfg.rope_attention_factor();
    if (dt == DType::F64) {
      nn::rope_tables(rope_cos.data<double>(), rope_sin.data<double>(), cfg.max_seq_len, inv_freq,
                      mscale);
    } else {
      nn::rope_tables(rope_cos.data<float>(), rope_sin.data<float>(), cfg.max_seq_len, inv_freq,
                      mscale);
    }
  }

  // The list of parameters (docs/model.md names them), built again when the MoE layers change
  // their tensors (expert parallelism keeps only the local experts).
  void name_params() {
    named.clear();
    named.push_back({"embed.weight", embed.value, embed.grad, true});
    for (int64_t i = 0; i < cfg.n_layers; ++i)
      name_block(blocks[static_cast<size_t>(i)], fmt::format("layers.{}.", i));
    named.push_back({"norm.weight", final_norm.value, final_norm.grad, false});
    if (!cfg.tie_embeddings) named.push_back({"lm_head.weight", lm_head.value, lm_head.grad, true});
    // The MTP modules as DeepSeek-V3 numbers them: layers n_layers + k.
    for (size_t k = 0; k < mtp.size(); ++k) {
      MtpModule& m = mtp[k];
      const std::string p = fmt::format("layers.{}.", cfg.n_layers + static_cast<int64_t>(k));
      named.push_back({p + "enorm.weight", m.enorm.value, m.enorm.grad, false});
      named.push_back({p + "hnorm.weight", m.hnorm.value, m.hnorm.grad, false});
      named.push_back({p + "eh_proj.weight", m.eh_proj.value, m.eh_proj.grad, true});
      name_block(m.block, p);
      named.push_back({p + "shared_head.norm.weight", m.norm.value, m.norm.grad, false});
    }
  }

  // A block's parameters, named p + "attn_norm.weight" and so on.
  void name_block(Block& b, const std::string& p) {
    named.push_back({p + "attn_norm.weight", b.attn_norm.value, b.attn_norm.grad, false});
    for (const BlockParam& a : kAttentionParams) {
      Param& q = b.*a.member;
      if (q.value.defined()) named.push_back({p + a.name, q.value, q.grad, a.matrix});
    }
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

  // A cache of `layers` blocks' keys and values.
  KvCache make_cache(int64_t slots, int64_t capacity, int64_t layers) const {
    KvCache c;
    c.slots = slots;
    c.capacity = capacity;
    c.length.assign(static_cast<size_t>(slots), 0);
    for (int64_t i = 0; i < layers; ++i) {
      c.k.push_back(Tensor::zeros({slots, capacity, kv_heads(), key_dim()}, dtype));
      c.v.push_back(Tensor::zeros({slots, capacity, kv_heads(), value_dim()}, dtype));
    }
    return c;
  }

  // Attention widths: heads of keys and values, key (and query) and value width per head.
  int64_t kv_heads() const { return cfg.mla() ? cfg.n_heads : cfg.n_kv_heads; }
  int64_t key_dim() const {
    return cfg.mla() ? cfg.qk_nope_dim + cfg.qk_rope_dim : cfg.head_size();
  }
  int64_t value_dim() const { return cfg.mla() ? cfg.v_head_dim : cfg.head_size(); }

  // The block's normalization (RMSNorm or LayerNorm) of n rows; rstd [n] receives RMSNorm's
  // 1/rms (unused by LayerNorm, whose backward recomputes its statistics).
  template <class T>
  void norm_forward(T* out, T* rstd, const T* x, const Param& g, int64_t n) const;
  template <class T>
  void norm_backward(T* dx, Param& g, const T* dout, const T* x, const T* rstd, int64_t n) const;

  // The joint balancing loss (ModelConfig::joint_aux_loss_coef) of the MoE layers' last
  // forward (n tokens each), added to out.aux_loss; with backward, each MoE layer's gradient of
  // it (times scale) with respect to its router logits [n, E], in the arena, in depth order.
  template <class T>
  T** joint_aux(ModelOutput& out, int64_t n, bool backward, double scale, Arena& arena);

  // Attention (src/nn/attention.cpp). q, k, v of the block's attention for a [N, D] at
  // positions pos [N]; with `saved`, what qkv_backward needs is kept there (in the arena).
  template <class T>
  void qkv_forward(Block& blk, const T* a, int64_t n, const int64_t* pos, T* q, T* k, T* v,
                   Arena& arena, BlockSaved* saved);
  // dq, dk, dv (gradients of the rotated q, k and v; overwritten) -> da [N, D] (written) and
  // the projections' parameter gradients.
  template <class T>
  void qkv_backward(Block& blk, const T* a, int64_t n, const int64_t* pos, T* dq, T* dk, T* dv,
                    T* da, Arena& arena, const BlockSaved& saved);

  template <class T>
  // routing (when given) receives each MoE layer's losses, statistics and plan, as the training
  // forward reports them.
  Tensor decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits,
                ModelOutput* routing = nullptr, Model::LogitRows rows = Model::LogitRows::all,
                Tensor* hidden = nullptr);
  // An MoE block's layer at inference (no training noise, whatever its mode).
  MoeOutput moe_inference(Block& blk, const Tensor& a, Arena& arena) {
    const bool was = blk.moe->training();
    blk.moe->set_training(false);
    MoeOutput mo = blk.moe->forward(a, arena);
    blk.moe->set_training(was);
    return mo;
  }
  // MTP module `module`'s inference step (Model::mtp_decode).
  template <class T>
  Tensor mtp_decode(int64_t module, const Tensor& hidden, const Tensor& tokens, KvCache& cache,
                    Arena& arena, Tensor* hidden_out);
  template <class T>
  void attention_step(Block& blk, const T* a, int64_t B, int64_t Tq, const int64_t* pos,
                      const int64_t* slot, const int64_t* start, Tensor& kc, Tensor& vc,
                      int64_t cap, T* out, Arena& arena);

  // One block's training forward over h [B*Tn, D] at positions pos (what its backward needs is
  // kept in blk.saved); returns the block's output. MoE layers report into out's entry mi, which
  // moves on.
  template <class T>
  T* block_forward(Block& blk, T* h, int64_t B, int64_t Tn, const int64_t* pos, Arena& arena,
                   ModelOutput& out, size_t& mi);
  template <class T>
  BackwardScratch<T> backward_scratch(int64_t N, int64_t Tn, Arena& arena) const;
  // dh [B*Tn, D]: d loss / d the block's output in, d loss / d its input out; the parameters'
  // gradients accumulate. mi moves back over MoE layers (joint_dlogits: the joint balancing
  // loss's router-logit gradients, by MoE index).
  template <class T>
  void block_backward(Block& blk, T* dh, int64_t B, int64_t Tn, const int64_t* pos,
                      const BackwardScratch<T>& sc, Arena& arena, double scale, T** joint_dlogits,
                      size_t& mi);

  // The MTP modules' training forward (src/nn/mtp.cpp) over the main model's normed final
  // representation z [B*Tn, D] of tokens [B, T1]: out.mtp_ce and out.mtp_loss; with
  // `backward`, d loss / d logits kept, times scale.
  template <class T>
  void mtp_forward(const int32_t* tok, int64_t B, int64_t T1, int64_t Tn, const T* z, Arena& arena,
                   bool backward, double scale, ModelOutput& out, size_t& mi);
  // Their backward: the modules' gradients, and d loss / d z added into dz [B*Tn, D].
  template <class T>
  void mtp_backward(int64_t B, int64_t Tn, T* dz, const BackwardScratch<T>& sc, Arena& arena,
                    double scale, size_t& mi);

  // tokens [B, T+1] (or [B, T] when targets are not needed) -> loss, and optionally gradients.
  template <class T>
  void run(const Tensor& tokens, Arena& arena, bool backward, double scale, ModelOutput& out,
           const SoftTargets* soft);
};

}  // namespace moe
