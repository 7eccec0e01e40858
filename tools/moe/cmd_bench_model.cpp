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

// Bytes of weights one decoded token reads: every tensor but the routed experts and the
// embedding table (so the output head whole), one embedding row, and top_k routed experts per
// MoE layer (stored like the embedding).
double bytes_per_token(Model& model) {
  const ModelConfig& c = model.config();
  double bytes = 0;
  DType stored = DType::F32;
  for (const NamedParam& p : model.params()) {
    if (p.name == "embed.weight") {
      stored = p.value.dtype();
      bytes += static_cast<double>(dtype_bytes(stored, c.d_model));
      if (c.tie_embeddings) bytes += static_cast<double>(p.value.nbytes());
      continue;
    }
    if (p.routed) continue;
    bytes += static_cast<double>(p.value.nbytes());
  }
  int64_t moe_layers = 0;
  for (int64_t i = 0; i < c.n_layers; ++i) moe_layers += c.is_moe_layer(i) ? 1 : 0;
  const int64_t mats = gated(c.moe.act) ? 3 : 2;
  bytes += static_cast<double>(moe_layers * c.moe.top_k * mats) *
           static_cast<double>(dtype_bytes(stored, c.d_model * c.moe.d_ffn));
  return bytes;
}

// The same for a GGUF file, from its tensors' own sizes (each may have its own type): the
// routed experts' tensors (ffn_*_exps) count top_k / n_experts of their bytes, the embedding one
// row.
double gguf_bytes_per_token(const GgufFile& f, const ModelConfig& c) {
  double bytes = 0;
  for (const GgufTensor& t : f.tensors) {
    const auto b = static_cast<double>(t.bytes);
    if (t.name == "token_embd.weight") {
      bytes += b / static_cast<double>(t.rows());
      if (c.tie_embeddings) bytes += b;
    } else if (t.name.find("_exps.") != std::string::npos) {
      bytes += b * static_cast<double>(c.moe.top_k) / static_cast<double>(c.moe.n_experts);
    } else {
      bytes += b;
    }
  }
  return bytes;
}

}  // namespace

int bench_model(const std::string& dir, BenchModel what, int64_t tokens, int threads, bool json,
                double cache_mb) {
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
    KvCache cache = model->make_cache(1, prompt + tokens + 1);
    Tensor tok = Tensor::empty({1, prompt}, DType::I32);
    for (int64_t i = 0; i < prompt; ++i)
      tok.data<int32_t>()[i] = static_cast<int32_t>((i * 7919 + 13) % V);
    Tensor logits = model->decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last);
    auto argmax = [&](const Tensor& l) {
      const float* p = l.data<float>();
      return static_cast<int32_t>(std::max_element(p, p + V) - p);
    };
    int32_t next = argmax(logits);
    Tensor one = Tensor::empty({1, 1}, DType::I32);
    std::vector<double> ms;
    const auto d0 = Clock::now();
    for (int64_t i = 0; i < tokens; ++i) {
      one.data<int32_t>()[0] = next;
      arena.reset();
      const auto s0 = Clock::now();
      logits = model->decode(one, cache, arena);
      ms.push_back(seconds_since(s0) * 1e3);
      next = argmax(logits);
    }
    const double total_s = seconds_since(d0);
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    const double bytes =
        is_gguf_file(dir) ? gguf_bytes_per_token(load_gguf(dir), c) : bytes_per_token(*model);
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
