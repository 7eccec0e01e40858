// Inference commands: `moe generate` (text or ids from a checkpoint), `moe logits` (logits of
// token ids to a safetensors file), `moe tokenize` (text to ids and back).
#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "moe/expert_cache.h"
#include "moe/generate.h"
#include "moe/json_read.h"
#include "moe/safetensors.h"
#include "moe/threading.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"

namespace moe::cli {

// "1,2,3;4,5,6" -> {{1, 2, 3}, {4, 5, 6}}.
std::vector<std::vector<int32_t>> parse_id_lists(const std::string& text, const char* what) {
  std::vector<std::vector<int32_t>> out(1);
  std::string num;
  auto flush = [&] {
    if (num.empty()) return;
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(num, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MOE_CHECK(used == num.size() && v >= 0 && v <= INT32_MAX, what, "'{}' is not a token id", num);
    out.back().push_back(static_cast<int32_t>(v));
    num.clear();
  };
  for (char ch : text) {
    if (ch == ',' || ch == ' ') {
      flush();
    } else if (ch == ';') {
      flush();
      out.emplace_back();
    } else {
      num += ch;
    }
  }
  flush();
  for (size_t i = 0; i < out.size(); ++i)
    MOE_CHECK(!out[i].empty(), what, "sequence {} of '{}' has no ids", i, text);
  return out;
}

namespace {

struct GenerateArgs {
  std::string model_dir, prompt, prompt_ids;
  int64_t n = 64;
  double cache_mb = 0;
  std::string cache_policy = "routing";
  bool no_prefetch = false;
  SamplingConfig sampling;
  bool ids = false;
  int threads = 0;
  std::string weights = "stored";
  bool speculative = false;
  int64_t draft_depth = 0;
  bool temp_given = false;
};

int run_generate(const GenerateArgs& a) {
  set_num_threads(a.threads);
  MOE_CHECK(a.prompt.empty() != a.prompt_ids.empty(), "generate",
            "give exactly one of -p TEXT and --prompt-ids 1,2,3");
  std::shared_ptr<ExpertCache> cache;
  std::unique_ptr<Model> model =
      a.cache_mb > 0
          ? load_model_offloaded(a.model_dir, static_cast<int64_t>(a.cache_mb * 1e6),
                                 parse_eviction_policy(a.cache_policy), &cache, !a.no_prefetch)
          : load_model(a.model_dir, weights_as(a.weights));
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> prompt;
  if (!a.prompt_ids.empty()) {
    const auto lists = parse_id_lists(a.prompt_ids, "--prompt-ids");
    MOE_CHECK(lists.size() == 1, "generate", "--prompt-ids takes one sequence");
    prompt = lists[0];
  } else {
    tok = load_tokenizer(a.model_dir);
    prompt = tok->encode(a.prompt);
    if (auto bos = tok->bos_id()) prompt.insert(prompt.begin(), *bos);
    MOE_CHECK(!prompt.empty(), "generate", "the prompt encodes to no tokens");
  }
  std::vector<int32_t> stop;
  if (!a.ids) {
    if (!tok) tok = load_tokenizer(a.model_dir);
    if (auto eos = tok->eos_id()) stop.push_back(*eos);
  }
  // Text streams as it is generated: print what has become whole UTF-8.
  std::vector<int32_t> fresh;
  size_t printed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto on_token = [&](size_t, int32_t id) {
    if (a.ids) return;
    fresh.push_back(id);
    const std::string text = tok->decode(fresh);
    const size_t whole = complete_utf8_prefix(text);
    if (whole > printed) {
      std::fwrite(text.data() + printed, 1, whole - printed, stdout);
      std::fflush(stdout);
      printed = whole;
    }
  };
  if (!a.ids && !a.prompt.empty()) {
    std::fwrite(a.prompt.data(), 1, a.prompt.size(), stdout);
    std::fflush(stdout);
  }
  SpeculativeStats spec;
  std::vector<std::vector<int32_t>> out;
  if (a.speculative) {
    MOE_CHECK(!a.temp_given || a.sampling.temperature == 0, "generate",
              "--speculative decodes greedily (its output is plain greedy decoding's); --temp {} "
              "asks for sampling",
              a.sampling.temperature);
    MOE_CHECK(!cache, "generate", "--speculative with --expert-cache-mb is not supported");
    out.push_back(generate_speculative(
        *model, prompt, a.n, a.draft_depth, stop, [&](int32_t id) { on_token(0, id); }, &spec));
  } else {
    out = generate(*model, {prompt}, a.n, a.sampling, stop, on_token);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (a.ids) {
    fmt::print("{}\n", nlohmann::json(out[0]).dump());
  } else {
    const std::string text = tok->decode(fresh);
    if (text.size() > printed) std::fwrite(text.data() + printed, 1, text.size() - printed, stdout);
    fmt::print("\n");
  }
  std::fflush(stdout);
  const size_t made = out[0].size() - prompt.size();
  fmt::print(stderr, "{} tokens in {:.3f} s ({:.1f} tokens/s)\n", made, secs,
             static_cast<double>(made) / std::max(secs, 1e-9));
  if (cache) fmt::print(stderr, "{} ({} policy)\n", cache->stats().str(), a.cache_policy);
  if (a.speculative)
    fmt::print(stderr,
               "speculative: {} of {} drafted tokens accepted ({:.1f}%), {} passes of the model "
               "after the prompt ({:.2f} tokens per pass)\n",
               spec.accepted, spec.drafted, 100 * spec.acceptance(), spec.rounds,
               static_cast<double>(spec.tokens - 1) /
                   static_cast<double>(std::max<int64_t>(1, spec.rounds)));
  fmt::print(stderr, "peak resident memory: {:.1f} MB\n",
             static_cast<double>(peak_rss_bytes()) / 1e6);
  return 0;
}

struct LogitsArgs {
  std::string model_dir, tokens, out;
  int threads = 0;
  std::string weights = "stored";
};

int run_logits(const LogitsArgs& a) {
  set_num_threads(a.threads);
  const auto lists = parse_id_lists(a.tokens, "--tokens");
  const size_t T = lists[0].size();
  for (size_t i = 1; i < lists.size(); ++i)
    MOE_CHECK(lists[i].size() == T, "logits",
              "sequences separated by ';' must have equal lengths: {} and {}", T, lists[i].size());
  std::unique_ptr<Model> model = load_model(a.model_dir, weights_as(a.weights));
  const auto B = static_cast<int64_t>(lists.size());
  Tensor ids = Tensor::empty({B, static_cast<int64_t>(T)}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    std::copy(lists[static_cast<size_t>(b)].begin(), lists[static_cast<size_t>(b)].end(),
              ids.data<int32_t>() + b * static_cast<int64_t>(T));
  Arena arena;
  const Tensor logits = model->logits(ids, arena).to(DType::F32);
  save_safetensors(a.out, {{"logits", logits}});
  fmt::print(stderr, "wrote logits {} to {}\n", logits.str(), a.out);
  return 0;
}

struct TokenizeArgs {
  std::string model_dir, text, text_file;
  bool decode = false;
};

int run_tokenize(const TokenizeArgs& a) {
  MOE_CHECK(a.text.empty() != a.text_file.empty(), "tokenize",
            "give exactly one of TEXT and --text-file FILE");
  std::string text = a.text;
  if (!a.text_file.empty()) {
    std::ifstream f(a.text_file, std::ios::binary);
    MOE_CHECK(f.good(), "tokenize", "cannot read {}", a.text_file);
    std::ostringstream ss;
    ss << f.rdbuf();
    text = ss.str();
  }
  std::unique_ptr<Tokenizer> tok = load_tokenizer(a.model_dir);
  if (a.decode) {
    // The ids as a JSON array ("[1, 2, 3]") or a list ("1,2,3").
    std::vector<int32_t> ids;
    try {
      const nlohmann::json j = nlohmann::json::parse(text);
      ids = json_as<std::vector<int32_t>>(j, "tokenize --decode", "ids");
    } catch (const nlohmann::json::exception&) {
      ids = parse_id_lists(text, "tokenize --decode")[0];
    }
    const std::string out = tok->decode(ids);
    std::fwrite(out.data(), 1, out.size(), stdout);
    fmt::print("\n");
    return 0;
  }
  fmt::print("{}\n", nlohmann::json(tok->encode(text)).dump());
  return 0;
}

}  // namespace

Run add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "generate text from a checkpoint (KV-cached)");
  cmd->add_option("-m,--model", a->model_dir,
                  "checkpoint folder (a HuggingFace model or one of this engine's) or GGUF file")
      ->required();
  cmd->add_option("-p,--prompt", a->prompt, "prompt text (tokenized with the model's tokenizer)");
  cmd->add_option("--prompt-ids", a->prompt_ids, "prompt token ids, e.g. 1,2,3");
  cmd->add_option("-n,--n-predict", a->n, "tokens to generate")->capture_default_str();
  cmd->add_option("--temp", a->sampling.temperature, "temperature (0: greedy)")
      ->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "keep the k most likely tokens (0: all)")
      ->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "nucleus sampling threshold")
      ->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "random seed")->capture_default_str();
  cmd->add_flag("--speculative", a->speculative,
                "greedy decoding sped up by the model's multi-token prediction modules (moe train "
                "--mtp): they draft tokens ahead, one pass of the model checks them; the output "
                "is plain greedy decoding's");
  cmd->add_option("--draft-depth", a->draft_depth,
                  "with --speculative: tokens drafted per pass (0: one per MTP module)")
      ->capture_default_str();
  cmd->add_flag("--ids", a->ids,
                "print the token ids (prompt included) as one JSON array instead of text");
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  add_weights_option(cmd, a->weights);
  cmd->add_option("--expert-cache-mb", a->cache_mb,
                  "keep the routed experts in the checkpoint's files and at most this many MB of "
                  "them in memory (0: load every expert)")
      ->capture_default_str();
  cmd->add_option("--cache-policy", a->cache_policy,
                  "expert eviction: lru, lfu, or routing (by the expected next use)")
      ->capture_default_str();
  cmd->add_flag("--no-prefetch", a->no_prefetch,
                "with --expert-cache-mb: do not read the next layer's likely experts ahead");
  return [a, cmd] {
    a->temp_given = cmd->count("--temp") > 0;
    return run_generate(*a);
  };
}

