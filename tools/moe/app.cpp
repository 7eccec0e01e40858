// The `moe` command line: every subcommand registered on one CLI11 app (see commands.h).
#include <utility>

#include "commands.h"

namespace moe::cli {

std::unique_ptr<Cli> make_cli() {
  auto cli = std::make_unique<Cli>();
  CLI::App& app = cli->app;
  app.description(
      "moe.cpp: a Mixture-of-Experts engine (MoE layers with every routing method, training, "
      "inference of HuggingFace MoE checkpoints)");
  app.name("moe");
  app.require_subcommand(1);
  app.set_version_flag("--version", "moe.cpp 0.1.0");
  auto add = [&](Run (*adder)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    Run run = adder(app);
    cli->commands.emplace_back(app.get_subcommands({})[before], std::move(run));
  };
  add(add_train);
  add(add_init);
  add(add_eval);
  add(add_generate);
  add(add_logits);
  add(add_tokenize);
  add(add_quantize);
  add(add_params);
  add(add_inspect);
  add(add_demo);
  add(add_bench);
  return cli;
}

}  // namespace moe::cli
