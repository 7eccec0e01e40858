// `moe bench decode -m DIR` and `moe bench prefill -m DIR`: a real checkpoint, its weights kept as
// the files store them, measured against its limits in one run: decoding against the bandwidth
// floor (the bytes one token reads over the machine's read bandwidth), and the time to load and
// the peak resident memory beside the checkpoint's size.
#include <fmt/core.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "moe/cpu.h"
#include "moe/expert_cache.h"
#include "moe/gguf.h"
#include "moe/kernels.h"
#include "moe/model.h"
#include "moe/threading.h"
#include "moe/trainer.h"
#include "moe/weights.h"
#include "timing.h"

namespace moe::cli {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // KiB on Linux
}

// The read bandwidth, measured in a child process so that its 1 GiB buffer stays out of this
// process's peak resident memory.
double read_bandwidth_apart() {
  int fd[2];
  if (pipe(fd) != 0) return read_bandwidth_gbs();
  const pid_t pid = fork();
  if (pid == 0) {
    close(fd[0]);
    const double bw = read_bandwidth_gbs();
    if (write(fd[1], &bw, sizeof bw) != sizeof bw) _exit(1);
    _exit(0);
  }
  close(fd[1]);
  double bw = 0;
  const bool ok = pid > 0 && read(fd[0], &bw, sizeof bw) == sizeof bw;
  close(fd[0]);
  if (pid > 0) waitpid(pid, nullptr, 0);
  return ok ? bw : read_bandwidth_gbs();
}

// Bytes of weights a decoding step reads: `fixed` (every tensor but the routed experts and the
// embedding table, so the output head whole; one embedding row per token aside) and
// `per_expert`, one routed expert of one MoE layer (stored like the embedding). One token reads
// fixed + moe_layers top_k per_expert.
struct StepBytes {
  double fixed = 0, per_expert = 0;
  int64_t moe_layers = 0;
  double per_token(const ModelConfig& c) const {
    return fixed + static_cast<double>(moe_layers * c.moe.top_k) * per_expert;
  }
};

int64_t count_moe_layers(const ModelConfig& c) {
  int64_t n = 0;
  for (int64_t i = 0; i < c.n_layers; ++i) n += c.is_moe_layer(i) ? 1 : 0;
  return n;
}

StepBytes step_bytes(Model& model) {
  const ModelConfig& c = model.config();
  StepBytes b;
  b.moe_layers = count_moe_layers(c);
  DType stored = DType::F32;
  for (const NamedParam& p : model.params()) {
    if (p.name == "embed.weight") {
      stored = p.value.dtype();
      b.fixed += static_cast<double>(dtype_bytes(stored, c.d_model));
      if (c.tie_embeddings) b.fixed += static_cast<double>(p.value.nbytes());
      continue;
    }
    if (p.routed) continue;
    b.fixed += static_cast<double>(p.value.nbytes());
  }
  const int64_t mats = gated(c.moe.act) ? 3 : 2;
  b.per_expert = static_cast<double>(mats * dtype_bytes(stored, c.d_model * c.moe.d_ffn));
  return b;
}

// The same for a GGUF file, from its tensors' own sizes (each may have its own type): the
// routed experts' tensors (ffn_*_exps) are shared out over their experts.
StepBytes gguf_step_bytes(const GgufFile& f, const ModelConfig& c) {
  StepBytes b;
  b.moe_layers = count_moe_layers(c);
  double experts = 0;
  for (const GgufTensor& t : f.tensors) {
    const auto n = static_cast<double>(t.bytes);
    if (t.name == "token_embd.weight") {
      b.fixed += n / static_cast<double>(t.rows());
      if (c.tie_embeddings) b.fixed += n;
    } else if (t.name.find("_exps.") != std::string::npos) {
      experts += n;
    } else {
      b.fixed += n;
    }
  }
  if (b.moe_layers > 0)
    b.per_expert = experts / static_cast<double>(b.moe_layers * c.moe.n_experts);
  return b;
}

