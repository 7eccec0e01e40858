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
