// libFuzzer target: the `moe` command line parser with every subcommand and option, on argument
// lists made of the input split at NUL bytes. Parsing accepts or refuses (CLI11's errors, which
// the binary reports as bad usage, or moe::Error); the commands themselves are not run.
#include <cstdint>
#include <string>
#include <vector>

#include "commands.h"
#include "moe/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args{"moe"};
  std::string cur;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += static_cast<char>(data[i]);
    }
  }
  if (!cur.empty()) args.push_back(cur);
  if (args.size() > 64) return 0;
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  const std::unique_ptr<moe::cli::Cli> cli = moe::cli::make_cli();
  try {
    cli->app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::Error&) {
  } catch (const moe::Error&) {
  }
  return 0;
}
