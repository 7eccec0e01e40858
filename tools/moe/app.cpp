// The `moe` command line: every subcommand registered on one CLI11 app (see commands.h).
#include <utility>

#include "commands.h"
#include "moe/cpu.h"
#include "moe/weights.h"

namespace moe::cli {

void add_weights_option(CLI::App* cmd, std::string& value) {
  cmd->add_option("--weights", value,
                  "stored: compute from the weights as the checkpoint stores them (bf16, f16, f32, "
                  "GGUF's quantized blocks; mapped, resident memory about the files' size); f32: "
                  "read them into float32 copies")
      ->check(CLI::IsMember({"stored", "f32"}))
      ->capture_default_str();
  add_activations_option(cmd);
}

void add_activations_option(CLI::App* cmd) {
  cmd->add_option_function<std::string>(
         "--activations",
         [](const std::string& v) {
           cpu::set_quant_activations(v == "f32" ? cpu::QuantActivations::f32
                                                 : cpu::QuantActivations::int8);
         },
         "how Q4_K, Q5_K, Q6_K, Q8_0 and MXFP4 weights (GGUF) are multiplied: int8 rounds the "
         "activations per block and multiplies in integers, as llama.cpp does (default, "
         "faster; a token's result the same alone or in a prompt); f32 keeps them float32 "
         "(within 1e-5 of the dequantized weights' float32 result)")
      ->check(CLI::IsMember({"int8", "f32"}))
      ->default_str("int8");
}

WeightsAs weights_as(const std::string& value) {
  return value == "f32" ? WeightsAs::float32 : WeightsAs::stored;
}

std::unique_ptr<Cli> make_cli() {
  auto cli = std::make_unique<Cli>();
  CLI::App& app = cli->app;
  app.description(
      "moe.cpp: a Mixture-of-Experts engine (MoE layers with every routing method, training, "
      "inference of HuggingFace MoE checkpoints)");
  app.name("moe");
  app.require_subcommand(1);
  app.set_version_flag("--version", "moe.cpp 0.1.0");
  // Before or after the subcommand: `moe --cpu-path avx2 bench gemm`, `moe bench gemm
  // --cpu-path avx2`.
  app.fallthrough();
  app.add_option_function<std::string>(
         "--cpu-path", [](const std::string& name) { set_cpu_path_cap(*parse_cpu_path(name)); },
         "run the kernels of this path or a lower one (default: the best the CPU has; also the "
         "MOE_CPU_PATH environment variable)")
      ->check(CLI::IsMember(cpu_path_names()))
      ->option_text("generic|avx2|avx512|avx512_vnni|avx512_bf16|amx");
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
  add(add_upcycle);
  add(add_distill);
  add(add_serve);
  add(add_template);
  add(add_params);
  add(add_inspect);
  add(add_demo);
  add(add_bench);
  return cli;
}

}  // namespace moe::cli