// Greedy decoding of `batch` sequences together (cache slots 0..batch-1): a prompt pass, then
// `tokens` steps of one token each; every step's milliseconds and the whole's seconds, the
// distinct routed experts a step read per MoE layer (mean), and the key/value cache's bytes per
// position.
struct DecodeRun {
  std::vector<double> ms;
  double total_s = 0;
  double experts_per_layer = 0;
  double kv_bytes_per_position = 0;
};

DecodeRun decode_run(Model& model, Arena& arena, int64_t batch, int64_t prompt, int64_t tokens) {
  const int64_t V = model.config().vocab_size;
  KvCache cache = model.make_cache(batch, prompt + tokens + 1);
  DecodeRun r;
  for (size_t l = 0; l < cache.k.size(); ++l)
    r.kv_bytes_per_position += static_cast<double>(cache.k[l].nbytes() + cache.v[l].nbytes()) /
                               static_cast<double>(cache.slots * cache.capacity);
  Tensor tok = Tensor::empty({batch, prompt}, DType::I32);
  for (int64_t i = 0; i < batch * prompt; ++i)
    tok.data<int32_t>()[i] = static_cast<int32_t>((i * 7919 + 13) % V);
  arena.reset();
  Tensor logits = model.decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last);
  Tensor next = Tensor::empty({batch, 1}, DType::I32);
  const auto argmax = [&](const Tensor& l) {
    for (int64_t b = 0; b < batch; ++b) {
      const float* p = l.data<float>() + b * V;
      next.data<int32_t>()[b] = static_cast<int32_t>(std::max_element(p, p + V) - p);
    }
  };
  argmax(logits);
  int64_t distinct = 0, layer_steps = 0;
  ModelOutput routing;
  const auto d0 = Clock::now();
  for (int64_t i = 0; i < tokens; ++i) {
    arena.reset();
    const auto s0 = Clock::now();
    logits = model.decode(next, cache, arena, {}, nullptr, Model::LogitRows::all, &routing);
    r.ms.push_back(seconds_since(s0) * 1e3);
    argmax(logits);
    for (const Tensor& ex : routing.plan_experts) {
      std::vector<int32_t> e(ex.data<int32_t>(), ex.data<int32_t>() + ex.numel());
      std::sort(e.begin(), e.end());
      distinct += std::unique(e.begin(), e.end()) - e.begin();
      ++layer_steps;
    }
  }
  r.total_s = seconds_since(d0);
  r.experts_per_layer =
      static_cast<double>(distinct) / static_cast<double>(std::max<int64_t>(1, layer_steps));
  return r;
}

}  // namespace

