// Bad configurations and bad inputs give a clear moe::Error, never a crash.
#include <gtest/gtest.h>

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "moe/json_read.h"
#include "moe/trainer.h"
#include "moe_test_util.h"

namespace moe {

namespace {

// Runs fn, expects moe::Error whose message contains `needle`.
template <class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

MoeConfig edited(void (*edit)(MoeConfig&)) {
  MoeConfig c = test::base_config();
  edit(c);
  return c;
}

}  // namespace

TEST(Errors, BadConfigurations) {
  struct Case {
    void (*edit)(MoeConfig&);
    const char* needle;
  };
  const Case cases[] = {
      {[](MoeConfig& c) { c.top_k = 5; }, "top_k must be in [1, n_experts = 4], got 5"},
      {[](MoeConfig& c) { c.top_k = 0; }, "top_k must be in [1, n_experts = 4], got 0"},
      {[](MoeConfig& c) { c.n_experts = 0; }, "n_experts must be in [1, 2^30], got 0"},
      {[](MoeConfig& c) { c.d_model = 0; }, "d_model must be >= 1, got 0"},
      {[](MoeConfig& c) { c.d_ffn = -3; }, "d_ffn must be >= 1, got -3"},
      {[](MoeConfig& c) { c.n_shared = -1; }, "n_shared must be >= 0"},
      {[](MoeConfig& c) { c.d_shared_ffn = -1; }, "d_shared_ffn must be >= 0"},
      {[](MoeConfig& c) { c.shared_gate = true; }, "shared_gate needs n_shared > 0"},
      {[](MoeConfig& c) { c.capacity_factor = std::numeric_limits<double>::quiet_NaN(); },
       "capacity_factor must be finite"},
      {[](MoeConfig& c) { c.capacity_factor = std::numeric_limits<double>::infinity(); },
       "capacity_factor must be finite"},
      {[](MoeConfig& c) { c.aux_loss_coef = -1; }, "aux_loss_coef must be finite and >= 0"},
      {[](MoeConfig& c) { c.z_loss_coef = std::numeric_limits<double>::infinity(); },
       "z_loss_coef must be finite and >= 0"},
  };
  for (const Case& c : cases) {
    const MoeConfig cfg = edited(c.edit);
    expect_error([&] { MoeLayer layer(cfg); }, std::string("[moe.config] ") + c.needle);
  }
  expect_error([] { MoeLayer layer(test::base_config(), DType::I32); }, "dtype must be f32 or f64");
}

TEST(Errors, BadInputs) {
  MoeLayer layer = test::random_layer(test::base_config(), DType::F32, 1);
  Arena arena;
  expect_error(
      [&] {
        layer.forward(Tensor::zeros({4, 7}, DType::F32), arena);
      },
      "[moe.forward] x must be f32[N, 6], got f32[4, 7]");
  expect_error(
      [&] {
        layer.forward(Tensor::zeros({4, 6}, DType::F64), arena);
      },
      "x must be f32[N, 6], got f64[4, 6]");
  expect_error([&] { layer.forward(Tensor::zeros({6}, DType::F32), arena); },
               "x must be f32[N, 6], got f32[6]");
  expect_error([&] { layer.forward(Tensor::zeros({0, 6}, DType::F32), arena); }, "x has no tokens");
  Tensor x = Tensor::zeros({4, 6}, DType::F32);
  x.data<float>()[2 * 6 + 5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { layer.forward(x, arena); },
               "input x has a non-finite value (nan) at row 2, column 5");
  x.data<float>()[2 * 6 + 5] = std::numeric_limits<float>::infinity();
  expect_error([&] { layer.forward(x, arena); }, "input x has a non-finite value (inf)");

  // NaN in the router weights is named too.
  MoeLayer bad = test::random_layer(test::base_config(), DType::F32, 2);
  bad.params().w_router.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  expect_error(
      [&] {
        bad.forward(Tensor::zeros({4, 6}, DType::F32), arena);
      },
      "router logits (check the router weights) has a non-finite value");

  // Backward: wrong shapes and NaN gradients.
  Tensor good = test::random_tensor({4, 6}, DType::F32, 3);
  layer.forward(good, arena);
  Tensor dx = Tensor::zeros({4, 6}, DType::F32);
  expect_error(
      [&] {
        layer.backward(Tensor::zeros({5, 6}, DType::F32), dx, arena);
      },
      "[moe.backward] dy must be f32[4, 6], got f32[5, 6]");
  Tensor dy = Tensor::zeros({4, 6}, DType::F32);
  dy.data<float>()[7] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { layer.backward(dy, dx, arena); },
               "upstream gradient dy has a non-finite value (nan) at row 1, column 1");
}

