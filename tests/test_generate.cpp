// Sampling: greedy, temperature, top-k and top-p give the distributions they define (measured
// over many seeded draws), a seed fixes the result, and bad settings are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "moe/generate.h"
#include "moe/trainer.h"
#include "moe_test_util.h"

namespace moe {

namespace {

// Frequencies of each token over n draws.
std::vector<double> frequencies(const std::vector<float>& logits, const SamplingConfig& cfg,
                                int n) {
  Rng rng(cfg.seed);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < n; ++i)
    f[static_cast<size_t>(
        sample_token(logits.data(), static_cast<int64_t>(logits.size()), cfg, rng))] += 1.0 / n;
  return f;
}

}  // namespace

TEST(Sampling, GreedyTemperatureTopKTopP) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  SamplingConfig c;
  c.seed = 7;
  auto expect_freq = [&](const std::vector<double>& want) {
    const std::vector<double> got = frequencies(logits, c, 40000);
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 0.01) << "token " << i;
  };
  expect_freq({0.5, 0.3, 0.2});
  c.top_k = 2;  // renormalized over the two best
  expect_freq({0.625, 0.375, 0});
  c.top_k = 0;
  c.top_p = 0.75;  // 0.5 < 0.75, 0.8 >= 0.75: the two best
  expect_freq({0.625, 0.375, 0});
  c.top_p = 0.4;  // the best alone reaches it
  expect_freq({1, 0, 0});
  c.top_p = 1;
  c.temperature = 2;  // p^(1/2), normalized
  const double z = std::sqrt(0.5) + std::sqrt(0.3) + std::sqrt(0.2);
  expect_freq({std::sqrt(0.5) / z, std::sqrt(0.3) / z, std::sqrt(0.2) / z});
  c.temperature = 0;  // greedy, ties to the lowest id
  const std::vector<float> tie = {1, 3, 3, 2};
  Rng rng(1);
  EXPECT_EQ(sample_token(tie.data(), 4, c, rng), 1);
}

TEST(Sampling, BadSettingsAreRefused) {
  const std::vector<float> logits = {0, 1};
  Rng rng(1);
  for (auto bad : {SamplingConfig{-1, 0, 1, 0}, SamplingConfig{1, -2, 1, 0},
                   SamplingConfig{1, 0, 0, 0}, SamplingConfig{1, 0, 1.5, 0}})
    EXPECT_THROW(sample_token(logits.data(), 2, bad, rng), Error);
  const std::vector<float> nan = {0, std::nanf("")};
  EXPECT_THROW(sample_token(nan.data(), 2, SamplingConfig{}, rng), Error);
}

// Generation with a seed is a function of the seed; prompts of different lengths run together;
// a stop token ends its sequence only.
TEST(Sampling, GenerationIsSeededAndStops) {
  ModelConfig cfg = model_preset("tiny");
  cfg.max_seq_len = 32;
  Model model(cfg);
  Rng init(3);
  model.init(init);
  SamplingConfig c;
  c.seed = 11;
  c.top_k = 40;
  c.top_p = 0.9;
  const std::vector<std::vector<int32_t>> prompts = {{256, 72, 105}, {256, 65}};
  const auto a = generate(model, prompts, 12, c);
  const auto b = generate(model, prompts, 12, c);
  EXPECT_EQ(a, b);
  ASSERT_EQ(a[0].size(), 15u);
  ASSERT_EQ(a[1].size(), 14u);
  c.seed = 12;
  EXPECT_NE(generate(model, prompts, 12, c), a);
  // Stop at the first new token of sequence 0: it ends there, the other goes on.
  c.seed = 11;
  const int32_t stop = a[0][3];
  const auto s = generate(model, prompts, 12, c, {stop});
  EXPECT_EQ(s[0], std::vector<int32_t>(a[0].begin(), a[0].begin() + 4));
  // Sequence 1's first token comes from the same draw as before; it then runs to the full
  // length or to its own stop token.
  ASSERT_GE(s[1].size(), 3u);
  EXPECT_EQ(s[1][2], a[1][2]);
  EXPECT_TRUE(s[1].size() == a[1].size() || s[1].back() == stop);
  EXPECT_THROW(generate(model, prompts, 40, c), Error);  // beyond max_seq_len
}