int bench_model(const std::string& dir, BenchModel what, int64_t tokens, int threads, bool json,
                double cache_mb, int64_t batch) {
  MOE_CHECK(tokens >= 1, "bench", "-n must be >= 1, got {}", tokens);
  set_num_threads(threads);
  const double bw = what == BenchModel::decode ? read_bandwidth_apart() : 0;
  const auto t0 = Clock::now();
  std::shared_ptr<ExpertCache> experts;
  std::unique_ptr<Model> model =
      cache_mb > 0 ? load_model_offloaded(dir, static_cast<int64_t>(cache_mb * 1e6),
                                          EvictionPolicy::routing, &experts, /*prefetch=*/true)
                   : load_model(dir, WeightsAs::stored);
  const double load_s = seconds_since(t0);
  const ModelConfig& c = model->config();
  const int64_t V = c.vocab_size;
  const auto file_bytes =
      static_cast<double>(is_gguf_file(dir) ? std::filesystem::file_size(dir)
                                            : checkpoint_weight_bytes(read_checkpoint_info(dir)));
  nlohmann::json j = {{"model", dir},
                      {"threads", num_threads()},
                      {"path", cpu_path_name(cpu_path())},
                      {"weights_stored", model->weights_stored()},
                      {"activations", cpu::quant_activations_name(cpu::quant_activations())},
                      {"load_s", load_s},
                      {"checkpoint_mb", file_bytes / 1e6}};
  Arena arena;
  if (what == BenchModel::decode) {
    const int64_t prompt = 4;
    MOE_CHECK(prompt + tokens <= c.max_seq_len, "bench", "-n {} exceeds the model's {} positions",
              tokens, c.max_seq_len);
    MOE_CHECK(batch >= 1, "bench", "--batch must be >= 1, got {}", batch);
    const DecodeRun one = decode_run(*model, arena, 1, prompt, tokens);
    const double total_s = one.total_s;
    std::vector<double> sorted = one.ms;
    std::sort(sorted.begin(), sorted.end());
    const StepBytes sb =
        is_gguf_file(dir) ? gguf_step_bytes(load_gguf(dir), c) : step_bytes(*model);
    const double bytes = sb.per_token(c);
    const double tps = static_cast<double>(tokens) / total_s;
    const double floor_tps = bw * 1e9 / bytes;
    j.update({{"tokens", tokens},
              {"activations", cpu::quant_activations_name(cpu::quant_activations())},
              {"tokens_per_s", tps},
              {"median_ms_per_token", sorted[sorted.size() / 2]},
              {"bytes_per_token_mb", bytes / 1e6},
              {"read_bandwidth_gbs", bw},
              {"floor_tokens_per_s", floor_tps},
              {"of_floor", tps / floor_tps},
              {"peak_rss_mb", peak_rss_mb()},
              {"rss_of_checkpoint", peak_rss_mb() * 1e6 / file_bytes}});
    if (batch > 1) {
      // The same steps for `batch` sequences at once (continuous batching's decode step): the
      // tokens/s of the batch against one sequence's, measured in this run, beside what the
      // bytes allow. A step reads the fixed weights once, each routed expert that any of its
      // tokens chose once, and every sequence's keys and values: were both read at the same
      // speed, the batch could be at most batch x bytes(one) / bytes(batch) times faster.
      const DecodeRun many = decode_run(*model, arena, batch, prompt, tokens);
      std::vector<double> bms = many.ms;
      std::sort(bms.begin(), bms.end());
      const double btps = static_cast<double>(batch * tokens) / many.total_s;
      const double mean_len = static_cast<double>(prompt) + static_cast<double>(tokens) / 2;
      const auto bytes_step = [&](const DecodeRun& r, int64_t n) {
        return sb.fixed + r.experts_per_layer * static_cast<double>(sb.moe_layers) * sb.per_expert +
               static_cast<double>(n) * mean_len * r.kv_bytes_per_position;
      };
      const double one_b = bytes_step(one, 1), many_b = bytes_step(many, batch);
      const double bound = static_cast<double>(batch) * one_b / many_b;
      j.update({{"batch", batch},
                {"batch_tokens_per_s", btps},
                {"batch_median_ms_per_step", bms[bms.size() / 2]},
                {"batch_of_one", btps / tps},
                {"experts_per_layer_one", one.experts_per_layer},
                {"experts_per_layer_batch", many.experts_per_layer},
                {"step_mb_one", one_b / 1e6},
                {"step_mb_batch", many_b / 1e6},
                {"batch_of_one_bytes_bound", bound}});
      if (!json) {
        fmt::print(
            "  batch {}: {:.2f} tokens/s (median {:.2f} ms per step) = {:.2f}x one sequence\n",
            batch, btps, bms[bms.size() / 2], btps / tps);
        fmt::print(
            "  bytes a step reads: one sequence {:.2f} MB ({:.2f} experts per MoE layer), batch "
            "{:.2f} MB ({:.2f} experts per layer, {} sequences' keys and values): at most "
            "{:.2f}x at equal bandwidth ({:.0f}% of it reached)\n",
            one_b / 1e6, one.experts_per_layer, many_b / 1e6, many.experts_per_layer, batch, bound,
            100 * btps / tps / bound);
      }
    }
    if (experts) {
      const ExpertCacheStats s = experts->stats();
      j.update(
          {{"expert_cache_mb", cache_mb},
           {"cache_slots", s.slots},
           {"cache_hit_rate", static_cast<double>(s.hits) /
                                  static_cast<double>(std::max<int64_t>(1, s.hits + s.misses))},
           {"cache_read_mb", static_cast<double>(s.bytes_read) / 1e6},
           {"cache_stall_s", s.stall_s}});
      if (!json) fmt::print("{}\n", s.str());
    }
    if (!json) {
      fmt::print("{}: loaded in {:.2f} s ({} weights)\n", dir, load_s,
                 model->weights_stored() ? "stored" : "float32");
      fmt::print("decode: {} tokens after a {}-token prompt, {} threads, path {}, {} activations\n",
                 tokens, prompt, num_threads(), cpu_path_name(cpu_path()),
                 cpu::quant_activations_name(cpu::quant_activations()));
      fmt::print("  {:.2f} tokens/s (median {:.1f} ms per token)\n", tps,
                 sorted[sorted.size() / 2]);
      fmt::print("  floor: {:.1f} MB per token / {:.1f} GB/s = {:.2f} tokens/s ({:.0f}% of it)\n",
                 bytes / 1e6, bw, floor_tps, 100 * tps / floor_tps);
      fmt::print("  peak resident {:.0f} MB = {:.2f}x the checkpoint's {:.0f} MB\n", peak_rss_mb(),
                 peak_rss_mb() * 1e6 / file_bytes, file_bytes / 1e6);
    }
  } else {
    MOE_CHECK(tokens <= c.max_seq_len, "bench", "-n {} exceeds the model's {} positions", tokens,
              c.max_seq_len);
    Tensor tok = Tensor::empty({1, tokens}, DType::I32);
    for (int64_t i = 0; i < tokens; ++i)
      tok.data<int32_t>()[i] = static_cast<int32_t>((i * 7919 + 13) % V);
    std::vector<double> times;
    for (int rep = 0; rep < 3; ++rep) {  // the first also reads the weights from the page cache
      KvCache cache = model->make_cache(1, tokens);
      arena.reset();
      const auto s0 = Clock::now();
      model->decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last);
      times.push_back(seconds_since(s0));
    }
    const double first_s = times[0];
    std::sort(times.begin() + 1, times.end());
    const double best_s = times[1];
    const double tps = static_cast<double>(tokens) / best_s;
    j.update({{"tokens", tokens},
              {"activations", cpu::quant_activations_name(cpu::quant_activations())},
              {"tokens_per_s", tps},
              {"first_pass_s", first_s},
              {"pass_s", best_s},
              {"peak_rss_mb", peak_rss_mb()},
              {"rss_of_checkpoint", peak_rss_mb() * 1e6 / file_bytes}});
    if (!json) {
      fmt::print("{}: loaded in {:.2f} s ({} weights)\n", dir, load_s,
                 model->weights_stored() ? "stored" : "float32");
      fmt::print("prefill: {} tokens in one pass, {} threads, path {}, {} activations\n", tokens,
                 num_threads(), cpu_path_name(cpu_path()),
                 cpu::quant_activations_name(cpu::quant_activations()));
      fmt::print("  {:.1f} tokens/s ({:.2f} s; the first pass, reading the weights in: {:.2f} s)\n",
                 tps, best_s, first_s);
      fmt::print("  peak resident {:.0f} MB = {:.2f}x the checkpoint's {:.0f} MB\n", peak_rss_mb(),
                 peak_rss_mb() * 1e6 / file_bytes, file_bytes / 1e6);
    }
  }
  if (json) fmt::print("{}\n", j.dump());
  return 0;
}

}  // namespace moe::cli
