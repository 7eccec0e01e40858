// moe/moe_config.h: what an MoE layer is: experts, router, shared experts, capacity, losses.
//
// The math of each option is written out in docs/routing.md.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace moe {

// The expert FFN: act(x W_up^T + b_up) W_down^T + b_down, or for SwiGLU
// (silu(x W_gate^T + b_gate) * (x W_up^T + b_up)) W_down^T + b_down.
enum class ExpertAct { relu, gelu, swiglu };

// Which tokens an expert over capacity keeps: the first ones in token order, or those with the
// highest router probability for that expert (ties to the earlier token).
enum class DropPolicy { position, score };

// The routing method (docs/routing.md has each one's equations and source).
enum class RouterKind {
  topk,  // softmax top-k (Shazeer et al. 2017 without noise; Switch with K = 1; Mixtral)
};

struct MoeConfig {
  int64_t d_model = 0;    // D
  int64_t d_ffn = 0;      // F, hidden width of each routed expert
  int64_t n_experts = 0;  // E
  int64_t top_k = 1;      // K, experts per token
  ExpertAct act = ExpertAct::swiglu;
  bool expert_bias = false;    // biases on every expert projection
  bool renormalize = true;     // divide the K selected probabilities by their sum (Mixtral)
  int64_t n_shared = 0;        // S always-active shared experts (DeepSeekMoE)
  int64_t d_shared_ffn = 0;    // hidden width of each shared expert; 0 means d_ffn
  bool shared_gate = false;    // scale the shared output by sigmoid(x . w_shared_gate) (Qwen2-MoE)
  double capacity_factor = 0;  // capacity = ceil(CF * N * K / E) per expert; CF <= 0: dropless
  DropPolicy drop_policy = DropPolicy::position;
  double aux_loss_coef = 0.01;  // alpha of the Switch/GShard load-balancing loss
  double z_loss_coef = 0.001;   // beta of the ST-MoE router z-loss
  RouterKind router = RouterKind::topk;
  double jitter_eps = 0;       // training: router input times U(1 - eps, 1 + eps) (Switch)
  double explore_prob = 0;     // training: a slot's expert replaced by a random one with this p
  bool freeze_router = false;  // no router gradient, no router state update
  std::vector<int64_t> frozen_experts;  // experts whose weights get no gradient

  int64_t shared_width() const { return d_shared_ffn > 0 ? d_shared_ffn : d_ffn; }
  // Throws moe::Error naming the first bad field.
  void validate() const;
  std::string summary() const;
};

// Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024): every expert of width F is
// split into m experts of width F/m and each token picks m*K of them, so the compute per token
// is unchanged. Shared experts are split the same way (S -> m*S of width F_s/m).
MoeConfig fine_grained(const MoeConfig& cfg, int64_t m);

const char* to_string(ExpertAct a);
const char* to_string(DropPolicy p);
const char* to_string(RouterKind r);
RouterKind parse_router_kind(const std::string& s);
ExpertAct parse_expert_act(const std::string& s);
DropPolicy parse_drop_policy(const std::string& s);

void to_json(nlohmann::json& j, const MoeConfig& c);
void from_json(const nlohmann::json& j, MoeConfig& c);

}  // namespace moe
