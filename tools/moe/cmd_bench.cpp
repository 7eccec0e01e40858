// `moe bench layer`: the MoE layer against a dense SwiGLU FFN with the same active FLOPs, in one
// run on the same engine and thread count: forward and forward+backward, medians after warm-up.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "commands.h"
#include "layer_options.h"
#include "moe/data.h"
#include "moe/dense_ffn.h"
#include "moe/dist.h"
#include "moe/generate.h"
#include "moe/kernels.h"
#include "moe/model.h"
#include "moe/moe_layer.h"
#include "moe/threading.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"
#include "moe/weights.h"
#include "timing.h"

namespace moe::cli {

namespace {

// One 2048^3 product of the float32 GEMM's library, or of the bf16 GEMM (both operands bf16), at
// a time: the step's floor measured between its steps, so that both see the machine alike.
class GemmProbe {
 public:
  explicit GemmProbe(bool bf16) : bf16_(bf16) {
    const size_t nn = static_cast<size_t>(kN * kN);
    Rng rng(1);
    if (bf16_) {
      ha_.resize(nn);
      hb_.resize(nn);
      for (uint16_t& v : ha_) v = f32_to_bf16(static_cast<float>(rng.normal()));
      for (uint16_t& v : hb_) v = f32_to_bf16(static_cast<float>(rng.normal()));
    } else {
      fa_.resize(nn);
      fb_.resize(nn);
      for (float& v : fa_) v = static_cast<float>(rng.normal());
      for (float& v : fb_) v = static_cast<float>(rng.normal());
    }
    c_.resize(nn);
    run_gflops();  // warm: the library's buffers and the wide units
  }
  double run_gflops() {
    const auto t0 = std::chrono::steady_clock::now();
    if (bf16_) {
      cpu::gemm_bf16(false, true, kN, kN, kN, 1.0f, ha_.data(), kN, hb_.data(), kN, 0.0f, c_.data(),
                     kN);
    } else {
      cpu::gemm_f32_library(false, true, kN, kN, kN, 1.0f, fa_.data(), kN, fb_.data(), kN, 0.0f,
                            c_.data(), kN);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 2.0 * static_cast<double>(kN * kN * kN) / s / 1e9;
  }

 private:
  static constexpr int64_t kN = 2048;
  bool bf16_;
  std::vector<float> fa_, fb_, c_;
  std::vector<uint16_t> ha_, hb_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The machine's large-GEMM throughput (GFLOP/s): a square float32 GEMM of size 2048 in one call
// of the best library here (cpu::gemm_f32_library, threaded its own way; the engine's tiled
// GEMM, which keeps the bits independent of the thread count, is measured against it), the
// median of five runs.
double gemm_peak_gflops() {
  GemmProbe probe(false);
  std::vector<double> runs;
  for (int i = 0; i < 5; ++i) runs.push_back(probe.run_gflops());
  return median(runs);
}

// The multiply-adds per token of a training step's matrix products, forward only: every active
// parameter that multiplies (the embedding lookup and the norms do not; the output head does),
// plus causal attention's scores and weighted sum (on average (T + 1) / 2 keys per query). A
// forward and backward pass costs three times this, times two FLOPs per multiply-add.
double matmul_macs_per_token(const ModelConfig& m, int64_t seq_len) {
  const ParamCount n = count_params(m);
  const double weights = static_cast<double>(n.active - n.embedding - n.norms) +
                         static_cast<double>(m.vocab_size * m.d_model);
  const int64_t qk = m.mla() ? m.qk_nope_dim + m.qk_rope_dim : m.head_size();
  const int64_t v = m.mla() ? m.v_head_dim : m.head_size();
  const double keys = static_cast<double>(seq_len + 1) / 2.0;
  return weights + static_cast<double>(m.n_layers * m.n_heads * (qk + v)) * keys;
}

struct BenchPrefill {
  std::string model;
  int64_t tokens = 512;
  int threads = 0;
  bool json = false;
};

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
  const int mats = gated(cfg.act) ? 3 : 2;
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

// ---------------------------------------------------------------------------------------------
// moe bench decode: one token at a time (batch 1) against the memory-bandwidth floor.

struct BenchDecode {
  int64_t dim = 1024, ffn = 4096, experts = 8, top_k = 2, layers = 4, vocab = 8192;
  int64_t prompt = 16, tokens = 32;
  int threads = 0;
  bool json = false;
  std::string model;    // a checkpoint folder: measure it instead of a made-up model
  double cache_mb = 0;  // with model: offload the experts behind a cache of this size
  int64_t batch = 1;    // with model: also decode this many sequences together
};

int run_bench_decode(const BenchDecode& b) {
  if (!b.model.empty())
    return bench_model(b.model, BenchModel::decode, b.tokens, b.threads, b.json, b.cache_mb,
                       b.batch);
  set_num_threads(b.threads);
  ModelConfig c;
  c.vocab_size = b.vocab;
  c.d_model = b.dim;
  c.n_layers = b.layers;
  c.n_heads = b.dim / 64;
  c.n_kv_heads = std::max<int64_t>(1, c.n_heads / 4);
  c.d_ffn = b.ffn;
  c.max_seq_len = b.prompt + b.tokens;
  c.moe.d_model = b.dim;
  c.moe.d_ffn = b.ffn;
  c.moe.n_experts = b.experts;
  c.moe.top_k = b.top_k;
  c.validate();
  const ParamCount n = count_params(c);
  const double expert_bytes = 4.0 * static_cast<double>(3 * b.dim * b.ffn);
  fmt::print(stderr, "model: {:.2f} GB of weights, {:.2f} GB of them routed experts; filling...\n",
             4.0 * static_cast<double>(n.total) / 1e9,
             4.0 * static_cast<double>(n.routed_experts) / 1e9);
  Model model(c);
  Rng rng(1);
  for (NamedParam& p : model.params()) rng.fill_uniform(p.value, -0.02, 0.02);
  // Weights one token reads: all but the routed experts and the embedding table, plus top_k
  // experts per MoE layer and one embedding row.
  const double static_bytes =
      4.0 * static_cast<double>(n.total - n.routed_experts - b.vocab * b.dim + b.dim);
  const double token_bytes = static_bytes + static_cast<double>(b.layers * b.top_k) * expert_bytes;
  const double bw = read_bandwidth_gbs();
  // Greedy decoding: the prompt in one pass, then one token per step, each step timed.
  KvCache cache = model.make_cache(1, c.max_seq_len);
  Arena arena;
  Tensor tok = Tensor::empty({1, b.prompt}, DType::I32);
  for (int64_t i = 0; i < b.prompt; ++i) tok.data<int32_t>()[i] = static_cast<int32_t>(i % b.vocab);
  Tensor logits = model.decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last);
  int32_t next =
      static_cast<int32_t>(std::max_element(logits.data<float>(), logits.data<float>() + b.vocab) -
                           logits.data<float>());
  Tensor one = Tensor::empty({1, 1}, DType::I32);
  std::vector<double> ms;
  for (int64_t i = 0; i < b.tokens; ++i) {
    one.data<int32_t>()[0] = next;
    arena.reset();
    const auto t0 = std::chrono::steady_clock::now();
    logits = model.decode(one, cache, arena);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    const float* l = logits.data<float>();
    next = static_cast<int32_t>(std::max_element(l, l + b.vocab) - l);
  }
  std::sort(ms.begin(), ms.end());
  const double per_token = ms[ms.size() / 2];
  const double floor_ms = token_bytes / bw / 1e6;
  if (b.json) {
    fmt::print("{}\n",
               nlohmann::json{{"threads", num_threads()},
                              {"weights_gb", 4.0 * static_cast<double>(n.total) / 1e9},
                              {"experts_gb", 4.0 * static_cast<double>(n.routed_experts) / 1e9},
                              {"bytes_per_token", token_bytes},
                              {"read_bandwidth_gbs", bw},
                              {"floor_ms", floor_ms},
                              {"decode_ms_per_token", per_token},
                              {"ratio_to_floor", per_token / floor_ms},
                              {"tokens_per_s", 1e3 / per_token}}
                   .dump());
    return 0;
  }
  fmt::print("decode, batch 1: {} layers, D={}, {} experts of F={} (top-{}), {} threads\n",
             b.layers, b.dim, b.experts, b.ffn, b.top_k, num_threads());
  fmt::print("weights read per token  {:.1f} MB\n", token_bytes / 1e6);
  fmt::print("read bandwidth          {:.1f} GB/s\n", bw);
  fmt::print("bandwidth floor         {:.2f} ms per token\n", floor_ms);
  fmt::print("measured (median)       {:.2f} ms per token ({:.1f} tokens/s)\n", per_token,
             1e3 / per_token);
  fmt::print("ratio to the floor      {:.3f}\n", per_token / floor_ms);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// moe bench train: training steps of a preset model (the default: the main job's), tokens/s.

struct BenchTrain {
  std::string preset = "small";
  int64_t batch = 16, seq_len = 128;
  int warmup = 2, steps = 8;
  int threads = 0;
  int64_t expert_parallel = 1;
  std::vector<std::string> dtypes = {"f32"};
  bool json = false;
};

// Random printable text: a step's cost does not depend on what the bytes say.
Corpus random_corpus(int64_t seq_len) {
  Corpus corpus;
  corpus.languages = {"random"};
  Rng rng(7);
  for (int d = 0; d < 64; ++d) {
    std::string text(static_cast<size_t>(seq_len * 4), ' ');
    for (char& ch : text) ch = static_cast<char>(rng.randint(32, 127));
    corpus.docs.push_back({text, 0});
  }
  return corpus;
}

// Under mpirun: --batch sequences per rank (equal work per rank whatever the rank count), the
// step time, and the all-to-all bytes per step (counted by the communicator, all ranks) against
// the minimum: every MoE layer's distinct (token, remote rank) rows, four times (forward
// dispatch and return, backward dispatch and return).
int run_bench_train_distributed(const BenchTrain& b) {
  const dist::Comm world = dist::Comm::world();
  set_num_threads(b.threads > 0 ? b.threads
                                : std::max(1, num_cores() / dist::ranks_on_this_machine()));
  TrainConfig t;
  t.batch = b.batch * world.size();
  t.seq_len = b.seq_len;
  t.steps = b.warmup + b.steps;
  t.val_every = 1000;
  t.expert_parallel = b.expert_parallel;
  const ModelConfig m = model_preset(b.preset);
  Trainer trainer(m, t, random_corpus(b.seq_len));
  const dist::ExpertGroups& g = *trainer.groups();
  std::vector<double> ms;
  int64_t counts[3] = {0, 0, 0};  // bytes sent, rows sent, distinct (token, rank) rows
  for (int i = 0; i < b.warmup + b.steps; ++i) {
    g.ep.reset_counters();
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    const StepLog s = trainer.train_step();
    const double step =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (i < b.warmup) continue;
    ms.push_back(world.max(step));
    counts[0] += g.ep.alltoall_bytes_sent();
    counts[1] += s.remote_rows;
    counts[2] += s.remote_tokens;
  }
  world.sum(counts, 3);
  std::sort(ms.begin(), ms.end());
  const double step_ms = ms[ms.size() / 2];
  const double steps = static_cast<double>(b.steps);
  const double bytes = static_cast<double>(counts[0]) / steps;
  const double row_bytes = static_cast<double>(m.d_model) * sizeof(float);
  const double min_bytes = 4.0 * static_cast<double>(counts[2]) * row_bytes / steps;
  const double tps = static_cast<double>(t.batch * b.seq_len) / step_ms * 1e3;
  if (world.rank() != 0) return 0;
  if (b.json) {
    fmt::print("{}\n", nlohmann::json{{"preset", b.preset},
                                      {"ranks", world.size()},
                                      {"expert_parallel", g.ep_size()},
                                      {"threads_per_rank", num_threads()},
                                      {"batch_per_rank", b.batch},
                                      {"seq_len", b.seq_len},
                                      {"step_ms", step_ms},
                                      {"tokens_per_s", tps},
                                      {"alltoall_bytes_per_step", bytes},
                                      {"min_alltoall_bytes_per_step", min_bytes},
                                      {"alltoall_rows_per_step", counts[1] / b.steps},
                                      {"alltoall_over_min", min_bytes > 0 ? bytes / min_bytes : 0}}
                           .dump());
    return 0;
  }
  fmt::print(
      "training step, preset {}, {} ranks ({} expert-parallel), {} x {} tokens per rank, {} "
      "threads per rank\n",
      b.preset, world.size(), g.ep_size(), b.batch, b.seq_len, num_threads());
  fmt::print("step (median of {})        {:.1f} ms\ntokens per second           {:.0f}\n", b.steps,
             step_ms, tps);
  fmt::print("all-to-all per step         {:.2f} MB (minimum {:.2f} MB, ratio {:.2f})\n",
             bytes / 1e6, min_bytes / 1e6, min_bytes > 0 ? bytes / min_bytes : 0);
  return 0;
}

int run_bench_train(const BenchTrain& b) {
  MOE_CHECK(b.steps >= 1 && b.warmup >= 0, "bench", "--steps must be >= 1 and --warmup >= 0");
  if (dist::Comm::world().size() > 1 || b.expert_parallel > 1)
    return run_bench_train_distributed(b);
  set_num_threads(b.threads);
  const ModelConfig m = model_preset(b.preset);
  // One trainer per dtype, their steps interleaved: the machine's drift touches each alike.
  std::vector<std::unique_ptr<Trainer>> trainers;
  for (const std::string& dtype : b.dtypes) {
    TrainConfig t;
    t.batch = b.batch;
    t.seq_len = b.seq_len;
    t.steps = b.warmup + b.steps;
    t.val_every = 1000;
    t.dtype = dtype;
    trainers.push_back(std::make_unique<Trainer>(m, t, random_corpus(b.seq_len)));
  }
  // The floor of each step: its matrix products at the 2048^3 GEMM's throughput (bf16 operands:
  // the bf16 GEMM's), measured right after that step.
  bool any_bf16 = false;
  for (const auto& t : trainers) any_bf16 |= t->config().matmul_dtype() == "bf16";
  std::optional<GemmProbe> probe_f32, probe_bf16;
  probe_f32.emplace(false);
  if (any_bf16) probe_bf16.emplace(true);
  std::vector<std::vector<double>> ms(trainers.size()), peaks(trainers.size());
  for (int i = 0; i < b.warmup + b.steps; ++i)
    for (size_t d = 0; d < trainers.size(); ++d) {
      const auto t0 = std::chrono::steady_clock::now();
      trainers[d]->train_step();
      if (i < b.warmup) continue;
      ms[d].push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      const bool bf16 = trainers[d]->config().matmul_dtype() == "bf16";
      peaks[d].push_back(bf16 ? probe_bf16->run_gflops() : probe_f32->run_gflops());
    }
  const ParamCount n = count_params(m);
  const double step_gflop =
      6.0 * matmul_macs_per_token(m, b.seq_len) * static_cast<double>(b.batch * b.seq_len) / 1e9;
  nlohmann::json runs = nlohmann::json::array();
  for (size_t d = 0; d < trainers.size(); ++d) {
    std::vector<double> ratios;  // each step against the floor measured beside it
    for (size_t i = 0; i < ms[d].size(); ++i)
      ratios.push_back(ms[d][i] / (step_gflop / peaks[d][i] * 1e3));
    const double step_ms = median(ms[d]), p = median(peaks[d]);
    runs.push_back(
        {{"dtype", trainers[d]->config().matmul_dtype()},
         {"step_ms", step_ms},
         {"tokens_per_s", static_cast<double>(b.batch * b.seq_len) / step_ms * 1e3},
         {"gemm_peak_gflops", p},
         {"floor_ms", step_gflop / p * 1e3},
         {"ratio_to_floor", median(ratios)},
         {"speedup_over_first", runs.empty() ? 1.0 : runs[0]["step_ms"].get<double>() / step_ms}});
  }
  if (b.json) {
    nlohmann::json j = {{"preset", b.preset},
                        {"threads", num_threads()},
                        {"batch", b.batch},
                        {"seq_len", b.seq_len},
                        {"total_params", n.total},
                        {"active_params", n.active},
                        {"matmul_gflop_per_step", step_gflop},
                        {"runs", runs}};
    // The first run's figures at the top level too (the fields of earlier versions).
    for (const char* key :
         {"step_ms", "tokens_per_s", "gemm_peak_gflops", "floor_ms", "ratio_to_floor"})
      j[key] = runs[0][key];
    fmt::print("{}\n", j.dump());
    return 0;
  }
  fmt::print(
      "training step, preset {} ({:.2f}M parameters, {:.2f}M active), {} x {} tokens, {} "
      "threads, {:.2f} GFLOP of matrix products\n",
      b.preset, static_cast<double>(n.total) / 1e6, static_cast<double>(n.active) / 1e6, b.batch,
      b.seq_len, num_threads(), step_gflop);
  if (any_bf16) fmt::print("bf16 operands: {}\n", cpu::gemm_bf16_backend_info());
  fmt::print("{:<6} {:>12} {:>10} {:>14} {:>10} {:>10} {:>9}\n", "dtype",
             fmt::format("step (med {})", b.steps), "tokens/s", "GEMM GFLOP/s", "floor ms",
             "of floor", "speed-up");
  for (const nlohmann::json& r : runs)
    fmt::print("{:<6} {:>9.1f} ms {:>10.0f} {:>14.0f} {:>10.1f} {:>9.2f}x {:>8.2f}x\n",
               r["dtype"].get<std::string>(), r["step_ms"].get<double>(),
               r["tokens_per_s"].get<double>(), r["gemm_peak_gflops"].get<double>(),
               r["floor_ms"].get<double>(), r["ratio_to_floor"].get<double>(),
               r["speedup_over_first"].get<double>());
  fmt::print(
      "floor: the step's matrix products at the machine's 2048^3 GEMM throughput of that dtype, "
      "measured after each step (medians; of floor: the median of the steps' own ratios); "
      "speed-up: over the first dtype.\n");
  return 0;
}

// `moe bench tokenize`: loading time and encoding throughput of tokenizers on a corpus.
struct BenchTokenize {
  std::vector<std::string> models;
  std::vector<std::string> data;
  bool json = false;
};

int run_bench_tokenize(const BenchTokenize& b) {
  const Corpus corpus = b.data.empty() ? load_fortunes() : load_text(b.data);
  std::string text;
  for (const Document& d : corpus.docs) text += d.text + "\n";
  const double mb = static_cast<double>(text.size()) / 1e6;
  nlohmann::json out = nlohmann::json::array();
  if (!b.json)
    fmt::print("{} documents, {:.2f} MB of text\n{:<48} {:>8} {:>9} {:>10} {:>9} {:>11}\n",
               corpus.docs.size(), mb, "tokenizer", "vocab", "load (s)", "ids", "bytes/id",
               "encode MB/s");
  for (const std::string& m : b.models) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::unique_ptr<Tokenizer> tok = load_tokenizer(m);
    const auto t1 = std::chrono::steady_clock::now();
    const size_t ids = tok->encode(text).size();
    const auto t2 = std::chrono::steady_clock::now();
    const double load_s = std::chrono::duration<double>(t1 - t0).count();
    const double enc_s = std::chrono::duration<double>(t2 - t1).count();
    const double bytes_per_id = static_cast<double>(text.size()) / static_cast<double>(ids);
    out.push_back({{"tokenizer", m},
                   {"vocab_size", tok->vocab_size()},
                   {"load_s", load_s},
                   {"text_mb", mb},
                   {"ids", ids},
                   {"bytes_per_id", bytes_per_id},
                   {"encode_s", enc_s},
                   {"encode_mb_per_s", mb / enc_s}});
    if (!b.json)
      fmt::print("{:<48} {:>8} {:>9.3f} {:>10} {:>9.2f} {:>11.2f}\n", m, tok->vocab_size(), load_s,
                 ids, bytes_per_id, mb / enc_s);
  }
  if (b.json) fmt::print("{}\n", out.dump());
  return 0;
}

}  // namespace

Run add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand(
      "bench", "measure speed: the MoE layer, a training step, decoding (see bench/ for peers)");
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
  auto d = std::make_shared<BenchDecode>();
  auto* decode = bench->add_subcommand(
      "decode", "batch-1 decoding of an MoE model against the memory-bandwidth floor");
  decode->add_option("--dim", d->dim, "model width")->capture_default_str();
  decode->add_option("--ffn", d->ffn, "expert width")->capture_default_str();
  decode->add_option("--experts", d->experts, "experts per layer")->capture_default_str();
  decode->add_option("--top-k", d->top_k, "experts per token")->capture_default_str();
  decode->add_option("--layers", d->layers, "layers (all MoE)")->capture_default_str();
  decode->add_option("--vocab", d->vocab, "vocabulary")->capture_default_str();
  decode->add_option("--prompt", d->prompt, "prompt tokens (one pass)")->capture_default_str();
  decode->add_option("-n,--tokens", d->tokens, "tokens decoded one at a time")
      ->capture_default_str();
  decode->add_option("-t,--threads", d->threads, "threads (0: all cores)")->capture_default_str();
  decode->add_flag("--json", d->json,
                   "print one JSON object (decode_ms_per_token, floor_ms, ratio_to_floor, ...; "
                   "with -m: tokens_per_s, floor_tokens_per_s, load_s, peak_rss_mb, ...)");
  decode->add_option(
      "-m,--model", d->model,
      "a checkpoint folder or GGUF file to measure (its weights as stored; -n tokens decoded "
      "after a 4-token prompt)");
  decode
      ->add_option("--expert-cache-mb", d->cache_mb,
                   "with -m: keep the routed experts in the files and at most this many MB of "
                   "them in memory (routing policy, read-ahead; 0: every expert mapped)")
      ->check(CLI::NonNegativeNumber);
  decode
      ->add_option("--batch", d->batch,
                   "with -m: also decode this many sequences together (a continuous-batching "
                   "step) and report their tokens/s against one sequence's")
      ->check(CLI::PositiveNumber);
  auto pf = std::make_shared<BenchPrefill>();
  auto* prefill = bench->add_subcommand(
      "prefill", "one prompt of a checkpoint in one pass: tokens/s against the GEMM limit");
  prefill->add_option("-m,--model", pf->model, "a checkpoint folder or GGUF file")->required();
  prefill->add_option("-n,--tokens", pf->tokens, "prompt tokens")->capture_default_str();
  prefill->add_option("-t,--threads", pf->threads, "threads (0: all cores)")->capture_default_str();
  prefill->add_flag("--json", pf->json,
                    "print one JSON object (tokens_per_s, load_s, peak_rss_mb, ...)");
  add_activations_option(decode);
  add_activations_option(prefill);
  auto tr = std::make_shared<BenchTrain>();
  auto* train = bench->add_subcommand("train", "training steps of a preset model, tokens/s");
  train->add_option("--preset", tr->preset, "model preset")->capture_default_str();
  train->add_option("--batch", tr->batch, "sequences per step")->capture_default_str();
  train->add_option("--seq-len", tr->seq_len, "tokens per sequence")->capture_default_str();
  train->add_option("--warmup", tr->warmup, "untimed steps first")->capture_default_str();
  train->add_option("--steps", tr->steps, "timed steps (the median is reported)")
      ->capture_default_str();
  train->add_option("-t,--threads", tr->threads, "threads (0: all cores)")->capture_default_str();
  train
      ->add_option("--expert-parallel", tr->expert_parallel,
                   "under mpirun -np P: experts split over EP ranks; --batch is then per rank, and "
                   "the all-to-all bytes per step are reported")
      ->capture_default_str();
  train
      ->add_option("--dtype", tr->dtypes,
                   "the matrix products' operands, one run each, steps interleaved: f32, bf16, "
                   "auto (moe train --dtype), e.g. --dtype f32 bf16")
      ->check(CLI::IsMember({"f32", "bf16", "auto"}))
      ->capture_default_str();
  train->add_flag("--json", tr->json, "print one JSON object (step_ms, tokens_per_s, ...)");
  auto tk = std::make_shared<BenchTokenize>();
  auto* tokenize = bench->add_subcommand(
      "tokenize", "tokenizers' loading time and encoding speed (MB/s) on a corpus");
  tokenize
      ->add_option("-m,--model", tk->models,
                   "tokenizer files or folders (tokenizer.json, tokenizer.model), one or more")
      ->required();
  tokenize->add_option("--data", tk->data,
                       "text files or folders (default: the fortunes, the default corpus)");
  tokenize->add_flag("--json", tk->json, "print a JSON array, one object per tokenizer");
  auto [gemm, run_gemm] = add_bench_gemm(*bench);
  return [b, d, tr, tk, pf, decode, train, tokenize, prefill, gemm = gemm, run_gemm = run_gemm] {
    if (gemm->parsed()) return run_gemm();
    if (prefill->parsed())
      return bench_model(pf->model, BenchModel::prefill, pf->tokens, pf->threads, pf->json);
    if (decode->parsed()) return run_bench_decode(*d);
    if (train->parsed()) return run_bench_train(*tr);
    if (tokenize->parsed()) return run_bench_tokenize(*tk);
    return run_bench_layer(*b);
  };
}

}  // namespace moe::cli
