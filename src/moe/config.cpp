// MoeConfig: validation, fine-grained segmentation, JSON.
#include <cmath>
#include <nlohmann/json.hpp>

#include "moe/error.h"
#include "moe/json_read.h"
#include "moe/moe_config.h"

namespace moe {

void MoeConfig::validate() const {
  const char* w = "moe.config";
  MOE_CHECK(d_model >= 1, w, "d_model must be >= 1, got {}", d_model);
  MOE_CHECK(d_ffn >= 1, w, "d_ffn must be >= 1, got {}", d_ffn);
  MOE_CHECK(n_experts >= 1 && n_experts <= (1 << 30), w, "n_experts must be in [1, 2^30], got {}",
            n_experts);
  MOE_CHECK(top_k >= 1 && top_k <= n_experts, w, "top_k must be in [1, n_experts = {}], got {}",
            n_experts, top_k);
  MOE_CHECK(n_shared >= 0, w, "n_shared must be >= 0, got {}", n_shared);
  MOE_CHECK(std::isfinite(swiglu_limit) && swiglu_limit > 0, w,
            "swiglu_limit must be finite and > 0, got {}", swiglu_limit);
  MOE_CHECK(d_shared_ffn >= 0, w, "d_shared_ffn must be >= 0 (0 means d_ffn), got {}",
            d_shared_ffn);
  MOE_CHECK(!shared_gate || n_shared > 0, w, "shared_gate needs n_shared > 0");
  MOE_CHECK(std::isfinite(capacity_factor), w, "capacity_factor must be finite, got {}",
            capacity_factor);
  MOE_CHECK(std::isfinite(aux_loss_coef) && aux_loss_coef >= 0, w,
            "aux_loss_coef must be finite and >= 0, got {}", aux_loss_coef);
  MOE_CHECK(std::isfinite(z_loss_coef) && z_loss_coef >= 0, w,
            "z_loss_coef must be finite and >= 0, got {}", z_loss_coef);
  MOE_CHECK(std::isfinite(device_aux_loss_coef) && device_aux_loss_coef >= 0, w,
            "device_aux_loss_coef must be finite and >= 0, got {}", device_aux_loss_coef);
  MOE_CHECK(n_devices >= 0, w, "n_devices must be >= 0, got {}", n_devices);
  MOE_CHECK(!global_balance || router == RouterKind::topk || router == RouterKind::switch_top1, w,
            "global_balance needs the topk or switch router, got {}", to_string(router));
  if (device_aux_loss_coef > 0) {
    MOE_CHECK(router == RouterKind::topk || router == RouterKind::switch_top1, w,
              "the device-level balance loss (device_aux_loss_coef) needs the topk or switch "
              "router, got {}",
              to_string(router));
    MOE_CHECK(n_devices >= 1 && n_experts % n_devices == 0, w,
              "the device-level balance loss needs n_devices >= 1 dividing n_experts = {}, got {}",
              n_experts, n_devices);
  }
  MOE_CHECK(std::isfinite(jitter_eps) && jitter_eps >= 0 && jitter_eps < 1, w,
            "jitter_eps must be in [0, 1), got {}", jitter_eps);
  MOE_CHECK(std::isfinite(explore_prob) && explore_prob >= 0 && explore_prob <= 1, w,
            "explore_prob must be in [0, 1], got {}", explore_prob);
  MOE_CHECK(capacity_group >= 0, w, "capacity_group must be >= 0, got {}", capacity_group);
  MOE_CHECK(seq_len >= 0, w, "seq_len must be >= 0, got {}", seq_len);
  MOE_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0, w,
            "routed_scaling_factor must be finite and > 0, got {}", routed_scaling_factor);
  MOE_CHECK(routed_scaling_factor == 1.0 || router == RouterKind::topk ||
                router == RouterKind::switch_top1 || router == RouterKind::deepseek,
            w, "routed_scaling_factor applies to the topk, switch and deepseek routers only");
  switch (router) {
    case RouterKind::topk: break;
    case RouterKind::switch_top1:
      MOE_CHECK(top_k == 1 && !renormalize, w,
                "router switch needs top_k = 1 and renormalize = false, got top_k = {}, "
                "renormalize = {}",
                top_k, renormalize);
      break;
    case RouterKind::noisy_topk:
      MOE_CHECK(top_k < n_experts, w, "router noisy_topk needs top_k < n_experts, got {} >= {}",
                top_k, n_experts);
      break;
    case RouterKind::gshard:
      MOE_CHECK(top_k == 2 && n_experts >= 2, w,
                "router gshard needs top_k = 2 and n_experts >= 2, got top_k = {}, n_experts = {}",
                top_k, n_experts);
      break;
    case RouterKind::expert_choice:
      MOE_CHECK(capacity_factor > 0, w,
                "router expert_choice needs capacity_factor > 0 (experts per token on "
                "average), got {}",
                capacity_factor);
      break;
    case RouterKind::soft: break;
    case RouterKind::hierarchical:
      MOE_CHECK(hme_groups >= 1 && n_experts % hme_groups == 0, w,
                "router hierarchical needs hme_groups >= 1 dividing n_experts = {}, got {}",
                n_experts, hme_groups);
      MOE_CHECK(hme_group_k >= 0 && hme_group_k <= hme_groups, w,
                "hme_group_k must be in [0, hme_groups = {}], got {}", hme_groups, hme_group_k);
      MOE_CHECK(hme_expert_k >= 0 && hme_expert_k <= n_experts / hme_groups, w,
                "hme_expert_k must be in [0, experts per group = {}], got {}",
                n_experts / hme_groups, hme_expert_k);
      break;
    case RouterKind::deepseek:
      MOE_CHECK(n_group >= 1 && n_experts % n_group == 0, w,
                "n_group must be >= 1 and divide n_experts = {}, got {}", n_experts, n_group);
      MOE_CHECK(topk_group >= 1 && topk_group <= n_group, w,
                "topk_group must be in [1, n_group = {}], got {}", n_group, topk_group);
      MOE_CHECK(top_k <= topk_group * (n_experts / n_group), w,
                "top_k = {} exceeds the experts in the kept groups ({} groups of {})", top_k,
                topk_group, n_experts / n_group);
      MOE_CHECK(n_group == 1 || n_experts / n_group >= 2, w,
                "groups need at least 2 experts (group score = sum of the best two)");
      MOE_CHECK(std::isfinite(bias_update_rate) && bias_update_rate >= 0, w,
                "bias_update_rate must be finite and >= 0, got {}", bias_update_rate);
      break;
  }
  for (size_t i = 0; i < frozen_experts.size(); ++i) {
    MOE_CHECK(frozen_experts[i] >= 0 && frozen_experts[i] < n_experts, w,
              "frozen_experts[{}] = {} is not an expert index in [0, {})", i, frozen_experts[i],
              n_experts);
  }
}

