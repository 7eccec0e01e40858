// `moe upcycle`: a dense checkpoint turned into an MoE one whose experts start as copies of the
// dense FFNs (sparse upcycling, moe/upcycle.h).
#include <fmt/core.h>

#include <filesystem>

#include "commands.h"
#include "moe/error.h"
#include "moe/upcycle.h"

namespace moe::cli {

namespace {

struct UpcycleArgs {
  std::string model_dir, out, router = "topk";
  UpcycleOptions o;
};

int run_upcycle(const UpcycleArgs& a) {
  namespace fs = std::filesystem;
  UpcycleOptions o = a.o;
  o.router = parse_router_kind(a.router);
  const std::string dir = resolve_checkpoint(a.model_dir);
  std::error_code ec;
  MOE_CHECK(!fs::exists(a.out) || !fs::equivalent(dir, a.out, ec), "upcycle",
            "{} is the input checkpoint: give another folder", a.out);
  std::unique_ptr<Model> dense = load_model(dir, WeightsAs::float32);
  Model up = upcycle(*dense, o);
  save_model(up, a.out);
  // The tokenizer travels with the weights.
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"})
    if (fs::exists(fs::path(dir) / f))
      fs::copy_file(fs::path(dir) / f, fs::path(a.out) / f, fs::copy_options::overwrite_existing);
  const ParamCount before = count_params(dense->config()), after = count_params(up.config());
  int64_t moe_layers = 0;
  for (int64_t i = 0; i < up.config().n_layers; ++i) moe_layers += up.config().is_moe_layer(i);
  fmt::print(
      "upcycled {} of {} layers to {} experts of width {}, top-{} ({} router): {:.2f}M -> "
      "{:.2f}M parameters, {:.2f}M active per token\nwrote {}\n",
      moe_layers, up.config().n_layers, o.experts, up.config().moe.d_ffn, o.top_k, a.router,
      static_cast<double>(before.total) / 1e6, static_cast<double>(after.total) / 1e6,
      static_cast<double>(after.active) / 1e6, a.out);
  return 0;
}

}  // namespace

Run add_upcycle(CLI::App& app) {
  auto a = std::make_shared<UpcycleArgs>();
  auto* cmd = app.add_subcommand(
      "upcycle",
      "turn a dense checkpoint into an MoE one (sparse upcycling, Komatsuzaki et al. 2022): every "
      "expert of an upcycled layer starts as a copy of its FFN, each router new; with "
      "renormalized top-k weights the new model computes what the dense one does until training "
      "moves it (continue with moe train --init-from OUT)");
  cmd->add_option("-m,--model", a->model_dir, "the dense checkpoint folder")->required();
  cmd->add_option("-o,--out", a->out, "the folder to write the MoE checkpoint to")->required();
  cmd->add_option("--experts", a->o.experts, "routed experts per upcycled layer")
      ->capture_default_str();
  cmd->add_option("--top-k", a->o.top_k, "experts per token")->capture_default_str();
  cmd->add_option("--moe-every", a->o.moe_every,
                  "layer i becomes MoE when (i + 1) % N == 0: 2, every other FFN, as the paper "
                  "(and Switch, GShard) place them; 1: every layer")
      ->capture_default_str();
  cmd->add_option("--router", a->router,
                  "routing method (topk, switch, noisy_topk, gshard, soft, deepseek, ...; "
                  "docs/routing.md)")
      ->capture_default_str();
  cmd->add_option("--seed", a->o.seed, "seed of the routers' initialization")
      ->capture_default_str();
  cmd->add_option("--segments", a->o.segments,
                  "fine-grained experts (DeepSeekMoE): cut the FFN's hidden units into this many "
                  "runs, expert e holding run e % N (its down projection times N); 1: whole "
                  "copies")
      ->capture_default_str();
  return [a] { return run_upcycle(*a); };
}

}  // namespace moe::cli