TEST(Errors, ConfigJson) {
  nlohmann::json j = test::base_config();
  EXPECT_EQ(j.get<MoeConfig>().top_k, 2);
  j["top_kk"] = 3;
  expect_error([&] { (void)j.get<MoeConfig>(); }, "unknown key 'top_kk'");
  j.erase("top_kk");
  j["act"] = "tanh";
  expect_error([&] { (void)j.get<MoeConfig>(); }, "unknown expert activation 'tanh'");
  j["act"] = "relu";
  j["top_k"] = "two";
  expect_error([&] { (void)j.get<MoeConfig>(); }, "[moe.config] 'top_k' must be an integer");
  expect_error([] { (void)nlohmann::json::array().get<MoeConfig>(); }, "expected a JSON object");
}

// A number where the file needs another kind is refused by name, never converted: a float
// too large for an integer (casting it would be undefined behaviour), an integer too large
// for its field, a number where a flag belongs, and each of these inside a list.
TEST(Errors, NumbersOfTheWrongKind) {
  const auto ours = [](const std::string& key, const std::string& value) {
    return fmt::format(R"({{"moe_cpp": {{"vocab_size": 64, "d_model": 16, "n_layers": 1,
        "n_heads": 2, "d_ffn": 32, "max_seq_len": 32, {}: {}}}}})",
                       key, value);
  };
  const auto parse = [](const std::string& text) {
    (void)parse_checkpoint_config(text, "config.json");
  };
  EXPECT_NO_THROW(parse(ours("\"n_kv_heads\"", "2")));
  expect_error([&] { parse(ours("\"n_kv_heads\"", "4.22222e+102")); },
               "'n_kv_heads' must be an integer, not 4.22222e+102");
  expect_error([&] { parse(ours("\"n_kv_heads\"", "2.0")); },
               "'n_kv_heads' must be an integer, not 2.0");
  expect_error([&] { parse(ours("\"n_kv_heads\"", "-1e300")); }, "must be an integer");
  expect_error([&] { parse(ours("\"tie_embeddings\"", "1")); },
               "'tie_embeddings' must be true or false, not 1");
  expect_error([&] { parse(ours("\"dense_layers\"", "[0, 1e200]")); },
               "'dense_layers[1]' must be an integer, not 1e+200");
  expect_error([&] { parse(ours("\"moe\"", R"({"top_k": 1e30})")); },
               "[moe.config] 'top_k' must be an integer");
  expect_error([&] { parse(ours("\"moe\"", R"({"frozen_experts": [1.5]})")); },
               "'frozen_experts[0]' must be an integer, not 1.5");

  // A HuggingFace config.json (Mixtral's own reader and the common one).
  nlohmann::json hf = {
      {"model_type", "mixtral"},       {"vocab_size", 64},         {"hidden_size", 16},
      {"num_hidden_layers", 1},        {"num_attention_heads", 2}, {"intermediate_size", 32},
      {"num_local_experts", 4},        {"num_experts_per_tok", 2}, {"max_position_embeddings", 32},
      {"num_key_value_heads", 4.2e102}};
  expect_error([&] { parse(hf.dump()); }, "'num_key_value_heads' must be an integer");
  hf["num_key_value_heads"] = 2;
  EXPECT_NO_THROW(parse(hf.dump()));
  hf["num_local_experts"] = 1e20;
  expect_error([&] { parse(hf.dump()); }, "'num_local_experts' must be an integer");
  std::ifstream f(std::string(MOE_TEST_FIXTURES) + "/hf/qwen3_moe/config.json");
  nlohmann::json qwen = nlohmann::json::parse(f);
  EXPECT_NO_THROW(parse(qwen.dump()));
  qwen["mlp_only_layers"] = {0.5};
  expect_error([&] { parse(qwen.dump()); }, "'mlp_only_layers[0]' must be an integer");
  qwen.erase("mlp_only_layers");
  // An optional field of the wrong kind is refused, not replaced by its default; null is "not
  // set", as transformers writes it.
  qwen["norm_topk_prob"] = 1;
  expect_error([&] { parse(qwen.dump()); }, "'norm_topk_prob' must be true or false, not 1");
  qwen["norm_topk_prob"] = nullptr;
  EXPECT_NO_THROW(parse(qwen.dump()));
  qwen["decoder_sparse_step"] = 1.5;
  expect_error([&] { parse(qwen.dump()); }, "'decoder_sparse_step' must be an integer, not 1.5");

  // An integer beyond its C++ type, and a train config with a float where a count belongs.
  expect_error([] { (void)json_as<int32_t>(nlohmann::json(int64_t{1} << 40), "t", "id"); },
               "'id' = 1099511627776 is out of range");
  expect_error([] { (void)json_as<uint32_t>(nlohmann::json(-1), "t", "crc32"); },
               "'crc32' = -1 is out of range");
  expect_error(
      [] {
        (void)nlohmann::json{{"batch", 1e99}}.get<TrainConfig>();
      },
      "[train.config] 'batch' must be an integer");
}

}  // namespace moe