std::string MoeConfig::summary() const {
  std::string s =
      fmt::format("D={} E={} K={} F={} act={}{}{}", d_model, n_experts, top_k, d_ffn,
                  to_string(act), expert_bias ? " bias" : "", renormalize ? " renorm" : "");
  if (router_bias) s += " router-bias";
  if (n_shared > 0)
    s += fmt::format(" shared={}x{}{}", n_shared, shared_width(), shared_gate ? " gated" : "");
  if (capacity_factor > 0)
    s += fmt::format(" CF={} drop={}", capacity_factor, to_string(drop_policy));
  if (router != RouterKind::topk) s += fmt::format(" router={}", to_string(router));
  if (jitter_eps > 0) s += fmt::format(" jitter={}", jitter_eps);
  if (explore_prob > 0) s += fmt::format(" explore={}", explore_prob);
  if (device_aux_loss_coef > 0)
    s += fmt::format(" device-balance={}x{}", device_aux_loss_coef, n_devices);
  if (global_balance) s += " global-balance";
  if (freeze_router) s += " frozen-router";
  if (!frozen_experts.empty()) s += fmt::format(" frozen-experts={}", frozen_experts.size());
  return s;
}

MoeConfig fine_grained(const MoeConfig& cfg, int64_t m) {
  cfg.validate();
  MOE_CHECK(m >= 1, "moe.fine_grained", "segmentation factor m must be >= 1, got {}", m);
  MOE_CHECK(cfg.d_ffn % m == 0, "moe.fine_grained", "d_ffn = {} is not divisible by m = {}",
            cfg.d_ffn, m);
  MOE_CHECK(cfg.n_shared == 0 || cfg.shared_width() % m == 0, "moe.fine_grained",
            "shared expert width {} is not divisible by m = {}", cfg.shared_width(), m);
  MoeConfig out = cfg;
  out.n_experts = cfg.n_experts * m;
  out.top_k = cfg.top_k * m;
  out.d_ffn = cfg.d_ffn / m;
  out.n_shared = cfg.n_shared * m;
  out.d_shared_ffn = cfg.n_shared > 0 ? cfg.shared_width() / m : 0;
  return out;
}

