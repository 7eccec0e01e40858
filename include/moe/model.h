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
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  // Which layers are MoE: layer i (from 0) when i >= first_dense and (i + 1) % moe_every == 0.
  // moe_every = 0 means no MoE layer (a dense model).
  int64_t moe_every = 1;
  int64_t first_dense = 0;
  MoeConfig moe;  // its d_model must equal d_model
  double init_std = 0.02;

  int64_t head_size() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  bool is_moe_layer(int64_t i) const {
    return moe_every > 0 && i >= first_dense && (i + 1) % moe_every == 0;
  }
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
};
ParamCount count_params(const ModelConfig& cfg);

// A named parameter and its gradient buffer.
struct NamedParam {
  std::string name;
  Tensor value;
  Tensor grad;
  bool decay;  // weight decay applies (not to norms)
};

struct ModelOutput {
  double loss = 0;                    // cross-entropy + aux + z
  double ce_loss = 0;                 // mean cross-entropy over the predicted tokens
  double aux_loss = 0;                // sum over MoE layers
  double z_loss = 0;                  // sum over MoE layers
  std::vector<RoutingStats> routing;  // one per MoE layer
  // Per MoE layer, in the arena: which experts each of the B*T tokens went to (MoeOutput's
  // plan_offsets, plan_experts and top_expert).
  std::vector<Tensor> plan_offsets, plan_experts, top_expert;
};

class Model {
 public:
  explicit Model(const ModelConfig& cfg, DType dtype = DType::F32);
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
  // The MoE layers, in depth order (for router state and statistics).
  std::vector<MoeLayer*> moe_layers();

  // tokens i32 [B, T+1] -> loss. With backward, accumulates every parameter gradient of the
  // loss (scaled by grad_scale, e.g. 1 / accumulation steps).
  ModelOutput forward(const Tensor& tokens, Arena& arena);
  ModelOutput forward_backward(const Tensor& tokens, Arena& arena, double grad_scale = 1.0);
  // logits [B, T, V] for tokens i32 [B, T] (no loss), in the arena.
  Tensor logits(const Tensor& tokens, Arena& arena);

 private:
  struct Impl;
  ModelConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
