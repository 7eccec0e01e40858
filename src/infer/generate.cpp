// Generation with a key/value cache (see moe/generate.h).
#include "moe/generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

namespace {

// The highest logit's token (ties to the lowest id, as sample_token's greedy choice).
int32_t greedy(const Tensor& logits, int64_t row, int64_t V) {
  const Tensor f = logits.dtype() == DType::F32 ? logits : logits.to(DType::F32);
  const float* p = f.data<float>() + row * V;
  for (int64_t v = 0; v < V; ++v) MOE_CHECK(!std::isnan(p[v]), "generate", "logit {} is NaN", v);
  return static_cast<int32_t>(std::max_element(p, p + V) - p);
}

// Rows [from, from + n) of a [capacity, D] buffer, as a tensor view.
Tensor rows_of(Tensor& buf, int64_t from, int64_t n) {
  const int64_t D = buf.size(1);
  const size_t row = buf.nbytes() / static_cast<size_t>(buf.size(0));
  return Tensor::view(static_cast<char*>(buf.raw()) + static_cast<size_t>(from) * row, {n, D},
                      buf.dtype());
}

void copy_rows(Tensor& buf, int64_t from, const Tensor& src) {
  std::memcpy(rows_of(buf, from, src.size(0)).raw(), src.raw(), src.nbytes());
}

}  // namespace

std::vector<int32_t> generate_speculative(Model& model, const std::vector<int32_t>& prompt,
                                          int64_t n, int64_t depth,
                                          const std::vector<int32_t>& stop,
                                          const std::function<void(int32_t)>& on_token,
                                          SpeculativeStats* stats) {
  const char* w = "generate";
  const ModelConfig& cfg = model.config();
  MOE_CHECK(cfg.mtp_depth > 0, w,
            "--speculative drafts with the model's multi-token prediction modules, and this "
            "model has none (train one with moe train --mtp D)");
  MOE_CHECK(depth >= 0 && depth <= cfg.mtp_depth, w,
            "the draft depth must be in [0, {}] (the model's MTP modules), got {}", cfg.mtp_depth,
            depth);
  if (depth == 0) depth = cfg.mtp_depth;
  MOE_CHECK(!prompt.empty(), w, "the prompt is empty");
  MOE_CHECK(n >= 0, w, "the number of new tokens must be >= 0, got {}", n);
  const int64_t P = static_cast<int64_t>(prompt.size()), V = cfg.vocab_size, D = cfg.d_model;
  MOE_CHECK(P + n <= cfg.max_seq_len, w,
            "prompt ({} tokens) plus {} new tokens exceed the model's {} positions", P, n,
            cfg.max_seq_len);
  SpeculativeStats local;
  SpeculativeStats& st = stats ? *stats : local;
  st = {};
  std::vector<int32_t> x(prompt);
  if (n == 0) return x;
  // The verifying pass writes up to `depth` positions past the last kept one.
  const int64_t cap = std::min(cfg.max_seq_len, P + n + depth);
  KvCache cache = model.make_cache(1, cap);
  std::vector<KvCache> mcache;
  for (int64_t j = 0; j < depth; ++j) mcache.push_back(model.make_mtp_cache(cap));
  // hid[0]: the model's final representation at each position; hid[j]: MTP module j's.
  std::vector<Tensor> hid;
  for (int64_t j = 0; j <= depth; ++j) hid.push_back(Tensor::zeros({cap, D}, model.dtype()));
  Arena arena;
  int64_t made = 0;
  bool done = false;
  auto emit = [&](int32_t t) {
    x.push_back(t);
    ++made;
    ++st.tokens;
    if (on_token) on_token(t);
    if (made >= n || std::find(stop.begin(), stop.end(), t) != stop.end()) done = true;
  };
  {
    Tensor tok = Tensor::empty({1, P}, DType::I32);
    std::copy(prompt.begin(), prompt.end(), tok.data<int32_t>());
    Tensor h;
    const Tensor logits = model.decode_hidden(tok, cache, arena, &h);
    copy_rows(hid[0], 0, h);
    emit(greedy(logits, P - 1, V));
  }
  while (!done) {
    // x[last] is the newest token, not yet run by the model: the model's cache holds `last`
    // positions, module j's the ones whose inputs are all known to be right.
    const int64_t last = static_cast<int64_t>(x.size()) - 1;
    const int64_t d = std::min({depth, n - made - 1, cap - 1 - last});
    std::vector<int32_t> ext(x);  // the tokens, then the guesses
    for (int64_t j = 0; j < d; ++j) {
      // Module j at position i reads hid[j][i] and token i + j + 1; it runs the positions from
      // its cache's length to last - 1, the last one giving the guess at token last + j + 1.
      KvCache& mc = mcache[static_cast<size_t>(j)];
      const int64_t from = mc.length[0], rows = last - from;
      Tensor tok = Tensor::empty({rows}, DType::I32);
      std::copy(ext.begin() + from + j + 1, ext.begin() + last + j + 1, tok.data<int32_t>());
      arena.reset();
      Tensor h;
      const Tensor logits =
          model.mtp_decode(j, rows_of(hid[static_cast<size_t>(j)], from, rows), tok, mc, arena, &h);
      copy_rows(hid[static_cast<size_t>(j + 1)], from, h);
      ext.push_back(greedy(logits, 0, V));
    }
    // One pass of the model over the newest token and the guesses.
    Tensor tok = Tensor::empty({1, d + 1}, DType::I32);
    std::copy(ext.begin() + last, ext.end(), tok.data<int32_t>());
    arena.reset();
    Tensor h;
    const Tensor logits = model.decode_hidden(tok, cache, arena, &h);
    copy_rows(hid[0], last, h);
    ++st.rounds;
    st.drafted += d;
    int64_t a = 0;
    while (a < d && greedy(logits, a, V) == ext[static_cast<size_t>(last + 1 + a)]) ++a;
    st.accepted += a;
    for (int64_t i = 0; i < a && !done; ++i) emit(ext[static_cast<size_t>(last + 1 + i)]);
    if (!done) emit(greedy(logits, a, V));
    // Keep what was computed from right tokens only: the model's positions up to last + a,
    // module j's up to last + a - j - 1 (its input token i + j + 1 must be known).
    const int64_t kept = last + a;
    cache.length[0] = kept + 1;
    for (int64_t j = 0; j < depth; ++j) {
      int64_t& len = mcache[static_cast<size_t>(j)].length[0];
      len = std::min(len, kept - j);
    }
  }
  return x;
}

}  // namespace moe
