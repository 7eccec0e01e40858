// `moe demo`: runs one MoE layer forward and backward on random data and prints its routing
// statistics: the first look at the engine.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "layer_options.h"
#include "moe/moe_layer.h"
#include "moe/threading.h"
#include "timing.h"

namespace moe::cli {

namespace {

struct Demo {
  LayerOptions opt;
  bool json = false;
};

int run_demo(Demo& d) {
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
  return [d] { return run_demo(*d); };
}

}  // namespace moe::cli
