// Generation with a key/value cache (see moe/generate.h).
#include "moe/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moe/arena.h"

namespace moe {

int32_t sample_token(const float* logits, int64_t vocab, const SamplingConfig& cfg, Rng& rng) {
  MOE_CHECK(vocab >= 1, "sample", "empty vocabulary");
  MOE_CHECK(std::isfinite(cfg.temperature) && cfg.temperature >= 0, "sample",
            "temperature must be >= 0, got {}", cfg.temperature);
  MOE_CHECK(cfg.top_k >= 0, "sample", "top_k must be >= 0, got {}", cfg.top_k);
  MOE_CHECK(cfg.top_p > 0 && cfg.top_p <= 1, "sample", "top_p must be in (0, 1], got {}",
            cfg.top_p);
  for (int64_t v = 0; v < vocab; ++v)
    MOE_CHECK(!std::isnan(logits[v]), "sample", "logit {} is NaN", v);
  if (cfg.temperature == 0)
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  // Candidates by decreasing logit (ties to the lower id: a total order, so any sort gives the
  // same list), cut by top-k; only the top k are sorted.
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  const auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  if (cfg.top_k > 0 && cfg.top_k < vocab) {
    std::partial_sort(ids.begin(), ids.begin() + cfg.top_k, ids.end(), before);
    ids.resize(static_cast<size_t>(cfg.top_k));
  } else {
    std::sort(ids.begin(), ids.end(), before);
  }
  std::vector<double> p(ids.size());
  const double mx = logits[ids[0]];
  double sum = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    p[i] = std::exp((static_cast<double>(logits[ids[i]]) - mx) / cfg.temperature);
    sum += p[i];
  }
  // Nucleus: the smallest prefix whose probability reaches top_p (at least one token).
  if (cfg.top_p < 1) {
    double acc = 0;
    size_t keep = 0;
    while (keep < p.size()) {
      acc += p[keep++] / sum;
      if (acc >= cfg.top_p) break;
    }
    p.resize(keep);
    sum = std::accumulate(p.begin(), p.end(), 0.0);
  }
  double u = rng.uniform() * sum;
  for (size_t i = 0; i < p.size(); ++i) {
    u -= p[i];
    if (u < 0) return ids[i];
  }
  return ids[p.size() - 1];
}

std::vector<std::vector<int32_t>> generate(Model& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           int64_t n, const SamplingConfig& cfg,
                                           const std::vector<int32_t>& stop,
                                           const std::function<void(size_t, int32_t)>& on_token) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  MOE_CHECK(B >= 1, "generate", "no prompt");
  MOE_CHECK(n >= 0, "generate", "the number of new tokens must be >= 0, got {}", n);
  int64_t longest = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    MOE_CHECK(!prompts[b].empty(), "generate", "prompt {} is empty", b);
    longest = std::max<int64_t>(longest, static_cast<int64_t>(prompts[b].size()));
  }
  const int64_t cap = longest + n;
  MOE_CHECK(cap <= model.config().max_seq_len, "generate",
            "prompt ({} tokens) plus {} new tokens exceed the model's {} positions", longest, n,
            model.config().max_seq_len);
  const int64_t V = model.config().vocab_size;
  KvCache cache = model.make_cache(B, cap);
  Rng rng(cfg.seed);
  std::vector<std::vector<int32_t>> out(prompts);
  std::vector<int32_t> next(static_cast<size_t>(B));
  std::vector<bool> done(static_cast<size_t>(B), n == 0);
  Arena arena;
  auto choose = [&](size_t b, const float* logits) {
    next[b] = sample_token(logits, V, cfg, rng);
    out[b].push_back(next[b]);
    if (on_token) on_token(b, next[b]);
    if (std::find(stop.begin(), stop.end(), next[b]) != stop.end()) done[b] = true;
  };
  // Prefill each prompt in one pass; its last position (the only one through the output head)
  // gives the first new token.
  for (int64_t b = 0; b < B && n > 0; ++b) {
    const std::vector<int32_t>& p = prompts[static_cast<size_t>(b)];
    const int64_t T = static_cast<int64_t>(p.size());
    Tensor tok = Tensor::empty({1, T}, DType::I32);
    std::copy(p.begin(), p.end(), tok.data<int32_t>());
    arena.reset();
    const Tensor logits = model.decode(tok, cache, arena, {b}, nullptr, Model::LogitRows::last);
    choose(static_cast<size_t>(b), logits.to(DType::F32).data<float>());
  }
  // Then one token per step for the sequences still running.
  for (int64_t step = 1; step < n; ++step) {
    std::vector<int64_t> slots;
    for (int64_t b = 0; b < B; ++b)
      if (!done[static_cast<size_t>(b)]) slots.push_back(b);
    if (slots.empty()) break;
    const int64_t R = static_cast<int64_t>(slots.size());
    Tensor tok = Tensor::empty({R, 1}, DType::I32);
    for (int64_t r = 0; r < R; ++r)
      tok.data<int32_t>()[r] = next[static_cast<size_t>(slots[static_cast<size_t>(r)])];
    arena.reset();
    const Tensor logits = model.decode(tok, cache, arena, slots).to(DType::F32);
    for (int64_t r = 0; r < R; ++r)
      choose(static_cast<size_t>(slots[static_cast<size_t>(r)]), logits.data<float>() + r * V);
  }
  return out;
}

}  // namespace moe
