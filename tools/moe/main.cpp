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
  const std::unique_ptr<moe::cli::Cli> cli = moe::cli::make_cli();
  CLI::App& app = cli->app;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    for (auto& [sub, run] : cli->commands)
      if (sub->parsed()) return run();
  } catch (const moe::Error& e) {
    return fail(e.what(), 2);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  }
  return 1;
}
