// `moe`: one binary, one subcommand per job. Exit status: 0 success, 2 bad usage or input,
// 1 anything else; messages go to stderr.
#include <fmt/core.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "moe/dist.h"
#include "moe/error.h"

namespace {

// An error ends the command. In a job of several ranks (mpirun) it ends every rank, so that none
// waits for this one in a collective.
int fail(const std::string& message, int code) {
  if (moe::dist::initialized() && moe::dist::Comm::world().size() > 1)
    moe::dist::abort_job(
        fmt::format("error: [rank {}] {}", moe::dist::Comm::world().rank(), message), code);
  fmt::print(stderr, "error: {}\n", message);
  if (code == 2) fmt::print(stderr, "run 'moe <command> --help' for the options\n");
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    moe::dist::init(&argc, &argv);  // started by mpirun: the ranks of a distributed job
  } catch (const moe::Error& e) {
    return fail(e.what(), 2);
  }
  CLI::App app{
      "moe.cpp: a Mixture-of-Experts engine (MoE layers with every routing method, training, "
      "inference of HuggingFace MoE checkpoints)",
      "moe"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moe.cpp 0.1.0");
  std::vector<std::pair<CLI::App*, moe::cli::Run>> commands;
  auto add = [&](moe::cli::Run (*adder)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    moe::cli::Run run = adder(app);
    commands.emplace_back(app.get_subcommands({})[before], std::move(run));
  };
  add(moe::cli::add_train);
  add(moe::cli::add_init);
  add(moe::cli::add_eval);
  add(moe::cli::add_generate);
  add(moe::cli::add_logits);
  add(moe::cli::add_tokenize);
  add(moe::cli::add_quantize);
  add(moe::cli::add_params);
  add(moe::cli::add_inspect);
  add(moe::cli::add_demo);
  add(moe::cli::add_bench);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) return run();
  } catch (const moe::Error& e) {
    return fail(e.what(), 2);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  }
  return 1;
}