namespace moe {

// Router logits at the extremes, for every routing method:
// - huge finite logits (|logit| ~ 1e30, from huge router weights): the forward pass stays finite
//   (softmax subtracts the maximum, the sigmoid saturates, the z-loss is summed in double);
// - large ones (|logit| ~ 1e8, where exp() alone would overflow at 89): forward and backward
//   stay finite. (At 1e30 the backward's true router gradient, about logit x weight, exceeds
//   float32; the trainer's guard then stops the step naming that gradient: test_trainer.cpp.)
// - infinite logits (infinite weights) are refused, naming the router logits.
TEST(Errors, RouterLogitsAtTheExtremes) {
  const std::vector<std::pair<RouterKind, const char*>> kinds = {
      {RouterKind::topk, "topk"},        {RouterKind::switch_top1, "switch"},
      {RouterKind::noisy_topk, "noisy"}, {RouterKind::gshard, "gshard"},
      {RouterKind::expert_choice, "ec"}, {RouterKind::soft, "soft"},
      {RouterKind::hierarchical, "hme"}, {RouterKind::deepseek, "deepseek"}};
  for (const auto& [kind, name] : kinds) {
    for (double scale : {1e30, -1e30, 1e8, -1e8}) {
      SCOPED_TRACE(fmt::format("{} router, weights x {:g}", name, scale));
      MoeConfig cfg = test::base_config();
      cfg.router = kind;
      cfg.top_k = kind == RouterKind::switch_top1 ? 1 : 2;
      if (kind == RouterKind::switch_top1) cfg.renormalize = false;
      if (kind == RouterKind::expert_choice) cfg.capacity_factor = 1;
      if (kind == RouterKind::hierarchical) cfg.hme_groups = 2;
      if (kind == RouterKind::deepseek) {
        cfg.n_group = 2;
        cfg.topk_group = 1;
      }
      MoeLayer layer = test::random_layer(cfg, DType::F32, 7);
      layer.set_training(true);
      Tensor& w = layer.params().w_router;
      for (int64_t i = 0; i < w.numel(); ++i)
        w.data<float>()[i] = static_cast<float>(scale * (i % 3 == 0 ? 1.0 : -0.5));
      Arena arena;
      const Tensor x = test::random_tensor({8, 6}, DType::F32, 8);
      const MoeOutput out = layer.forward(x, arena);
      EXPECT_TRUE(std::isfinite(out.aux_loss)) << out.aux_loss;
      EXPECT_TRUE(std::isfinite(out.z_loss)) << out.z_loss;
      for (int64_t i = 0; i < out.y.numel(); ++i) ASSERT_TRUE(std::isfinite(out.y.at(i))) << i;
      {  // infinite weights: infinite or NaN logits, refused by name
        MoeLayer inf = test::random_layer(cfg, DType::F32, 7);
        inf.params().w_router.data<float>()[0] =
            static_cast<float>(scale > 0 ? INFINITY : -INFINITY);
        expect_error([&] { inf.forward(x, arena); }, "router logits");
      }
      if (std::abs(scale) > 1e10) continue;
      Tensor dx = Tensor::zeros({8, 6}, DType::F32);
      layer.backward(test::random_tensor({8, 6}, DType::F32, 9), dx, arena);
      for (int64_t i = 0; i < dx.numel(); ++i) ASSERT_TRUE(std::isfinite(dx.at(i))) << i;
      for (int64_t i = 0; i < layer.grads().w_router.numel(); ++i)
        ASSERT_TRUE(std::isfinite(layer.grads().w_router.at(i))) << i;
    }
  }
}

}  // namespace moe
