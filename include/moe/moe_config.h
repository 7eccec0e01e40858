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
// (silu(x W_gate^T + b_gate) * (x W_up^T + b_up)) W_down^T + b_down. swiglu_oai is gpt-oss's
// clamped variant: with g = min(gate, L) and u = clamp(up, -L, L) (L = swiglu_limit),
// h = (u + 1) * g * sigmoid(1.702 g).
enum class ExpertAct { relu, gelu, swiglu, swiglu_oai };
// Whether the activation has a gate projection (SwiGLU and its variants).
inline bool gated(ExpertAct a) { return a == ExpertAct::swiglu || a == ExpertAct::swiglu_oai; }
// An expert activation with its parameter (swiglu_oai's clamp; the default is gpt-oss's).
struct FfnAct {
  ExpertAct kind = ExpertAct::swiglu;
  double limit = 7.0;
  FfnAct(ExpertAct k, double l = 7.0) : kind(k), limit(l) {}  // NOLINT: converts
  bool gated() const { return moe::gated(kind); }
};

// Which tokens an expert over capacity keeps: the first ones in token order, those with the
// highest router score (ties to the earlier token), or first choices before second choices
// (each in token order; GShard's order).
enum class DropPolicy { position, score, slot };

// The routing method (docs/routing.md has each one's equations and source).
enum class RouterKind {
  topk,           // softmax top-k (Mixtral; Shazeer et al. 2017 without the noise)
  switch_top1,    // Switch Transformer: top-1, no renormalization (with jitter_eps)
  noisy_topk,     // Shazeer et al. 2017: noisy top-k with importance and load losses
  gshard,         // GShard top-2 with random second expert and group capacity
  expert_choice,  // Zhou et al. 2022: each expert picks its top C tokens
  soft,           // Jacobs et al. 1991: every expert, softmax-weighted
  hierarchical,   // Jordan and Jacobs 1994: a two-level tree of gates
  deepseek,       // DeepSeek-V3: sigmoid, selection bias, group-limited top-k
};

struct MoeConfig {
  int64_t d_model = 0;    // D
  int64_t d_ffn = 0;      // F, hidden width of each routed expert
  int64_t n_experts = 0;  // E
  int64_t top_k = 1;      // K, experts per token
  ExpertAct act = ExpertAct::swiglu;
  bool expert_bias = false;    // biases on every expert projection
  double swiglu_limit = 7.0;   // swiglu_oai's clamp
  bool router_bias = false;    // a bias on the router's logits (gpt-oss)
  bool renormalize = true;     // divide the K selected probabilities by their sum (Mixtral)
  int64_t n_shared = 0;        // S always-active shared experts (DeepSeekMoE)
  int64_t d_shared_ffn = 0;    // hidden width of each shared expert; 0 means d_ffn
  bool shared_gate = false;    // scale the shared output by sigmoid(x . w_shared_gate) (Qwen2-MoE)
  double capacity_factor = 0;  // capacity = ceil(CF * N * K / E) per expert; CF <= 0: dropless
  DropPolicy drop_policy = DropPolicy::position;
  double aux_loss_coef = 0.01;  // alpha of the Switch/GShard load-balancing loss
  double z_loss_coef = 0.001;   // beta of the ST-MoE router z-loss
  // DeepSeek-V2's device-level balance loss (section 3.3.3), topk and switch routers: the experts
  // in n_devices groups of consecutive indices (as expert parallelism places them), and
  // coef * sum_d mean_{i in d}(f_i) * sum_{i in d} P_i (docs/routing.md). 0: off.
  double device_aux_loss_coef = 0;
  int64_t n_devices = 0;
  // Global-batch balancing (topk and switch routers, training): the balancing losses' f counts
  // the choices of every micro-batch of the optimizer step so far (and, under expert
  // parallelism, of every rank), not just this micro-batch's (docs/routing.md).
  bool global_balance = false;
  RouterKind router = RouterKind::topk;
  double jitter_eps = 0;       // training: router input times U(1 - eps, 1 + eps) (Switch)
  double explore_prob = 0;     // training: a slot's expert replaced by a random one with this p
  bool freeze_router = false;  // no router gradient, no router state update
  std::vector<int64_t> frozen_experts;  // experts whose weights get no gradient
  int64_t capacity_group = 0;           // tokens per capacity group (GShard); 0: the whole batch
  int64_t seq_len = 0;  // tokens per sequence for sequence-wise losses; 0: whole batch
  // hierarchical: groups under the root, kept groups and kept experts per group (0: all)
  int64_t hme_groups = 0;
  int64_t hme_group_k = 0;
  int64_t hme_expert_k = 0;
  // deepseek: expert groups, groups kept, output scale, selection-bias update rate
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  double bias_update_rate = 0.001;

  int64_t shared_width() const { return d_shared_ffn > 0 ? d_shared_ffn : d_ffn; }
  FfnAct ffn_act() const { return {act, swiglu_limit}; }
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
