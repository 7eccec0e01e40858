// `moe bench layer`: the MoE layer against a dense SwiGLU FFN with the same active FLOPs, in one
// run on the same engine and thread count: forward and forward+backward, medians after warm-up.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "layer_options.h"
#include "moe/dense_ffn.h"
#include "moe/kernels.h"
#include "moe/moe_layer.h"
#include "moe/threading.h"
#include "timing.h"

namespace moe::cli {

namespace {

// The machine's large-GEMM throughput (GFLOP/s): a square float32 GEMM of size 2048 through the
// same BLAS and threads, the median of a few runs.
double gemm_peak_gflops() {
  const int64_t n = 2048;
  Tensor a = Tensor::empty({n, n}, DType::F32), b = Tensor::empty({n, n}, DType::F32),
         c = Tensor::empty({n, n}, DType::F32);
  Rng rng(1);
  rng.fill_normal(a, 0, 1);
  rng.fill_normal(b, 0, 1);
  const double ms = median_ms(1, 5, [&] {
    cpu::gemm<float>(false, true, n, n, n, 1.0f, a.data<float>(), n, b.data<float>(), n, 0.0f,
                     c.data<float>(), n);
  });
  return 2.0 * static_cast<double>(n * n * n) / ms / 1e6;
}

struct BenchLayer {
  LayerOptions opt;
  int warmup = 2;
  int reps = 10;
  bool json = false;
};

int run_bench_layer(BenchLayer& b) {
  const MoeConfig cfg = b.opt.finish();
  MOE_CHECK(b.reps >= 1 && b.warmup >= 0, "bench", "--reps must be >= 1 and --warmup >= 0");
  set_num_threads(b.opt.threads);
  const int64_t N = b.opt.tokens, D = cfg.d_model;
  Rng rng(b.opt.seed);
  MoeLayer layer(cfg);
  layer.init(rng);
  // Same active FLOPs: K experts of width F per token, plus the shared experts, as one FFN.
  const int64_t dense_width = cfg.top_k * cfg.d_ffn + cfg.n_shared * cfg.shared_width();
  DenseFfn dense(D, dense_width, cfg.act, cfg.expert_bias);
  dense.init(rng);
  Tensor x = Tensor::empty({N, D}, DType::F32);
  Tensor dy = Tensor::empty({N, D}, DType::F32);
  Tensor dx = Tensor::empty({N, D}, DType::F32);
  rng.fill_normal(x, 0, 1);
  rng.fill_normal(dy, 0, 1);
  Arena arena;

  RoutingStats stats;
  const std::vector<double> ms = interleaved_median_ms(b.warmup, b.reps,
                                                       {[&] {
                                                          arena.reset();
                                                          stats = layer.forward(x, arena).stats;
                                                        },
                                                        [&] {
                                                          arena.reset();
                                                          layer.forward(x, arena);
                                                          layer.backward(dy, dx, arena);
                                                        },
                                                        [&] {
                                                          arena.reset();
                                                          dense.forward(x, arena);
                                                        },
                                                        [&] {
                                                          arena.reset();
                                                          dense.forward(x, arena);
                                                          dense.backward(dy, dx, arena);
                                                        }});
  const double moe_fwd = ms[0], moe_fwdbwd = ms[1], dense_fwd = ms[2], dense_fwdbwd = ms[3];
  const int mats = cfg.act == ExpertAct::swiglu ? 3 : 2;
  const double fwd_flops = 2.0 * static_cast<double>(N * D * dense_width * mats);
  const double peak = gemm_peak_gflops();
  const double dense_gflops = 3 * fwd_flops / dense_fwdbwd / 1e6;
  if (b.json) {
    nlohmann::json j = {{"config", cfg},
                        {"tokens", N},
                        {"threads", num_threads()},
                        {"moe_fwd_ms", moe_fwd},
                        {"moe_fwdbwd_ms", moe_fwdbwd},
                        {"dense_fwd_ms", dense_fwd},
                        {"dense_fwdbwd_ms", dense_fwdbwd},
                        {"fwd_ratio", moe_fwd / dense_fwd},
                        {"fwdbwd_ratio", moe_fwdbwd / dense_fwdbwd},
                        {"dense_fwd_gflops", fwd_flops / dense_fwd / 1e6},
                        {"dense_fwdbwd_gflops", dense_gflops},
                        {"gemm_peak_gflops", peak},
                        {"dense_of_peak", dense_gflops / peak},
                        {"load_imbalance", stats.load_imbalance}};
    fmt::print("{}\n", j.dump());
    return 0;
  }
  fmt::print("MoE layer {}  N={}  threads={}\n", cfg.summary(), N, num_threads());
  fmt::print("dense SwiGLU-equivalent FFN width {} (same active FLOPs)\n\n", dense_width);
  fmt::print("{:<22}{:>12}{:>12}{:>10}\n", "", "MoE ms", "dense ms", "ratio");
  fmt::print("{:<22}{:>12.2f}{:>12.2f}{:>10.3f}\n", "forward", moe_fwd, dense_fwd,
             moe_fwd / dense_fwd);
  fmt::print("{:<22}{:>12.2f}{:>12.2f}{:>10.3f}\n", "forward+backward", moe_fwdbwd, dense_fwdbwd,
             moe_fwdbwd / dense_fwdbwd);
  fmt::print("\ndense throughput: {:.1f} GFLOP/s forward, {:.1f} GFLOP/s forward+backward\n",
             fwd_flops / dense_fwd / 1e6, dense_gflops);
  fmt::print("machine's large-GEMM throughput: {:.1f} GFLOP/s (dense FFN at {:.0f}% of it)\n", peak,
             100 * dense_gflops / peak);
  fmt::print("load imbalance of the random router: {:.3f}\n", stats.load_imbalance);
  return 0;
}

}  // namespace

Run add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "measure speed against the limit (dense FFN)");
  bench->require_subcommand(1);
  auto b = std::make_shared<BenchLayer>();
  b->opt.tokens = 2048;
  b->opt.cfg.d_model = 512;
  b->opt.cfg.d_ffn = 1408;
  b->opt.cfg.n_experts = 8;
  b->opt.cfg.top_k = 2;
  auto* layer = bench->add_subcommand(
      "layer", "MoE layer vs a dense SwiGLU FFN with the same active FLOPs (medians, ms)");
  b->opt.add_to(layer);
  layer->add_option("--warmup", b->warmup, "untimed runs first")->capture_default_str();
  layer->add_option("--reps", b->reps, "timed runs (the median is reported)")
      ->capture_default_str();
  layer->add_flag("--json", b->json,
                  "print one JSON object (moe_fwd_ms, moe_fwdbwd_ms, dense_fwd_ms, "
                  "dense_fwdbwd_ms, ...)");
  return [b] { return run_bench_layer(*b); };
}

}  // namespace moe::cli
