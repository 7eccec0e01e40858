// Long runs with flat memory: 1,000 generations back to back, and 10,000 training steps of the
// tiny preset (checkpoints and validations included), with the resident memory sampled as they
// go. After a warm-up it may not grow by more than a stated bound: a leak of even a few bytes a
// step or a cache that never stops growing would cross it. Under the sanitizers (whose allocator
// holds freed memory in quarantine) the runs are shorter and the bound is not checked.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "moe/data.h"
#include "moe/generate.h"
#include "moe/trainer.h"

namespace moe {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// Resident memory of this process now (bytes).
int64_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t pages = 0, resident = 0;
  f >> pages >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// Samples the resident memory across a run of `n` iterations: the level after the warm-up (the
// first tenth) and the most it reached after.
struct RssTrace {
  int64_t n, warm = -1, peak = 0;
  void sample(int64_t i) {
    const int64_t r = rss_bytes();
    if (i >= n / 10 && warm < 0) warm = r;
    if (warm >= 0) peak = std::max(peak, r);
  }
  double growth_mb() const { return static_cast<double>(peak - warm) / 1e6; }
};

Corpus corpus() {
  Corpus c;
  c.languages = {"en"};
  for (int i = 0; i < 400; ++i)
    c.docs.push_back({"the quick brown fox jumps over the lazy dog " + std::to_string(i), 0});
  return c;
}

}  // namespace

TEST(LongRun, ThousandGenerationsKeepMemoryFlat) {
  Model model(model_preset("tiny"), DType::F32);
  Rng rng(1);
  model.init(rng);
  model.set_training(false);
  const int64_t n = kSanitized ? 200 : 1000;
  RssTrace trace{n};
  SamplingConfig cfg;
  cfg.temperature = 1;
  for (int64_t i = 0; i < n; ++i) {
    cfg.seed = static_cast<uint64_t>(i);
    const auto out = generate(model, {{1, 2, 3, 4, 5, 6, 7, 8}, {9, 10}}, 24, cfg);
    ASSERT_EQ(out[0].size(), 32u);
    if (i % 10 == 0) trace.sample(i);
  }
  std::printf(
      "%lld generations: resident memory %.1f MB after the first tenth, at most %.2f MB "
      "more after\n",
      static_cast<long long>(n), static_cast<double>(trace.warm) / 1e6, trace.growth_mb());
  if (!kSanitized) {
    EXPECT_LE(trace.growth_mb(), 1.0);
  }
}

TEST(LongRun, TenThousandTrainingStepsKeepMemoryFlat) {
  TrainConfig t;
  t.batch = 2;
  t.seq_len = 16;
  t.steps = kSanitized ? 1000 : 10000;
  t.warmup = 10;
  t.eval_every = 500;
  t.eval_batches = 2;
  t.save_every = 1000;
  t.keep = 2;
  const std::string dir = (std::filesystem::temp_directory_path() / "moe_long_train").string();
  std::filesystem::remove_all(dir);
  Trainer trainer(model_preset("tiny"), t, corpus());
  RssTrace trace{t.steps};
  double first = 0, last = 0;
  for (int64_t s = 1; s <= t.steps; ++s) {
    const StepLog log = trainer.train_step();
    if (s == 1) first = log.loss;
    last = log.loss;
    if (s % t.eval_every == 0) trainer.evaluate();
    if (s % t.save_every == 0) trainer.save(dir);
    if (s % 50 == 0) trace.sample(s);
  }
  std::printf(
      "%lld steps (loss %.3f -> %.3f): resident memory %.1f MB after the first tenth, at "
      "most %.2f MB more after\n",
      static_cast<long long>(t.steps), first, last, static_cast<double>(trace.warm) / 1e6,
      trace.growth_mb());
  EXPECT_LT(last, first);  // it trained
  if (!kSanitized) {
    EXPECT_LE(trace.growth_mb(), 2.0);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace moe