// A prompt pass that runs the output head on each sequence's last position only gives that
// position's logits of the full pass (to the rounding of a product of another height) and
// leaves the same cache behind.
TEST(Sampling, PromptPassHeadOnLastPositions) {
  ModelConfig cfg = model_preset("tiny");
  cfg.max_seq_len = 32;
  Model model(cfg);
  Rng init(5);
  model.init(init);
  const int64_t B = 2, T = 7, V = cfg.vocab_size;
  Tensor tok = Tensor::empty({B, T}, DType::I32);
  for (int64_t i = 0; i < B * T; ++i) tok.data<int32_t>()[i] = static_cast<int32_t>(i * 37 % V);
  KvCache full_cache = model.make_cache(B, 16), last_cache = model.make_cache(B, 16);
  Arena a1, a2;
  const Tensor full = model.decode(tok, full_cache, a1);
  const Tensor last = model.decode(tok, last_cache, a2, {}, nullptr, Model::LogitRows::last);
  ASSERT_EQ(last.shape(), Shape({B, 1, V}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t v = 0; v < V; ++v)
      EXPECT_NEAR(last.data<float>()[b * V + v], full.data<float>()[(b * T + T - 1) * V + v], 1e-5)
          << b << " " << v;
  for (size_t l = 0; l < full_cache.k.size(); ++l) {
    EXPECT_EQ(0,
              std::memcmp(full_cache.k[l].raw(), last_cache.k[l].raw(), full_cache.k[l].nbytes()));
    EXPECT_EQ(0,
              std::memcmp(full_cache.v[l].raw(), last_cache.v[l].raw(), full_cache.v[l].nbytes()));
  }
}

// Self-speculative decoding with the MTP modules gives plain greedy decoding's tokens, for any
// draft depth, in float64 and float32, with a stop token; the counts add up.
TEST(Speculative, GreedyOutputIsPlainGreedy) {
  for (const DType dtype : {DType::F64, DType::F32}) {
    ModelConfig cfg = model_preset("tiny");
    cfg.max_seq_len = 64;
    cfg.mtp_depth = 3;
    Model model(cfg, dtype);
    Rng init(9);
    model.init(init);
    // Larger weights than init's, so that the greedy path is not one token repeated.
    for (NamedParam& p : model.params())
      if (p.name.find("norm") == std::string::npos) {
        Rng r(p.value.numel());
        Tensor t = Tensor::empty(p.value.shape(), DType::F64);
        r.fill_normal(t, 0, 0.2);
        const Tensor c = t.to(dtype);
        std::memcpy(p.value.raw(), c.raw(), c.nbytes());
      }
    const std::vector<int32_t> prompt = {256, 72, 101, 108, 108, 111};
    SamplingConfig greedy;
    greedy.temperature = 0;
    const std::vector<int32_t> plain = generate(model, {prompt}, 40, greedy)[0];
    std::set<int32_t> distinct(plain.begin() + 6, plain.end());
    EXPECT_GT(distinct.size(), 3u) << "the greedy path should vary";
    for (int64_t depth = 1; depth <= 3; ++depth) {
      SpeculativeStats st;
      std::vector<int32_t> streamed;
      const std::vector<int32_t> spec = generate_speculative(
          model, prompt, 40, depth, {}, [&](int32_t t) { streamed.push_back(t); }, &st);
      EXPECT_EQ(spec, plain) << dtype_name(dtype) << " depth " << depth;
      EXPECT_EQ(streamed, std::vector<int32_t>(plain.begin() + 6, plain.end()));
      EXPECT_EQ(st.tokens, 40);
      EXPECT_LE(st.accepted, st.drafted);
      // Each round keeps its accepted guesses and one token of the model's own, the prompt's
      // pass gives the first.
      EXPECT_EQ(st.tokens, 1 + st.rounds + st.accepted);
    }
    // A stop token ends it where plain decoding ends.
    const int32_t stop = plain[20];
    const auto first = std::find(plain.begin() + 6, plain.end(), stop);
    const std::vector<int32_t> want(plain.begin(), first + 1);
    EXPECT_EQ(generate_speculative(model, prompt, 40, 2, {stop}), want);
  }
}

// With modules trained alongside the model, most guesses are right; a model without modules
// and a depth beyond its modules are refused.
TEST(Speculative, TrainedModulesGuessRight) {
  ModelConfig cfg = model_preset("tiny");
  cfg.mtp_depth = 2;
  TrainConfig tc;
  tc.steps = 150;
  tc.batch = 8;
  tc.seq_len = 32;
  tc.lr = 3e-3;
  tc.warmup = 10;
  tc.eval_every = 0;
  Trainer trainer(cfg, tc, test::toy_corpus());
  for (int64_t i = 0; i < tc.steps; ++i) trainer.train_step();
  Model& model = trainer.model();
  model.set_training(false);
  const std::vector<int32_t> prompt = {256, 116, 104, 101, 32};  // <bos> "the "
  SamplingConfig greedy;
  greedy.temperature = 0;
  const std::vector<int32_t> plain = generate(model, {prompt}, 60, greedy)[0];
  for (int64_t depth = 1; depth <= 2; ++depth) {
    SpeculativeStats st;
    EXPECT_EQ(generate_speculative(model, prompt, 60, depth, {}, nullptr, &st), plain);
    EXPECT_GT(st.acceptance(), 0.5)
        << "depth " << depth << ": " << st.accepted << " of " << st.drafted;
    EXPECT_LT(st.rounds, depth == 1 ? 40 : 30) << "depth " << depth;
  }
  EXPECT_THROW(generate_speculative(model, prompt, 10, 3), Error);
  ModelConfig plain_cfg = cfg;
  plain_cfg.mtp_depth = 0;
  Model no_modules(plain_cfg);
  EXPECT_THROW(generate_speculative(no_modules, prompt, 10, 0), Error);
}

}  // namespace moe
