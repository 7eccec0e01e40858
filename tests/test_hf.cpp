// HuggingFace Mixtral layout: transformers' own tiny Mixtral checkpoint (tests/fixtures/hf/
// mixtral, with the logits transformers computed) runs here with the same logits and loss, and
// a model saved here has exactly Mixtral's tensor names and shapes and loads back bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf_test_util.h"
#include "moe/hf.h"
#include "moe/trainer.h"

namespace moe {

namespace {

const std::string kMixtral = hf_fixture("mixtral");

}  // namespace

TEST(HfMixtral, TransformersCheckpointGivesTransformersLogits) {
  std::unique_ptr<Model> model = load_model(kMixtral);
  const SafetensorsFile ref = load_safetensors(kMixtral + "/reference.safetensors");
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  const Tensor logits = model->logits(ids, arena);
  const Tensor& want = ref.at("logits");
  ASSERT_EQ(logits.shape(), want.shape());
  double diff = 0, norm = 0, worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double d = logits.at(i) - want.at(i);
    diff += d * d;
    norm += want.at(i) * want.at(i);
    worst = std::max(worst, std::abs(d));
  }
  std::printf("logits vs transformers: relative error %.3g, worst %.3g\n", std::sqrt(diff / norm),
              worst);
  EXPECT_LT(std::sqrt(diff / norm), 1e-5) << "relative error of the logits";
  EXPECT_LT(worst, 1e-4);
  // transformers' loss = cross-entropy + router_aux_loss_coef * its aux loss.
  std::ifstream f(kMixtral + "/reference.json");
  const nlohmann::json r = nlohmann::json::parse(f);
  const double ce = r["loss"].get<double>() - 0.001 * r["aux_loss"].get<double>();
  arena.reset();
  EXPECT_NEAR(model->forward(ids, arena).ce_loss, ce, 1e-5);
}

