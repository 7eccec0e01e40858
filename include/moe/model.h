// moe/model.h: a decoder-only transformer language model whose feed-forward layers are dense
// SwiGLU FFNs or MoE layers, forward and backward (docs/model.md has the equations).
//
// tokens [B, T+1] -> loss: the model reads tokens[:, :T] and predicts tokens[:, 1:]. Per layer:
//   h = h + Attention(RMSNorm(h)),  h = h + FFN(RMSNorm(h))
// with rotary position embeddings and grouped KV heads in the attention; then a final RMSNorm
// and the output head (tied to the embedding or not). The loss is the mean cross-entropy plus
// the MoE layers' balancing and z-losses.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "moe/arena.h"
#include "moe/dense_ffn.h"
#include "moe/moe_layer.h"

namespace moe {

// The normalization of every block and of the final layer.
enum class NormKind { rms, layer };  // RMSNorm, or LayerNorm without bias (DBRX)
// Normalization of the queries and keys before the rotary embedding.
enum class QkNorm {
  none,
  head,  // RMSNorm over each head's hd values, one weight [hd] shared by the heads (Qwen3-MoE)
  full,  // RMSNorm over the whole projection, weights [H*hd] and [KV*hd] (OLMoE)
};

// Rotary embeddings stretched to a longer context by YaRN (Peng et al. 2023, "YaRN: Efficient
// Context Window Extension of Large Language Models", section 3; transformers'
// _compute_yarn_parameters): each rotated pair's frequency blends the original one (fast pairs,
// over beta_fast turns in the original context) with one divided by `factor` (slow pairs, under
// beta_slow turns), linearly in between; cos and sin are multiplied by the attention factor.
struct RopeScaling {
  double factor = 1.0;       // 1: no scaling
  int64_t original_max = 0;  // the context the model was trained with (0: max_seq_len)
  double beta_fast = 32, beta_slow = 1;
  double attention_factor = 0;  // 0: 0.1 ln(factor) + 1
  bool truncate = true;         // round the blended range out to whole pairs
  bool yarn() const { return factor != 1.0; }
};

struct ModelConfig {
  int64_t vocab_size = 0;   // V
  int64_t d_model = 0;      // D
  int64_t n_layers = 0;     // L
  int64_t n_heads = 0;      // H
  int64_t n_kv_heads = 0;   // KV heads (grouped-query attention); H must be a multiple
  int64_t head_dim = 0;     // 0: D / H
  int64_t d_ffn = 0;        // width of the dense SwiGLU FFNs
  int64_t max_seq_len = 0;  // longest sequence (rotary tables)
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  // The attention scores' scale is attn_scale_mult / sqrt(key width) (DeepSeek's YaRN multiplies
  // it by mscale^2).
  double attn_scale_mult = 1.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  // Which layers are MoE: layer i (from 0) when i >= first_dense and (i + 1) % moe_every == 0.
  // moe_every = 0 means no MoE layer (a dense model).
  int64_t moe_every = 1;
  int64_t first_dense = 0;
  std::vector<int64_t> dense_layers;  // layers that are dense whatever the rule (Qwen2-MoE)
  MoeConfig moe;                      // its d_model must equal d_model
  double init_std = 0.02;

