// transformers' own tiny checkpoints of every supported architecture (tests/fixtures/hf/*, made
// by transformers with its outputs, see that folder's README): the logits and router logits
// computed here match transformers', cached incremental decoding matches the full pass, and
// greedy generation gives transformers' ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf_test_util.h"
#include "moe/generate.h"
#include "moe/hf.h"
#include "moe/trainer.h"

namespace moe {

namespace {

std::string fixture(const std::string& name) { return hf_fixture(name); }

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
    const std::string name = "router_logits." + std::to_string(l);
    if (!ref.has(name)) continue;
    ASSERT_EQ(router[l].shape(), ref.at(name).shape()) << "layer " << l;
    const double e = relative_error(router[l], ref.at(name));
    std::printf("%s: router logits of MoE layer %zu relative error %.3g\n", GetParam(), l, e);
    EXPECT_LT(e, 1e-5) << "MoE layer " << l;
    ++compared;
  }
  const bool has_router = ref.has("router_logits.0");
  EXPECT_EQ(compared, has_router ? router.size() : 0u);
  // transformers' training loss = shifted cross-entropy + router_aux_loss_coef * aux loss.
  std::ifstream rf(dir + "/reference.json"), cf(dir + "/config.json");
  const nlohmann::json r = nlohmann::json::parse(rf), c = nlohmann::json::parse(cf);
  if (r["loss"].is_number()) {
    const double aux = r["aux_loss"].is_number()
                           ? c.value("router_aux_loss_coef", 0.0) * r["aux_loss"].get<double>()
                           : 0.0;
    arena.reset();
    EXPECT_NEAR(model->forward(ids, arena).ce_loss, r["loss"].get<double>() - aux, 2e-5);
  }
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

namespace moe {

// A checkpoint split into shards through model.safetensors.index.json loads to the same model;
// an index that names a file outside the folder, or a missing shard, is refused.
TEST(HfSharded, ShardsLoadLikeOneFileAndIndexesCannotLeaveTheFolder) {
  namespace fs = std::filesystem;
  const std::string src = fixture("qwen2_moe");
  const fs::path dir = fs::temp_directory_path() / "moe_sharded_qwen2";
  const nlohmann::json map = write_two_shards(src, dir, "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors");
  auto write_index = [&](const nlohmann::json& m) {
    std::ofstream(dir / "model.safetensors.index.json") << nlohmann::json{{"weight_map", m}}.dump();
  };
  write_index(map);
  const SafetensorsFile ref = load_safetensors(src + "/reference.safetensors");
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  const Tensor one = load_model(src)->logits(ids, arena).clone();
  const Tensor sharded = load_model(dir.string())->logits(ids, arena);
  for (int64_t i = 0; i < one.numel(); ++i) ASSERT_EQ(one.at(i), sharded.at(i)) << i;

  auto expect_refused = [&](const std::string& needle) {
    try {
      load_model(dir.string());
      ADD_FAILURE() << "loaded; expected: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  nlohmann::json evil = map;
  evil["lm_head.weight"] = "../model-00001-of-00002.safetensors";
  write_index(evil);
  expect_refused("is not a file in the model folder");
  nlohmann::json missing = map;
  missing["lm_head.weight"] = "model-00003-of-00002.safetensors";
  write_index(missing);
  expect_refused("is missing");
  std::ofstream(dir / "model.safetensors.index.json") << "{\"weight_map\": [";
  expect_refused("is not valid JSON");
  fs::remove_all(dir);
}

// The other spellings of the same checkpoint: transformers' fused 3-D expert tensors
// (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]) and a top-level rope_theta
// (older config files) give the same model.
TEST(HfLayouts, FusedExpertsAndTopLevelRopeThetaLoadTheSameModel) {
  namespace fs = std::filesystem;
  const std::string src = fixture("qwen3_moe");
  const fs::path dir = fs::temp_directory_path() / "moe_fused_qwen3";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ifstream cf(src + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(cf);
  cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"];
  cfg.erase("rope_parameters");
  std::ofstream(dir / "config.json") << cfg.dump(1);
  const SafetensorsFile all = load_safetensors(src + "/model.safetensors");
  const int64_t E = cfg["num_local_experts"], F = cfg["moe_intermediate_size"],
                D = cfg["hidden_size"];
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, stored] : all.stored)
    if (name.find(".experts.") == std::string::npos) out.emplace_back(name, all.at(name));
  for (int64_t l = 0; l < cfg["num_hidden_layers"].get<int64_t>(); ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
    Tensor gate_up = Tensor::empty({E, 2 * F, D}, DType::F32);
    Tensor down = Tensor::empty({E, D, F}, DType::F32);
    for (int64_t e = 0; e < E; ++e) {
      const std::string q = p + std::to_string(e) + ".";
      float* gu = gate_up.data<float>() + e * 2 * F * D;
      std::memcpy(gu, all.at(q + "gate_proj.weight").raw(), F * D * sizeof(float));
      std::memcpy(gu + F * D, all.at(q + "up_proj.weight").raw(), F * D * sizeof(float));
      std::memcpy(down.data<float>() + e * D * F, all.at(q + "down_proj.weight").raw(),
                  D * F * sizeof(float));
    }
    out.emplace_back(p + "gate_up_proj", gate_up);
    out.emplace_back(p + "down_proj", down);
  }
  save_safetensors((dir / "model.safetensors").string(), out);
  const SafetensorsFile ref = load_safetensors(src + "/reference.safetensors");
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  const Tensor one = load_model(src)->logits(ids, arena).clone();
  const Tensor fused = load_model(dir.string())->logits(ids, arena);
  for (int64_t i = 0; i < one.numel(); ++i) ASSERT_EQ(one.at(i), fused.at(i)) << i;
  fs::remove_all(dir);
}

}  // namespace moe