const char* to_string(ExpertAct a) {
  switch (a) {
    case ExpertAct::relu: return "relu";
    case ExpertAct::gelu: return "gelu";
    case ExpertAct::swiglu: return "swiglu";
    case ExpertAct::swiglu_oai: return "swiglu_oai";
  }
  return "?";
}

const char* to_string(DropPolicy p) {
  switch (p) {
    case DropPolicy::position: return "position";
    case DropPolicy::score: return "score";
    case DropPolicy::slot: return "slot";
  }
  return "?";
}

namespace {
struct RouterName {
  RouterKind kind;
  const char* name;
};
constexpr RouterName kRouterNames[] = {
    {RouterKind::topk, "topk"},
    {RouterKind::switch_top1, "switch"},
    {RouterKind::noisy_topk, "noisy_topk"},
    {RouterKind::gshard, "gshard"},
    {RouterKind::expert_choice, "expert_choice"},
    {RouterKind::soft, "soft"},
    {RouterKind::hierarchical, "hierarchical"},
    {RouterKind::deepseek, "deepseek"},
};
}  // namespace

const char* to_string(RouterKind r) {
  for (const RouterName& n : kRouterNames)
    if (n.kind == r) return n.name;
  return "?";
}

RouterKind parse_router_kind(const std::string& s) {
  std::string known;
  for (const RouterName& n : kRouterNames) {
    if (s == n.name) return n.kind;
    known += known.empty() ? n.name : std::string(", ") + n.name;
  }
  throw_error("moe.config", fmt::format("unknown router '{}' ({})", s, known));
}

ExpertAct parse_expert_act(const std::string& s) {
  if (s == "relu") return ExpertAct::relu;
  if (s == "gelu") return ExpertAct::gelu;
  if (s == "swiglu") return ExpertAct::swiglu;
  if (s == "swiglu_oai") return ExpertAct::swiglu_oai;
  throw_error("moe.config",
              fmt::format("unknown expert activation '{}' (relu, gelu, swiglu, swiglu_oai)", s));
}

DropPolicy parse_drop_policy(const std::string& s) {
  if (s == "position") return DropPolicy::position;
  if (s == "score") return DropPolicy::score;
  if (s == "slot") return DropPolicy::slot;
  throw_error("moe.config", fmt::format("unknown drop policy '{}' (position, score, slot)", s));
}