  // Variants of the published architectures (docs/model.md); the defaults are the project's.
  NormKind norm = NormKind::rms;
  bool qkv_bias = false;  // biases on the q, k, v projections (Qwen2-MoE)
  QkNorm qk_norm = QkNorm::none;
  double clip_qkv = 0;         // clamp q, k and v to [-c, c] (DBRX); 0: off
  int64_t sliding_window = 0;  // attend to the last W positions only (Mistral); 0: all
  // The layers the sliding window applies to (gpt-oss: every other one); empty: all of them.
  std::vector<int64_t> window_layers;
  // Attention sinks (gpt-oss): a learned logit per head joins each query's softmax as a key
  // with no value, so a head can attend to nothing.
  bool attn_sinks = false;
  bool o_bias = false;  // a bias on the output projection (gpt-oss)
  // Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: keys and values come
  // from a rank-kv_lora_rank compression of the input; each head's query and key are a
  // qk_nope_dim part without and a qk_rope_dim part with rotary embedding (the latter's key
  // shared by all heads); values are v_head_dim wide; queries go through a rank-q_lora_rank
  // compression when q_lora_rank > 0.
  int64_t q_lora_rank = 0;
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_dim = 0;
  int64_t qk_rope_dim = 0;
  int64_t v_head_dim = 0;
  bool rope_interleave = false;  // rotate (x0, x1), (x2, x3), ... instead of the two halves
  // transformers' load_balancing_loss_func (Mixtral, Qwen2/3-MoE, OLMoE, DBRX): one balancing
  // loss over the tokens of all MoE layers together, coef * E * sum_e f_e P_e, f_e the fraction
  // of (layer, token) rows whose top k hold e and P_e the mean router probability of e over
  // those rows (docs/routing.md). When > 0, the MoE layers' own aux_loss_coef must be 0 and the
  // router topk.
  double joint_aux_loss_coef = 0;
  // The training loss as transformers computes it given labels = input_ids: the network runs
  // over all T+1 tokens of each sequence (the last predicts nothing but is routed, so the
  // balancing loss covers it) instead of the first T. Set for HuggingFace checkpoints.
  bool transformers_loss = false;
  // Multi-token prediction (DeepSeek-V3, Liu et al. 2024, section 2.2): mtp_depth sequential
  // modules after the main model, module k (from 1) predicting the token k + 1 ahead from the
  // previous module's representation (the main model's, after the final norm, for k = 1) and the
  // embedding of the token k ahead: h' = W_eh [RMSNorm(emb); RMSNorm(h)], one transformer block
  // (block index n_layers + k - 1 for the dense/MoE rule), its own final norm, and the model's
  // output head. The training loss adds mtp_weight * mean_k(cross-entropy of module k).
  int64_t mtp_depth = 0;
  double mtp_weight = 0.3;  // lambda: the paper's for its first 10T tokens

