// `moe demo`: runs one MoE layer forward and backward on random data and prints its routing
// statistics: the first look at the engine.
#include <fmt/core.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "layer_options.h"
#include "moe/classic.h"
#include "moe/moe_layer.h"
#include "moe/threading.h"
#include "timing.h"

namespace moe::cli {

namespace {

struct Demo {
  LayerOptions opt;
  bool json = false;
  CLI::App* classic_cmd = nullptr;
  ClassicConfig classic;
  std::string plot;
};

// One character per region cell: the expert's digit.
std::string region_strip(const std::vector<int>& region, size_t from, size_t count, size_t cols) {
  std::string s;
  for (size_t c = 0; c < cols; ++c) {
    const int e = region[from + c * count / cols];
    s += e < 0 ? '.' : static_cast<char>('0' + e);
  }
  return s;
}

int run_classic_demo(Demo& d) {
  const ClassicConfig& c = d.classic;
  if (!d.json)
    fmt::print(
        "Classic mixtures of experts on a piecewise {}-D regression task ({} points, "
        "experts: GELU MLPs of width {}, {} AdamW steps)\n\n",
        c.dims, c.n_train, c.hidden, c.steps);
  auto progress = [&](const std::string& name, int64_t step, double loss) {
    if (d.json) return;
    fmt::print(stderr, "\r  {:<20} step {:>5}/{}  train MSE {:.5f}", name, step, c.steps, loss);
    if (step == c.steps) fmt::print(stderr, "\n");
  };
  const ClassicResult r = run_classic(c, progress);
  if (d.json) {
    nlohmann::json j = nlohmann::json::array();
    for (const ClassicModel& m : r.models)
      j.push_back({{"name", m.name},
                   {"experts", m.n_experts},
                   {"params", m.params},
                   {"train_mse", m.train_mse},
                   {"test_mse", m.test_mse}});
    fmt::print("{}\n", nlohmann::json{{"dims", r.dims}, {"models", j}}.dump());
  } else {
    fmt::print("\n{:<22}{:>9}{:>9}{:>12}{:>12}\n", "model", "experts", "params", "train MSE",
               "test MSE");
    for (const ClassicModel& m : r.models)
      fmt::print("{:<22}{:>9}{:>9}{:>12.5f}{:>12.5f}\n", m.name, m.n_experts, m.params, m.train_mse,
                 m.test_mse);
    fmt::print(
        "\nwhich expert has the largest gate weight across the input "
        "(digits = experts):\n");
    const size_t g = static_cast<size_t>(r.grid);
    for (const ClassicModel& m : r.models) {
      if (m.n_experts == 1) continue;
      fmt::print("\n{}:\n", m.name);
      if (r.dims == 1) {
        fmt::print("  x = -1 {} +1\n", region_strip(m.region, 0, g, 64));
      } else {
        for (size_t row = 0; row < 16; ++row) {
          const size_t b = g - 1 - row * g / 16;  // x2 from +1 down to -1
          std::string line;
          for (size_t col = 0; col < 48; ++col) {
            const int e = m.region[(col * g / 48) * g + b];
            line += e < 0 ? '.' : static_cast<char>('0' + e);
          }
          fmt::print("  {}\n", line);
        }
      }
    }
  }
  if (!d.plot.empty()) {
    std::ofstream f(d.plot);
    MOE_CHECK(f.good(), "demo", "cannot write {}", d.plot);
    f << classic_svg(r);
    if (!d.json) fmt::print("\nplot written to {}\n", d.plot);
  }
  return 0;
}

int run_demo(Demo& d) {
  if (d.classic_cmd->parsed()) return run_classic_demo(d);
  const MoeConfig cfg = d.opt.finish();
  set_num_threads(d.opt.threads);
  const int64_t N = d.opt.tokens, D = cfg.d_model;
  Rng rng(d.opt.seed);
  MoeLayer layer(cfg);
  layer.init(rng);
  Tensor x = Tensor::empty({N, D}, DType::F32);
  Tensor dy = Tensor::empty({N, D}, DType::F32);
  Tensor dx = Tensor::empty({N, D}, DType::F32);
  rng.fill_normal(x, 0, 1);
  // dy of the objective mean_t <y_t, r_t> with random r.
  rng.fill_normal(dy, 0, 1.0 / static_cast<double>(N));
  Arena arena;
  MoeOutput out;
  const double fwd_ms = median_ms(0, 1, [&] { out = layer.forward(x, arena); });
  const double bwd_ms = median_ms(0, 1, [&] { layer.backward(dy, dx, arena); });
  double gnorm = 0;
  layer.grads().for_each([&](const std::string&, const Tensor& g) {
    for (int64_t i = 0; i < g.numel(); ++i) gnorm += g.at(i) * g.at(i);
  });
  if (d.json) {
    const RoutingStats& s = out.stats;
    nlohmann::json j = {{"config", cfg},
                        {"tokens", N},
                        {"routed", s.routed},
                        {"kept", s.kept},
                        {"capacity", s.capacity},
                        {"dropped_fraction", s.dropped_fraction},
                        {"load_imbalance", s.load_imbalance},
                        {"router_entropy", s.router_entropy},
                        {"aux_loss", s.aux_loss},
                        {"z_loss", s.z_loss},
                        {"forward_ms", fwd_ms},
                        {"backward_ms", bwd_ms},
                        {"grad_norm", std::sqrt(gnorm)}};
    fmt::print("{}\n", j.dump());
    return 0;
  }
  fmt::print("moe.cpp demo: one MoE layer on random data ({} threads)\n", num_threads());
  fmt::print("layer: {}\nparameters: {} total\n\n", cfg.summary(), layer.params().numel());
  fmt::print("routing of {} tokens:\n{}\n", N, out.stats.str());
  fmt::print("forward {:.2f} ms, backward {:.2f} ms, gradient norm {:.4f}\n", fwd_ms, bwd_ms,
             std::sqrt(gnorm));
  return 0;
}

}  // namespace

Run add_demo(CLI::App& app) {
  auto d = std::make_shared<Demo>();
  d->opt.tokens = 2048;
  d->opt.cfg.d_model = 256;
  d->opt.cfg.d_ffn = 512;
  d->opt.cfg.n_experts = 8;
  d->opt.cfg.top_k = 2;
  d->opt.cfg.capacity_factor = 1.25;
  auto* cmd = app.add_subcommand(
      "demo", "run one MoE layer forward and backward on random data; print its routing");
  d->opt.add_to(cmd);
  cmd->add_flag("--json", d->json, "print one JSON object instead of the table");
  cmd->require_subcommand(0, 1);
  d->classic_cmd = cmd->add_subcommand(
      "classic",
      "train a 1991 mixture of four MLP experts and a 1994 two-level hierarchical mixture on a "
      "piecewise regression task, next to a single expert; show which region each expert took");
  CLI::App* cc = d->classic_cmd;
  cc->add_option("--dims", d->classic.dims, "input dimension (1 or 2)")
      ->check(CLI::IsMember({1, 2}))
      ->capture_default_str();
  cc->add_option("--points", d->classic.n_train, "training points")->capture_default_str();
  cc->add_option("--hidden", d->classic.hidden, "hidden width of each expert")
      ->capture_default_str();
  cc->add_option("--steps", d->classic.steps, "full-batch AdamW steps")->capture_default_str();
  cc->add_option("--lr", d->classic.lr, "learning rate")->capture_default_str();
  cc->add_option("--seed", d->classic.seed, "random seed")->capture_default_str();
  cc->add_option("--plot", d->plot, "write an SVG of the fits and regions to this file");
  cc->add_flag("--json", d->json, "print one JSON object instead of the table");
  return [d] { return run_demo(*d); };
}

}  // namespace moe::cli
