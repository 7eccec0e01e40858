// `moe quantize`: a model written as a GGUF file of one of llama.cpp's file types
// (moe/gguf_write.h), or a checkpoint's routed experts rewritten as bf16 or int8 with per-row
// scales (moe/quantize.h).
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>

#include "commands.h"
#include "moe/error.h"
#include "moe/gguf_write.h"
#include "moe/quantize.h"

namespace moe::cli {

namespace {

struct QuantizeArgs {
  std::string model_dir, out, format = "int8", type;
};

// A progress line on stderr: redrawn in place on a terminal, every tenth otherwise.
void show_progress(const std::string& what, int64_t done, int64_t total) {
  static const bool tty = isatty(STDERR_FILENO) != 0;
  const int width = 24;
  const int filled = static_cast<int>(width * done / std::max<int64_t>(1, total));
  const std::string line =
      fmt::format("{:>6}/{} [{}{}] {}", done, total, std::string(static_cast<size_t>(filled), '#'),
                  std::string(static_cast<size_t>(width - filled), '-'), what);
  if (tty)
    fmt::print(stderr, "\r{}\x1b[K{}", line, done == total ? "\n" : "");
  else if (done == total || done % std::max<int64_t>(1, total / 10) == 0)
    fmt::print(stderr, "{}\n", line);
}

int run_gguf(const QuantizeArgs& a) {
  const GgufFileType ft = parse_gguf_file_type(a.type);
  const auto t0 = std::chrono::steady_clock::now();
  const GgufWriteReport r = write_gguf_model(
      a.model_dir, a.out, ft,
      [](const std::string& name, int64_t d, int64_t n) { show_progress(name, d, n); });
  for (const std::string& note : r.notes) fmt::print(stderr, "note: {}\n", note);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("{} ({}): {}\nwrote {} in {:.1f} s\n", gguf_file_type_info(ft).name, r.architecture,
             r.str(), a.out, s);
  return 0;
}

int run_quantize(const QuantizeArgs& a) {
  if (!a.type.empty()) return run_gguf(a);
  MOE_CHECK(a.out.size() < 5 || a.out.compare(a.out.size() - 5, 5, ".gguf") != 0, "quantize",
            "{}: to write a GGUF file give its type (--type Q8_0, Q4_K_M, MXFP4, BF16, ...)",
            a.out);
  const ExpertFormat format = parse_expert_format(a.format);
  const auto t0 = std::chrono::steady_clock::now();
  auto progress = [&](int64_t done, int64_t total) {
    show_progress("expert matrices", done, total);
  };
  const QuantizeReport r = quantize_checkpoint(a.model_dir, a.out, format, progress);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("{} experts: {}\nwrote {} in {:.1f} s\n", to_string(format), r.str(), a.out, s);
  return 0;
}

std::string types_help() {
  std::string s =
      "write a GGUF file (llama.cpp's format, which llama.cpp and this engine load) of this "
      "file type, with llama-quantize's choice of type per tensor; norms, routers and biases stay "
      "F32. Types:";
  for (const GgufFileTypeInfo& i : gguf_file_types())
    s += fmt::format("\n  {:<10} {}", i.name, i.help);
  s += "\n  (MXFP4 = MXFP4_MOE; names are case-insensitive)";
  return s;
}

}  // namespace

Run add_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd = app.add_subcommand(
      "quantize",
      "write a model as a GGUF file (--type: llama.cpp's file types, quantized as llama-quantize "
      "quantizes), or store a checkpoint's routed experts in fewer bytes (--to: bf16, or int8 "
      "with one float32 scale per row; other tensors and files are copied, the training state "
      "is not)");
  cmd->add_option("-m,--model", a->model_dir,
                  "the model: a checkpoint folder (ours or HuggingFace) or, with --type, also a "
                  "GGUF file (requantized; quantized tensors go through float32)")
      ->required();
  cmd->add_option("-o,--out", a->out,
                  "with --type: the .gguf file to write (atomically; never the input); else the "
                  "folder to write the quantized checkpoint to")
      ->required();
  auto* type = cmd->add_option("--type", a->type, types_help());
  cmd->add_option("--to", a->format, "without --type: expert format, int8 or bf16")
      ->check(CLI::IsMember({"int8", "bf16"}))
      ->capture_default_str()
      ->excludes(type);
  return [a] { return run_quantize(*a); };
}

}  // namespace moe::cli