  int64_t head_size() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  bool mla() const { return kv_lora_rank > 0; }
  // The rotated width of a query or key head.
  int64_t rope_dim() const { return mla() ? qk_rope_dim : head_size(); }
  bool is_moe_layer(int64_t i) const;
  // The rotated pairs' frequencies (rope_theta^(-2i/rd), YaRN applied) and the factor cos and
  // sin are multiplied by.
  std::vector<double> rope_inv_freq() const;
  double rope_attention_factor() const;
  // The sliding window of layer i (0: none).
  int64_t window_of(int64_t i) const;
  // The longest T of the training sequences of T + 1 tokens (transformers_loss runs all of them).
  int64_t max_train_len() const { return transformers_loss ? max_seq_len - 1 : max_seq_len; }
  // True when the model uses any of the variants above (LayerNorm, qkv biases, q/k norms,
  // clipping, a sliding window, sinks, an output bias, latent attention or interleaved rotary
  // pairs).
  bool uses_variants() const;
  void validate() const;
};

void to_json(nlohmann::json& j, const ModelConfig& c);
void from_json(const nlohmann::json& j, ModelConfig& c);

// Parameter counts computed from the config alone (no weights are allocated), so that they work
// for models of any size. Active = the parameters one token touches: everything but the routed
// experts, plus top_k of each MoE layer's routed experts; the embedding and the output head are
// counted in full (as Mixtral's published 12.9B active is).
struct ParamCount {
  int64_t total = 0;
  int64_t active = 0;
  int64_t embedding = 0;       // embedding + untied output head
  int64_t attention = 0;       // all layers
  int64_t dense_ffn = 0;       // all dense layers
  int64_t routed_experts = 0;  // all MoE layers
  int64_t shared_experts = 0;  // all MoE layers
  int64_t router = 0;          // all MoE layers
  int64_t norms = 0;
  int64_t mtp = 0;  // the MTP modules (in total, not in active: they serve training and drafts)
};
ParamCount count_params(const ModelConfig& cfg);

// A named parameter and its gradient buffer.
struct NamedParam {
  std::string name;
  Tensor value;
  Tensor grad;
  bool decay;                // weight decay applies (not to norms)
  bool routed = false;       // a routed expert tensor [E, ...] (split under expert parallelism)
  int64_t first_expert = 0;  // routed: the expert of its row 0 (this rank's first when split)
};

// Distillation (Switch Transformer, Fedus et al. 2021, section 5): a teacher's logits for the
// predicted positions, [B, T, V] for tokens [B, T+1], in the model's dtype. Each position's
// target becomes (1 - weight) onehot(next token) + weight softmax(teacher logits), so the loss's
// cross-entropy term is (1 - weight) ce_loss + weight soft_loss (docs/model.md).
struct SoftTargets {
  Tensor logits;
  double weight = 0.25;  // the paper's: 0.25 of the teacher's probabilities, 0.75 of the label
};

struct ModelOutput {
  double loss = 0;     // cross-entropy (mixed with soft_loss when distilling) + aux + z
  double ce_loss = 0;  // mean cross-entropy over the predicted tokens
  // With soft targets, the mean cross-entropy against the teacher's distributions
  // (-sum_j p_teacher,j log p_j); 0 without.
  double soft_loss = 0;
  double aux_loss = 0;  // sum over MoE layers
  double z_loss = 0;    // sum over MoE layers
  // With MTP modules: the mean over modules of their cross-entropies (the loss adds mtp_weight
  // times it), and each module's.
  double mtp_loss = 0;
  std::vector<double> mtp_ce;
  std::vector<RoutingStats> routing;  // one per MoE layer (the MTP modules' last)
  // Per MoE layer, in the arena: which experts each of the B*T tokens went to, with what
  // weights (MoeOutput's plan_offsets, plan_experts, plan_weights and top_expert).
  std::vector<Tensor> plan_offsets, plan_experts, plan_weights, top_expert;
};

// Keys and values of the positions already run, for incremental decoding: per layer, k
// [slots, capacity, heads, dk] and v [slots, capacity, heads, dv]; slot s holds length[s]
// positions of one sequence.
struct KvCache {
  int64_t slots = 0, capacity = 0;
  std::vector<int64_t> length;
  std::vector<Tensor> k, v;
};

class Model {
 public:
  // routed_experts false: no memory for the routed experts (see set_expert_source).
  explicit Model(const ModelConfig& cfg, DType dtype = DType::F32, bool routed_experts = true);
  // A model split over expert-parallel ranks from the start (set_expert_parallel): each MoE layer
  // allocates this rank's experts only, and init() gives them the values a whole model's init()
  // gives those experts.
  Model(const ModelConfig& cfg, DType dtype, const dist::ExpertGroups& groups);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  DType dtype() const;
  // Every parameter with its gradient, in a fixed order (names follow docs/model.md).
  std::vector<NamedParam>& params();
  int64_t n_params() const;

  void init(Rng& rng);
  void zero_grad();
  void set_training(bool training);
  // Fine-tuning only the experts: the backward skips the weight gradients of the embedding, the
  // output head and the attention projections (they stay zero); the gradients that flow to the
  // inputs, and every expert's, are unchanged.
  void set_experts_only(bool on);
  // The MoE layers, in depth order (for router state and statistics).
  const std::vector<MoeLayer*>& moe_layers();
  // Expert parallelism (docs/distributed.md): every MoE layer keeps only its local experts
  // (MoeLayer's set_expert_parallel) and params() lists those; the batch is spread over
  // groups.world, so forward and forward_backward report the losses of the whole batch (their
  // cross-entropy averages over every rank's tokens) and this rank's share of each gradient,
  // which the ranks then sum. Call after init() or loading (or construct the model split).
  void set_expert_parallel(const dist::ExpertGroups& groups);
  const dist::ExpertGroups* expert_parallel() const;
  // Expert offloading (inference): every MoE layer's routed experts come from `source`
  // (MoeLayer::set_expert_source, the layers numbered in depth order); params() then lists the
  // other tensors only.
  void set_expert_source(const std::shared_ptr<ExpertSource>& source);
  // Routed expert e of layer `layer` (a layer index of the model, which must be an MoE layer;
  // n_layers + k is MTP module k + 1's block): views of its weights.
  ExpertView expert(int64_t layer, int64_t e);
  // Replaces parameter `name` (as params() names it) by t, which the model then computes from
  // as it is: same number of elements and the same trailing dimensions, dtype the model's or, for
  // the weight matrices of float32 models (embedding, output head, attention projections, experts,
  // dense FFN), bf16 or f16 as a checkpoint stores them (a view of its mapped file, say). A model
  // holding such weights runs inference only. The parameter's old memory is released.
  void set_weight(const std::string& name, const Tensor& t);
  // Whether parameter `name` is a weight matrix that set_weight may take as stored.
  bool is_weight_matrix(const std::string& name);
  // Whether some weights are kept in a stored format (set_weight).
  bool weights_stored() const;

