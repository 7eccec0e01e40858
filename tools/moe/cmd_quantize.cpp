// `moe quantize`: a checkpoint's routed experts rewritten as bf16 or int8 with per-row scales
// (moe/quantize.h).
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>

#include "commands.h"
#include "moe/quantize.h"

namespace moe::cli {

namespace {

struct QuantizeArgs {
  std::string model_dir, out, format = "int8";
};

int run_quantize(const QuantizeArgs& a) {
  const ExpertFormat format = parse_expert_format(a.format);
  const bool tty = isatty(STDERR_FILENO) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto progress = [&](int64_t done, int64_t total) {
    const int width = 24;
    const int filled = static_cast<int>(width * done / std::max<int64_t>(1, total));
    const std::string line = fmt::format("expert matrices {:>6}/{} [{}{}]", done, total,
                                         std::string(static_cast<size_t>(filled), '#'),
                                         std::string(static_cast<size_t>(width - filled), '-'));
    if (tty)
      fmt::print(stderr, "\r{}\x1b[K{}", line, done == total ? "\n" : "");
    else if (done == total || done % std::max<int64_t>(1, total / 10) == 0)
      fmt::print(stderr, "{}\n", line);
  };
  const QuantizeReport r = quantize_checkpoint(a.model_dir, a.out, format, progress);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("{} experts: {}\nwrote {} in {:.1f} s\n", to_string(format), r.str(), a.out, s);
  return 0;
}

}  // namespace

Run add_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd = app.add_subcommand(
      "quantize",
      "store a checkpoint's routed experts in fewer bytes: bf16, or int8 with one float32 scale "
      "per row (output channel); other tensors and files are copied, the training state is not");
  cmd->add_option("-m,--model", a->model_dir, "checkpoint folder (ours or HuggingFace)")
      ->required();
  cmd->add_option("-o,--out", a->out, "folder to write the quantized checkpoint to")->required();
  cmd->add_option("--to", a->format, "expert format: int8 or bf16")
      ->check(CLI::IsMember({"int8", "bf16"}))
      ->capture_default_str();
  return [a] { return run_quantize(*a); };
}

}  // namespace moe::cli
