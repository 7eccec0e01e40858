// The `moe` CLI: each subcommand lives in its own cmd_*.cpp and registers itself here.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/trainer.h"

namespace moe::cli {

// A subcommand's run function; returns the process exit status.
using Run = std::function<int()>;

// The whole command line: the app, and each subcommand with the function that runs it once
// parsed (the one whose `parsed()` is true).
struct Cli {
  CLI::App app;
  std::vector<std::pair<CLI::App*, Run>> commands;
};
std::unique_ptr<Cli> make_cli();

// --weights stored|f32 of the commands that read a model for inference: stored (the default)
// computes from the checkpoint's weights as the files store them, f32 reads them into float32.
void add_weights_option(CLI::App* cmd, std::string& value);
// --activations int8|f32 (cpu::set_quant_activations); add_weights_option adds it too.
void add_activations_option(CLI::App* cmd);
WeightsAs weights_as(const std::string& value);

// Token id lists as the CLI writes them: "1,2,3;4,5,6" -> {{1, 2, 3}, {4, 5, 6}}; `what` names
// the flag in errors.
std::vector<std::vector<int32_t>> parse_id_lists(const std::string& text, const char* what);

// Adds the subcommand to `app` and returns the function that runs it once parsed.
Run add_demo(CLI::App& app);
Run add_bench(CLI::App& app);
// `moe bench decode -m DIR` and `moe bench prefill -m DIR` (cmd_bench_model.cpp): a checkpoint
// with its weights as stored, tokens/s against the bandwidth floor, load time, peak memory.
enum class BenchModel { decode, prefill };
// With cache_mb > 0 (decode), the routed experts stay in the files behind an expert cache of
// that size (routing policy, read-ahead), and its counts are reported. With batch > 1 (decode),
// the same steps for that many sequences at once are measured too, against one sequence.
int bench_model(const std::string& dir, BenchModel what, int64_t tokens, int threads, bool json,
                double cache_mb = 0, int64_t batch = 1);
// `moe bench gemm`, under `bench` (cmd_bench_gemm.cpp).
std::pair<CLI::App*, Run> add_bench_gemm(CLI::App& bench);
Run add_train(CLI::App& app);
Run add_init(CLI::App& app);
Run add_eval(CLI::App& app);
Run add_params(CLI::App& app);
Run add_inspect(CLI::App& app);
Run add_generate(CLI::App& app);
Run add_logits(CLI::App& app);
Run add_tokenize(CLI::App& app);
Run add_quantize(CLI::App& app);
Run add_upcycle(CLI::App& app);
Run add_distill(CLI::App& app);
Run add_serve(CLI::App& app);
Run add_template(CLI::App& app);

}  // namespace moe::cli