  // tokens i32 [B, T+1] -> loss. With backward, accumulates every parameter gradient of the
  // loss (scaled by grad_scale, e.g. 1 / accumulation steps). `soft` (may be null) mixes a
  // teacher's distributions into the targets.
  ModelOutput forward(const Tensor& tokens, Arena& arena, const SoftTargets* soft = nullptr);
  ModelOutput forward_backward(const Tensor& tokens, Arena& arena, double grad_scale = 1.0,
                               const SoftTargets* soft = nullptr);
  // The same, filling `out` in place: its vectors keep their capacity from call to call, so the
  // steady-state training step allocates nothing.
  void forward_backward(const Tensor& tokens, Arena& arena, double grad_scale, ModelOutput& out,
                        const SoftTargets* soft = nullptr);
  // logits [B, T, V] for tokens i32 [B, T] (no loss), in the arena; router_logits (when given)
  // receives each MoE layer's router logits [B*T, R], in the arena.
  Tensor logits(const Tensor& tokens, Arena& arena, std::vector<Tensor>* router_logits = nullptr);

  // Inference with a key/value cache (any architecture variant; no gradients).
  KvCache make_cache(int64_t slots, int64_t capacity) const;
  // Which positions of a decode step get the output head: every one (logits of a whole text),
  // or each sequence's last (generation samples only from it; a prompt of T tokens then costs
  // one row of the head instead of T).
  enum class LogitRows { all, last, none };
  // Runs tokens i32 [B, Tq] as the next Tq positions of cache slots `slots` (B of them; empty:
  // 0..B-1), appending their keys and values; returns logits [B, Tq, V] (LogitRows::last:
  // [B, 1, V]; LogitRows::none: no logits, an empty tensor, for a prompt's chunk that samples
  // nothing) in the arena. `routing` (when given) receives each MoE layer's routing of the
  // B*Tq tokens (its routing stats and plan tensors, in the arena).
  Tensor decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                const std::vector<int64_t>& slots = {},
                std::vector<Tensor>* router_logits = nullptr, LogitRows rows = LogitRows::all,
                ModelOutput* routing = nullptr);

  // Multi-token prediction at inference (self-speculative decoding, moe/generate.h), one
  // sequence (cache slot 0). decode_hidden is decode() of tokens [1, Tq] that also returns in
  // *hidden each position's final representation [Tq, D] (after the final norm: the output
  // head's input, and the first MTP module's); logits [1, Tq, V].
  Tensor decode_hidden(const Tensor& tokens, KvCache& cache, Arena& arena, Tensor* hidden);
  // A one-sequence cache for an MTP module's block.
  KvCache make_mtp_cache(int64_t capacity) const;
  // MTP module `module` (from 0) on the next n positions of its cache: hidden [n, D] the
  // previous representations of those positions (decode_hidden's, or module - 1's), tokens
  // i32 [n] the tokens module + 1 ahead of them. Returns the logits of the last position
  // [1, V] (its guess at the token module + 2 ahead) and, in *hidden_out, the module's
  // representations [n, D] (the next module's input).
  Tensor mtp_decode(int64_t module, const Tensor& hidden, const Tensor& tokens, KvCache& cache,
                    Arena& arena, Tensor* hidden_out);

 private:
  struct Impl;
  ModelConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
