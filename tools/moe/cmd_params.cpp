// `moe params`: total parameters and active parameters per token of a preset, a config file or a
// checkpoint, computed from the config (so any size works).
#include <fmt/core.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "moe/gguf_model.h"
#include "moe/hf.h"
#include "moe/trainer.h"

namespace moe::cli {

namespace {

struct ParamsArgs {
  std::string preset, config, model_dir;
  bool json = false;
};

ModelConfig read_config(const ParamsArgs& a) {
  MOE_CHECK(!a.preset.empty() + !a.config.empty() + !a.model_dir.empty() == 1, "params",
            "give exactly one of --preset, --config, -m");
  if (!a.preset.empty()) return model_preset(a.preset);
  if (!a.model_dir.empty() && is_gguf_file(a.model_dir))
    return config_from_gguf(load_gguf(a.model_dir));
  const std::string path =
      a.config.empty() ? resolve_checkpoint(a.model_dir) + "/config.json" : a.config;
  std::ifstream f(path);
  MOE_CHECK(f.good(), "params", "cannot read {}", path);
  try {
    nlohmann::json j = nlohmann::json::parse(f);
    if (j.is_object() && j.contains("moe_cpp")) return j.at("moe_cpp").get<ModelConfig>();
    if (j.is_object() && j.contains("model_type")) return config_from_hf(j);  // HuggingFace
    return j.get<ModelConfig>();
  } catch (const nlohmann::json::exception& e) {
    throw_error("params", fmt::format("{} is not valid JSON: {}", path, e.what()));
  }
}

std::string human(int64_t n) {
  const double v = static_cast<double>(n);
  if (v >= 1e12) return fmt::format("{:.2f}T", v / 1e12);
  if (v >= 1e9) return fmt::format("{:.2f}B", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  return fmt::format("{}", n);
}

int run_params(const ParamsArgs& a) {
  const ModelConfig cfg = read_config(a);
  const ParamCount n = count_params(cfg);
  if (a.json) {
    fmt::print("{}\n", nlohmann::json{{"total_params", n.total},
                                      {"active_params", n.active},
                                      {"embedding", n.embedding},
                                      {"attention", n.attention},
                                      {"dense_ffn", n.dense_ffn},
                                      {"routed_experts", n.routed_experts},
                                      {"shared_experts", n.shared_experts},
                                      {"router", n.router},
                                      {"norms", n.norms},
                                      {"mtp", n.mtp}}
                           .dump());
    return 0;
  }
  fmt::print("total parameters   {:>16}  ({})\n", n.total, human(n.total));
  fmt::print("active per token   {:>16}  ({}, embedding and output head counted in full)\n",
             n.active, human(n.active));
  const std::pair<const char*, int64_t> parts[] = {{"embedding + head", n.embedding},
                                                   {"attention", n.attention},
                                                   {"dense FFNs", n.dense_ffn},
                                                   {"routed experts", n.routed_experts},
                                                   {"shared experts", n.shared_experts},
                                                   {"routers", n.router},
                                                   {"norms", n.norms},
                                                   {"mtp", n.mtp}};
  for (const auto& [name, v] : parts)
    if (v > 0) fmt::print("  {:<17}{:>16}  ({})\n", name, v, human(v));
  return 0;
}

}  // namespace

Run add_params(CLI::App& app) {
  auto a = std::make_shared<ParamsArgs>();
  auto* cmd = app.add_subcommand("params", "total and active parameters of a model");
  std::string names;
  for (const std::string& n : model_preset_names()) names += (names.empty() ? "" : ", ") + n;
  cmd->add_option("--preset", a->preset, "a model preset: " + names);
  cmd->add_option("--config", a->config, "a model config JSON (this engine's or HuggingFace's)");
  cmd->add_option("-m,--model", a->model_dir,
                  "a checkpoint folder (this engine's or a HuggingFace model's) or a GGUF file");
  cmd->add_flag("--json", a->json, "print one JSON object (total_params, active_params, ...)");
  return [a] { return run_params(*a); };
}

}  // namespace moe::cli