void to_json(nlohmann::json& j, const MoeConfig& c) {
  j = {{"d_model", c.d_model},
       {"d_ffn", c.d_ffn},
       {"n_experts", c.n_experts},
       {"top_k", c.top_k},
       {"act", to_string(c.act)},
       {"expert_bias", c.expert_bias},
       {"swiglu_limit", c.swiglu_limit},
       {"router_bias", c.router_bias},
       {"renormalize", c.renormalize},
       {"n_shared", c.n_shared},
       {"d_shared_ffn", c.d_shared_ffn},
       {"shared_gate", c.shared_gate},
       {"capacity_factor", c.capacity_factor},
       {"drop_policy", to_string(c.drop_policy)},
       {"aux_loss_coef", c.aux_loss_coef},
       {"z_loss_coef", c.z_loss_coef},
       {"device_aux_loss_coef", c.device_aux_loss_coef},
       {"n_devices", c.n_devices},
       {"global_balance", c.global_balance},
       {"router", to_string(c.router)},
       {"jitter_eps", c.jitter_eps},
       {"explore_prob", c.explore_prob},
       {"freeze_router", c.freeze_router},
       {"frozen_experts", c.frozen_experts},
       {"capacity_group", c.capacity_group},
       {"seq_len", c.seq_len},
       {"hme_groups", c.hme_groups},
       {"hme_group_k", c.hme_group_k},
       {"hme_expert_k", c.hme_expert_k},
       {"n_group", c.n_group},
       {"topk_group", c.topk_group},
       {"routed_scaling_factor", c.routed_scaling_factor},
       {"bias_update_rate", c.bias_update_rate}};
}

void from_json(const nlohmann::json& j, MoeConfig& c) {
  MOE_CHECK(j.is_object(), "moe.config", "expected a JSON object, got {}", j.type_name());
  // The known keys are those to_json writes.
  const nlohmann::json defaults = MoeConfig{};
  for (const auto& [key, value] : j.items())
    MOE_CHECK(defaults.contains(key), "moe.config", "unknown key '{}'", key);
  try {
    c = MoeConfig{};
    json_into(j, "d_model", c.d_model, "moe.config");
    json_into(j, "d_ffn", c.d_ffn, "moe.config");
    json_into(j, "n_experts", c.n_experts, "moe.config");
    json_into(j, "top_k", c.top_k, "moe.config");
    c.act = parse_expert_act(json_value(j, "act", std::string(to_string(c.act)), "moe.config"));
    json_into(j, "expert_bias", c.expert_bias, "moe.config");
    json_into(j, "swiglu_limit", c.swiglu_limit, "moe.config");
    json_into(j, "router_bias", c.router_bias, "moe.config");
    json_into(j, "renormalize", c.renormalize, "moe.config");
    json_into(j, "n_shared", c.n_shared, "moe.config");
    json_into(j, "d_shared_ffn", c.d_shared_ffn, "moe.config");
    json_into(j, "shared_gate", c.shared_gate, "moe.config");
    json_into(j, "capacity_factor", c.capacity_factor, "moe.config");
    c.drop_policy =
        parse_drop_policy(json_value(j, "drop_policy", std::string("position"), "moe.config"));
    json_into(j, "aux_loss_coef", c.aux_loss_coef, "moe.config");
    json_into(j, "z_loss_coef", c.z_loss_coef, "moe.config");
    json_into(j, "device_aux_loss_coef", c.device_aux_loss_coef, "moe.config");
    json_into(j, "n_devices", c.n_devices, "moe.config");
    json_into(j, "global_balance", c.global_balance, "moe.config");
    c.router = parse_router_kind(json_value(j, "router", std::string("topk"), "moe.config"));
    json_into(j, "jitter_eps", c.jitter_eps, "moe.config");
    json_into(j, "explore_prob", c.explore_prob, "moe.config");
    json_into(j, "freeze_router", c.freeze_router, "moe.config");
    json_into(j, "frozen_experts", c.frozen_experts, "moe.config");
    json_into(j, "capacity_group", c.capacity_group, "moe.config");
    json_into(j, "seq_len", c.seq_len, "moe.config");
    json_into(j, "hme_groups", c.hme_groups, "moe.config");
    json_into(j, "hme_group_k", c.hme_group_k, "moe.config");
    json_into(j, "hme_expert_k", c.hme_expert_k, "moe.config");
    json_into(j, "n_group", c.n_group, "moe.config");
    json_into(j, "topk_group", c.topk_group, "moe.config");
    json_into(j, "routed_scaling_factor", c.routed_scaling_factor, "moe.config");
    json_into(j, "bias_update_rate", c.bias_update_rate, "moe.config");
  } catch (const nlohmann::json::exception& e) {
    throw_error("moe.config", fmt::format("bad value: {}", e.what()));
  }
}

}  // namespace moe
