// `moe inspect`: routing made visible for a checkpoint: per MoE layer, tokens per expert, load
// imbalance, dead experts, router entropy, the share of each language sent to each expert and the
// normalized mutual information between language and expert; SVG plots of both.
#include <fmt/core.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "moe/inspect.h"
#include "moe/threading.h"
#include "moe/trainer.h"

namespace moe::cli {

namespace {

struct InspectArgs {
  std::string model_dir;
  std::vector<std::string> data;
  std::string plots = "out/inspect";
  int64_t batches = 16, batch = 16, seq_len = 128;
  bool json = false;
  int threads = 0;
};

int run_inspect(const InspectArgs& a) {
  set_num_threads(a.threads);
  std::unique_ptr<Model> model = load_model(a.model_dir);
  const Corpus corpus = a.data.empty() ? load_fortunes() : load_text(a.data);
  TokenStream train, val;
  split_corpus(corpus, 20, train, val);
  const RoutingReport r =
      inspect_routing(*model, val.ids.size() > 2048 ? val : train, corpus.languages, a.batches,
                      a.batch, std::min(a.seq_len, model->config().max_train_len()));
  if (a.json) {
    nlohmann::json layers = nlohmann::json::array();
    for (const LayerRouting& l : r.layers)
      layers.push_back({{"layer", l.layer},
                        {"tokens_per_expert", l.tokens_per_expert},
                        {"load_imbalance", l.load_imbalance},
                        {"dead_experts", l.dead_experts},
                        {"router_entropy", l.router_entropy},
                        {"dropped", l.dropped},
                        {"unrouted", l.unrouted},
                        {"language_expert", l.lang_expert},
                        {"nmi", l.nmi}});
    fmt::print("{}\n",
               nlohmann::json{{"languages", r.languages}, {"tokens", r.tokens}, {"layers", layers}}
                   .dump());
  } else {
    fmt::print("routing of {} tokens in {} languages ({})\n\n", r.tokens, r.languages.size(),
               fmt::join(r.languages, ", "));
    for (const LayerRouting& l : r.layers) {
      fmt::print(
          "layer {}: load imbalance {:.2f}, {} dead experts, router entropy {:.3f} nats, "
          "NMI(language; expert) {:.3f}, {:.1f}% of pairs dropped, {:.1f}% of tokens without an "
          "expert\n",
          l.layer, l.load_imbalance, l.dead_experts, l.router_entropy, l.nmi, 100 * l.dropped,
          100 * l.unrouted);
      fmt::print("  {:<6}", "expert");
      for (size_t e = 0; e < l.tokens_per_expert.size(); ++e) fmt::print("{:>7}", e);
      fmt::print("\n  {:<6}", "tokens");
      for (int64_t c : l.tokens_per_expert) fmt::print("{:>7}", c);
      fmt::print("\n");
      for (size_t g = 0; g < r.languages.size(); ++g) {
        int64_t total = 0;
        for (int64_t c : l.lang_expert[g]) total += c;
        if (total == 0) continue;
        fmt::print("  {:<6}", r.languages[g]);
        for (int64_t c : l.lang_expert[g])
          fmt::print("{:>6.1f}%", 100.0 * static_cast<double>(c) / static_cast<double>(total));
        fmt::print("\n");
      }
      fmt::print("\n");
    }
  }
  if (!a.plots.empty()) {
    std::filesystem::create_directories(a.plots);
    std::ofstream(a.plots + "/expert_load.svg") << load_svg(r);
    std::ofstream(a.plots + "/language_expert.svg") << language_svg(r);
    if (!a.json) fmt::print("plots: {0}/expert_load.svg, {0}/language_expert.svg\n", a.plots);
  }
  return 0;
}

}  // namespace

Run add_inspect(CLI::App& app) {
  auto a = std::make_shared<InspectArgs>();
  auto* cmd = app.add_subcommand(
      "inspect", "routing of a checkpoint: expert load, dead experts, entropy, language by expert");
  cmd->add_option("-m,--model", a->model_dir, "checkpoint folder or GGUF file")->required();
  cmd->add_option("--data", a->data, "text files or folders (default: the fortunes)");
  cmd->add_option("--plots", a->plots, "folder for the SVG plots ('' for none)")
      ->capture_default_str();
  cmd->add_option("--batches", a->batches, "batches to run")->capture_default_str();
  cmd->add_option("--batch", a->batch, "windows per batch")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "tokens per window")->capture_default_str();
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  return [a] { return run_inspect(*a); };
}

}  // namespace moe::cli