Run add_logits(CLI::App& app) {
  auto a = std::make_shared<LogitsArgs>();
  auto* cmd = app.add_subcommand("logits", "logits of token ids, written to a safetensors file");
  cmd->add_option("-m,--model", a->model_dir, "checkpoint folder or GGUF file")->required();
  cmd->add_option("--tokens", a->tokens, "token ids: 1,2,3[;4,5,6] (equal lengths)")->required();
  cmd->add_option("--out", a->out, "output file; one float32 tensor 'logits' [B, T, V]")
      ->required();
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  add_weights_option(cmd, a->weights);
  return [a] { return run_logits(*a); };
}

Run add_tokenize(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  auto* cmd = app.add_subcommand(
      "tokenize", "text to token ids (a JSON array, no special tokens added), or back");
  cmd->add_option(
         "-m,--model", a->model_dir,
         "a model folder or GGUF file, or a folder holding only tokenizer.json or tokenizer.model")
      ->required();
  cmd->add_option("text", a->text, "the text (or, with --decode, the ids)");
  cmd->add_option("--text-file", a->text_file, "read the text from a file");
  cmd->add_flag("--decode", a->decode, "read ids (JSON array or 1,2,3) and print the text");
  return [a] { return run_tokenize(*a); };
}

}  // namespace moe::cli