TEST(HfMixtral, SavedModelHasMixtralNamesAndShapes) {
  std::ifstream f(kMixtral + "/config.json");
  const ModelConfig cfg = config_from_mixtral(nlohmann::json::parse(f));
  EXPECT_EQ(cfg.rope_theta, 1e6);  // from rope_parameters
  ASSERT_TRUE(is_mixtral(cfg));
  Model model(cfg);
  std::map<std::string, Shape> ours, theirs;
  for (auto& [name, t] : mixtral_tensors(model)) ours[name] = t.shape();
  for (auto& [name, t] : load_safetensors(kMixtral + "/model.safetensors").stored)
    theirs[name] = t.shape;
  EXPECT_EQ(ours, theirs);
  const nlohmann::json out = mixtral_config(cfg);
  for (const char* key :
       {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size"}) {
    std::ifstream g(kMixtral + "/config.json");
    EXPECT_EQ(out[key], nlohmann::json::parse(g)[key]) << key;
  }
}

TEST(HfMixtral, TrainerCheckpointRoundTrips) {
  Corpus corpus;
  corpus.languages = {"en"};
  for (int i = 0; i < 60; ++i)
    corpus.docs.push_back({"mixture of experts " + std::to_string(i), 0});
  ModelConfig m = model_preset("tiny");
  m.max_seq_len = 32;
  ASSERT_TRUE(is_mixtral(m));
  TrainConfig t;
  t.batch = 2;
  t.seq_len = 16;
  t.steps = 2;
  Trainer trainer(m, t, corpus);
  trainer.train_step();
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_hf_roundtrip";
  std::filesystem::remove_all(dir);
  const std::string ckpt = trainer.save(dir.string());
  std::ifstream f(ckpt + "/config.json");
  EXPECT_EQ(nlohmann::json::parse(f)["architectures"][0], "MixtralForCausalLM");
  EXPECT_TRUE(load_safetensors(ckpt + "/model.safetensors")
                  .has("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
  std::unique_ptr<Model> loaded = load_model(dir.string());
  Tensor tok = Tensor::zeros({1, 8}, DType::I32);
  for (int i = 0; i < 8; ++i) tok.data<int32_t>()[i] = 100 + i;
  Arena a1, a2;
  const Tensor l1 = trainer.model().logits(tok, a1);
  const Tensor l2 = loaded->logits(tok, a2);
  EXPECT_EQ(std::memcmp(l1.raw(), l2.raw(), l1.nbytes()), 0);
  std::filesystem::remove_all(dir);
}

}  // namespace moe

namespace moe {

// YaRN in config.json, as transformers' _compute_yarn_parameters reads it: gpt-oss's (the blended
// range not rounded, truncate false) and DeepSeek-V3's (mscale and mscale_all_dim: cos and sin
// unscaled, the scores scaled by mscale^2). The frequencies are checked against the formula
// evaluated here on its own; the config survives its JSON.
TEST(HfConfig, YarnRopeScaling) {
  nlohmann::json oss = nlohmann::json::parse(
      std::ifstream(std::string(MOE_TEST_FIXTURES) + "/gguf/gpt_oss_hf/config.json"));
  oss["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 32.0},
                         {"beta_fast", 32.0},   {"beta_slow", 1.0},
                         {"truncate", false},   {"original_max_position_embeddings", 4096}};
  const ModelConfig c = config_from_hf(oss);
  ASSERT_TRUE(c.rope_scaling.yarn());
  EXPECT_FALSE(c.rope_scaling.truncate);
  EXPECT_DOUBLE_EQ(c.rope_attention_factor(), 0.1 * std::log(32.0) + 1);
  EXPECT_EQ(c.attn_scale_mult, 1.0);
  const std::vector<double> f = c.rope_inv_freq();
  ASSERT_EQ(f.size(), 32u);
  // head_dim 64, theta 150000: the ramp runs from pair 64 ln(4096 / 64 pi) / (2 ln 150000) to
  // pair 64 ln(4096 / 2 pi) / (2 ln 150000).
  const double lo = 64 * std::log(4096 / (32 * 2 * M_PI)) / (2 * std::log(150000.0));
  const double hi = 64 * std::log(4096 / (2 * M_PI)) / (2 * std::log(150000.0));
  for (int i : {0, 5, 9, 12, 17, 25, 31}) {
    const double base = std::pow(150000.0, -2.0 * i / 64);
    const double t = std::min(1.0, std::max(0.0, (i - lo) / (hi - lo)));
    EXPECT_NEAR(f[static_cast<size_t>(i)], base * (1 - t) + base / 32 * t, 1e-15) << i;
  }
  nlohmann::json back;
  to_json(back, c);
  ModelConfig again;
  from_json(back, again);
  EXPECT_EQ(again.rope_inv_freq(), f);
  EXPECT_EQ(again.rope_attention_factor(), c.rope_attention_factor());

  nlohmann::json ds = nlohmann::json::parse(
      std::ifstream(std::string(MOE_TEST_FIXTURES) + "/hf/deepseek_v3/config.json"));
  ds["rope_scaling"] = {{"type", "yarn"},
                        {"factor", 40.0},
                        {"mscale", 1.0},
                        {"mscale_all_dim", 1.0},
                        {"beta_fast", 32},
                        {"beta_slow", 1},
                        {"original_max_position_embeddings", 4096}};
  ds.erase("rope_parameters");
  ds["rope_theta"] = 10000.0;
  const ModelConfig d = config_from_hf(ds);
  EXPECT_DOUBLE_EQ(d.rope_attention_factor(), 1.0);
  EXPECT_DOUBLE_EQ(d.attn_scale_mult, std::pow(0.1 * std::log(40.0) + 1, 2));
  nlohmann::json unknown = ds;
  unknown["rope_scaling"]["type"] = "longrope";
  EXPECT_THROW(config_from_hf(unknown), Error);
}

}  // namespace moe
