// transformers' own tiny checkpoints of every supported architecture (tests/fixtures/hf/*, made
// by transformers with its outputs, see that folder's README): the logits and router logits
// computed here match transformers', cached incremental decoding matches the full pass, and
// greedy generation gives transformers' ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/generate.h"
#include "moe/hf.h"
#include "moe/trainer.h"

namespace moe {

namespace {

std::string fixture(const std::string& name) {
  return std::string(MOE_TEST_FIXTURES) + "/hf/" + name;
}

Tensor as_i32(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), DType::I32);
  for (int64_t i = 0; i < t.numel(); ++i)
    out.data<int32_t>()[i] = static_cast<int32_t>(t.data<int64_t>()[i]);
  return out;
}

// ||a - b|| / ||b||.
double relative_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = a.at(i) - b.at(i);
    diff += d * d;
    norm += b.at(i) * b.at(i);
  }
  return std::sqrt(diff / norm);
}

class HfModel : public ::testing::TestWithParam<const char*> {};

}  // namespace

TEST_P(HfModel, LogitsAndRouterLogitsMatchTransformers) {
  const std::string dir = fixture(GetParam());
  std::unique_ptr<Model> model = load_model(dir);
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  std::vector<Tensor> router;
  const Tensor logits = model->logits(ids, arena, &router);
  ASSERT_EQ(logits.shape(), ref.at("logits").shape());
  const double err = relative_error(logits, ref.at("logits"));
  std::printf("%s: logits relative error %.3g\n", GetParam(), err);
  EXPECT_LT(err, 1e-5);
  // transformers returns router logits for the architectures that have them, per MoE layer.
  size_t compared = 0;
  for (size_t l = 0; l < router.size(); ++l) {
    auto it = ref.tensors.find("router_logits." + std::to_string(l));
    if (it == ref.tensors.end()) continue;
    ASSERT_EQ(router[l].shape(), it->second.shape()) << "layer " << l;
    const double e = relative_error(router[l], it->second);
    std::printf("%s: router logits of MoE layer %zu relative error %.3g\n", GetParam(), l, e);
    EXPECT_LT(e, 1e-5) << "MoE layer " << l;
    ++compared;
  }
  const bool has_router = ref.tensors.count("router_logits.0") > 0;
  EXPECT_EQ(compared, has_router ? router.size() : 0u);
}

TEST_P(HfModel, CachedDecodingMatchesTheFullPass) {
  const std::string dir = fixture(GetParam());
  std::unique_ptr<Model> model = load_model(dir);
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const Tensor ids = as_i32(ref.at("input_ids"));
  const int64_t B = ids.size(0), T = ids.size(1), V = model->config().vocab_size;
  Arena arena;
  const Tensor full = model->logits(ids, arena).clone();
  // Sequence b's first 5 tokens in one pass, then the rest one at a time, both sequences at once.
  KvCache cache = model->make_cache(B, T);
  double worst = 0;
  for (int64_t b = 0; b < B; ++b) {
    Tensor head = Tensor::empty({1, 5}, DType::I32);
    std::copy_n(ids.data<int32_t>() + b * T, 5, head.data<int32_t>());
    arena.reset();
    const Tensor l = model->decode(head, cache, arena, {b});
    for (int64_t i = 0; i < 5 * V; ++i)
      worst = std::max(worst, std::abs(l.at(i) - full.at(b * T * V + i)));
  }
  for (int64_t t = 5; t < T; ++t) {
    Tensor step = Tensor::empty({B, 1}, DType::I32);
    for (int64_t b = 0; b < B; ++b) step.data<int32_t>()[b] = ids.data<int32_t>()[b * T + t];
    arena.reset();
    const Tensor l = model->decode(step, cache, arena);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t v = 0; v < V; ++v)
        worst = std::max(worst, std::abs(l.at(b * V + v) - full.at((b * T + t) * V + v)));
  }
  EXPECT_LT(worst, 1e-4) << "cached logits differ from the full pass";
  EXPECT_EQ(cache.length, std::vector<int64_t>(static_cast<size_t>(B), T));
  arena.reset();
  Tensor more = Tensor::zeros({1, 1}, DType::I32);
  EXPECT_THROW(model->decode(more, cache, arena), Error);  // the cache is full
}

TEST_P(HfModel, GreedyGenerationGivesTransformersIds) {
  const std::string dir = fixture(GetParam());
  std::unique_ptr<Model> model = load_model(dir);
  std::ifstream f(dir + "/reference.json");
  const nlohmann::json r = nlohmann::json::parse(f);
  const auto prompt = r.at("greedy_prompt").get<std::vector<int32_t>>();
  const auto want = r.at("greedy_ids").get<std::vector<int32_t>>();
  SamplingConfig greedy;
  greedy.temperature = 0;
  const int64_t n = static_cast<int64_t>(want.size() - prompt.size());
  // Twice in one batch, next to a different prompt: batching must not change the result.
  std::vector<int32_t> other(prompt.rbegin(), prompt.rend());
  other.push_back(prompt[0]);
  const auto got = generate(*model, {prompt, other, prompt}, n, greedy);
  EXPECT_EQ(got[0], want);
  EXPECT_EQ(got[2], want);
  EXPECT_EQ(got[1].size(), other.size() + static_cast<size_t>(n));
}

TEST_P(HfModel, ParameterCountIsTransformers) {
  const std::string dir = fixture(GetParam());
  std::ifstream c(dir + "/config.json"), r(dir + "/reference.json");
  const ModelConfig cfg = config_from_hf(nlohmann::json::parse(c));
  EXPECT_EQ(count_params(cfg).total, nlohmann::json::parse(r).at("n_params").get<int64_t>());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfModel,
                         ::testing::Values("mixtral", "mixtral_top1_e4", "qwen2_moe", "qwen3_moe",
                                           "olmoe", "deepseek_v2", "deepseek_v3", "dbrx"));

}  // namespace moe
