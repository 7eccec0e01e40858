// LayerOptions: the flags of one MoE layer.
#include "layer_options.h"

#include "moe/error.h"

namespace moe::cli {

void LayerOptions::add_to(CLI::App* cmd) {
  cmd->add_option("-N,--tokens", tokens, "tokens per batch (N)")->capture_default_str();
  cmd->add_option("-D,--dim", cfg.d_model, "model width (D)")->capture_default_str();
  cmd->add_option("-F,--ffn", cfg.d_ffn, "hidden width of each expert (F)")->capture_default_str();
  cmd->add_option("-E,--experts", cfg.n_experts, "number of routed experts (E)")
      ->capture_default_str();
  cmd->add_option("-k,--top-k", cfg.top_k, "experts per token (K)")->capture_default_str();
  cmd->add_option("--act", act, "expert activation")
      ->check(CLI::IsMember({"relu", "gelu", "swiglu"}))
      ->capture_default_str();
  cmd->add_flag("--bias", cfg.expert_bias, "biases on the expert projections");
  cmd->add_option("--renormalize", cfg.renormalize,
                  "renormalize the top-k weights to sum to 1 (Mixtral: true, Switch: false)")
      ->capture_default_str();
  cmd->add_option("--shared", cfg.n_shared, "always-active shared experts (S)")
      ->capture_default_str();
  cmd->add_option("--shared-ffn", cfg.d_shared_ffn, "hidden width of a shared expert (0: F)")
      ->capture_default_str();
  cmd->add_flag("--shared-gate", cfg.shared_gate, "sigmoid gate on the shared experts (Qwen2-MoE)");
  cmd->add_option("--capacity-factor", cfg.capacity_factor,
                  "expert capacity = ceil(CF * N * K / E); <= 0 means dropless")
      ->capture_default_str();
  cmd->add_option("--drop", drop, "which tokens an expert over capacity keeps")
      ->check(CLI::IsMember({"position", "score", "slot"}))
      ->capture_default_str();
  cmd->add_option("--capacity-group", cfg.capacity_group,
                  "tokens per capacity group (GShard); 0: the whole batch")
      ->capture_default_str();
  cmd->add_option("--router", router,
                  "routing method: topk, switch, noisy_topk, gshard, expert_choice, soft, "
                  "hierarchical, deepseek (docs/routing.md)")
      ->capture_default_str();
  cmd->add_option("--jitter", cfg.jitter_eps, "router input jitter epsilon (training)")
      ->capture_default_str();
  cmd->add_option("--explore", cfg.explore_prob, "probability of a random expert per slot")
      ->capture_default_str();
  cmd->add_option("--hme-groups", cfg.hme_groups, "hierarchical: groups under the root");
  cmd->add_option("--hme-group-k", cfg.hme_group_k, "hierarchical: groups kept (0: all)");
  cmd->add_option("--hme-expert-k", cfg.hme_expert_k,
                  "hierarchical: experts kept per group (0: all)");
  cmd->add_option("--n-group", cfg.n_group, "deepseek: expert groups")->capture_default_str();
  cmd->add_option("--topk-group", cfg.topk_group, "deepseek: groups kept")->capture_default_str();
  cmd->add_option("--scaling", cfg.routed_scaling_factor, "deepseek: routed scaling factor")
      ->capture_default_str();
  cmd->add_option("--segment", segment,
                  "fine-grained segmentation: E*m experts of width F/m, top K*m")
      ->capture_default_str();
  cmd->add_option("--aux-coef", cfg.aux_loss_coef, "load-balancing loss coefficient (alpha)")
      ->capture_default_str();
  cmd->add_option("--z-coef", cfg.z_loss_coef, "router z-loss coefficient (beta)")
      ->capture_default_str();
  cmd->add_option("-t,--threads", threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--seed", seed, "random seed")->capture_default_str();
}

MoeConfig LayerOptions::finish() {
  cfg.act = parse_expert_act(act);
  cfg.drop_policy = parse_drop_policy(drop);
  cfg.router = parse_router_kind(router);
  MOE_CHECK(tokens >= 1, "options", "--tokens must be >= 1, got {}", tokens);
  cfg.validate();
  return segment == 1 ? cfg : fine_grained(cfg, segment);
}

}  // namespace moe::cli
