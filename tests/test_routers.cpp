// Behaviour of the routing methods beyond their gradients: expert choice's exact balance,
// DeepSeek-V3's bias (selection only, and the auxiliary-loss-free update), the training-only
// noise of jitter, noisy top-k, GShard and exploration, and their parameter errors.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "moe_test_util.h"

namespace moe {

namespace {

MoeConfig router_config(RouterKind kind) {
  MoeConfig c = test::base_config();
  c.router = kind;
  return c;
}

MoeOutput forward(MoeLayer& layer, const Tensor& x, Arena& arena) {
  arena.reset();
  return layer.forward(x, arena);
}

}  // namespace

TEST(Routers, ExpertChoiceGivesEveryExpertExactlyCTokens) {
  for (double cf : {0.5, 1.0, 2.0, 3.0}) {
    for (int64_t n : {7, 16, 33}) {
      MoeConfig cfg = router_config(RouterKind::expert_choice);
      cfg.n_experts = 5;
      cfg.capacity_factor = cf;
      MoeLayer layer = test::random_layer(cfg, DType::F32, 1);
      Arena arena;
      MoeOutput out = forward(layer, test::random_tensor({n, cfg.d_model}, DType::F32, 2), arena);
      const int64_t C = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(n * cf / 5)));
      for (int64_t e = 0; e < 5; ++e) {
        EXPECT_EQ(out.stats.routed[e], C) << "cf=" << cf << " n=" << n;
        EXPECT_EQ(out.stats.kept[e], C);
      }
      EXPECT_DOUBLE_EQ(out.stats.load_imbalance, 1.0);
      EXPECT_EQ(out.stats.dropped_fraction, 0.0);
    }
  }
}

TEST(Routers, DeepseekBiasSteersSelectionButNotWeights) {
  MoeConfig cfg = router_config(RouterKind::deepseek);
  cfg.n_experts = 8;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  MoeLayer layer = test::random_layer(cfg, DType::F64, 3);
  Tensor x = test::random_tensor({32, cfg.d_model}, DType::F64, 4);
  Arena arena;
  MoeOutput before = forward(layer, x, arena);
  Tensor y0 = before.y.clone();
  // A large bias on expert 5 makes every token pick it; the outputs change only because the
  // selection changed (the weights are the affinities, never s + b).
  (*layer.router().selection_bias())[5] = 10;
  MoeOutput after = forward(layer, x, arena);
  EXPECT_EQ(after.stats.routed[5], 32);
  // With the same selection, a bias that changes no choice changes nothing.
  std::vector<double>& b = *layer.router().selection_bias();
  std::fill(b.begin(), b.end(), 0.0);
  for (double& v : b) v += 1e-3;  // the same shift for every expert: the same choices
  MoeOutput same = forward(layer, x, arena);
  EXPECT_TRUE(test::bit_equal(same.y, y0));
}

TEST(Routers, DeepseekAuxLossFreeBiasUpdateReducesImbalanceStepByStep) {
  MoeConfig cfg = router_config(RouterKind::deepseek);
  cfg.n_experts = 8;
  cfg.top_k = 2;
  cfg.aux_loss_coef = 0;
  cfg.bias_update_rate = 0.02;
  MoeLayer layer = test::random_layer(cfg, DType::F32, 5);
  // Skew: expert 0's router row aligned with the inputs' mean, so most tokens pick it.
  Tensor x = test::random_tensor({512, cfg.d_model}, DType::F32, 6);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] += 1.0f;
  float* wr = layer.params().w_router.data<float>();
  for (int64_t d = 0; d < cfg.d_model; ++d) wr[d] = 1.5f;
  Arena arena;
  std::vector<double> imbalance;
  for (int step = 0; step < 30; ++step) {
    imbalance.push_back(forward(layer, x, arena).stats.load_imbalance);
    layer.after_step();
  }
  for (double v : imbalance) std::printf("%.3f ", v);
  std::printf("\n");
  EXPECT_GT(imbalance[0], 3.0) << "the synthetic routing should start skewed";
  // Falls step by step while far from balance, and ends far below where it started.
  for (int step = 1; step < 10; ++step) EXPECT_LE(imbalance[step], imbalance[step - 1]);
  EXPECT_LT(imbalance.back(), 0.5 * imbalance[0]);
  // Only training forwards count: an evaluation forward leaves the next update nothing to do.
  std::vector<double> before = *layer.router().selection_bias();
  layer.set_training(false);
  forward(layer, x, arena);
  layer.after_step();
  EXPECT_EQ(*layer.router().selection_bias(), before);
  // The micro-batches of an accumulated step add up: two forwards, one update.
  layer.set_training(true);
  forward(layer, x, arena);
  forward(layer, x, arena);
  layer.after_step();
  int64_t changed = 0;
  for (size_t e = 0; e < before.size(); ++e)
    changed += std::abs((*layer.router().selection_bias())[e] - before[e]) > 0;
  EXPECT_GT(changed, 0);
  // A frozen router keeps its bias.
  cfg.freeze_router = true;
  MoeLayer frozen = test::random_layer(cfg, DType::F32, 5);
  forward(frozen, x, arena);
  frozen.after_step();
  for (double v : *frozen.router().selection_bias()) EXPECT_EQ(v, 0.0);
}

TEST(Routers, NoiseOnlyInTraining) {
  struct Case {
    const char* name;
    void (*edit)(MoeConfig&);
  };
  const Case cases[] = {
      {"jitter", [](MoeConfig& c) { c.jitter_eps = 0.2; }},
      {"explore",
       [](MoeConfig& c) {
         c.n_experts = 6;
         c.explore_prob = 0.5;
       }},
      {"noisy_topk", [](MoeConfig& c) { c.router = RouterKind::noisy_topk; }},
      {"gshard", [](MoeConfig& c) { c.router = RouterKind::gshard; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    MoeConfig cfg = test::base_config();
    c.edit(cfg);
    MoeLayer layer = test::random_layer(cfg, DType::F64, 7);
    Rng rng(8);
    layer.init(rng);  // seeds the layer's noise stream
    Tensor x = test::random_tensor({64, cfg.d_model}, DType::F64, 9);
    Arena arena;
    layer.set_training(false);
    Tensor e1 = forward(layer, x, arena).y.clone();
    Tensor e2 = forward(layer, x, arena).y.clone();
    EXPECT_TRUE(test::bit_equal(e1, e2)) << "evaluation must be deterministic";
    layer.set_training(true);
    Tensor t1 = forward(layer, x, arena).y.clone();
    Tensor t2 = forward(layer, x, arena).y.clone();
    EXPECT_FALSE(test::bit_equal(t1, t2)) << "training draws fresh noise each call";
    EXPECT_FALSE(test::bit_equal(t1, e1));
  }
}

TEST(Routers, GshardDispatchesTheSecondExpertWithProbabilityTwiceItsWeight) {
  MoeConfig cfg = router_config(RouterKind::gshard);
  cfg.n_experts = 4;
  MoeLayer layer = test::random_layer(cfg, DType::F64, 10);
  Rng rng(11);
  layer.init(rng);
  Tensor x = test::random_tensor({4000, cfg.d_model}, DType::F64, 12);
  Arena arena;
  layer.set_training(false);
  EXPECT_EQ(forward(layer, x, arena).stats.dropped_fraction, 0.0);
  int64_t eval_pairs = 0;
  for (int64_t c : forward(layer, x, arena).stats.routed) eval_pairs += c;
  EXPECT_EQ(eval_pairs, 2 * 4000);
  layer.set_training(true);
  int64_t train_pairs = 0;
  for (int64_t c : forward(layer, x, arena).stats.routed) train_pairs += c;
  // Expected second dispatches: sum_t min(1, 2 w2_t), w2 the second weight normalized over the
  // pair; computed here from the softmax of the router logits.
  const double* wr = layer.params().w_router.data<double>();
  double expected = 0;
  for (int64_t t = 0; t < 4000; ++t) {
    std::vector<double> p(4);
    for (int64_t e = 0; e < 4; ++e) {
      for (int64_t d = 0; d < cfg.d_model; ++d)
        p[e] += x.data<double>()[t * cfg.d_model + d] * wr[e * cfg.d_model + d];
    }
    std::sort(p.begin(), p.end(), std::greater<>());
    const double w2 = std::exp(p[1]) / (std::exp(p[0]) + std::exp(p[1]));
    expected += std::min(1.0, 2 * w2);
  }
  EXPECT_NEAR(static_cast<double>(train_pairs - 4000), expected, 4 * std::sqrt(expected));
}

TEST(Routers, ExplorationReplacesAboutPOfTheSlots) {
  MoeConfig cfg = test::base_config();
  cfg.n_experts = 8;
  cfg.top_k = 2;
  cfg.explore_prob = 0.3;
  MoeLayer layer = test::random_layer(cfg, DType::F64, 13);
  Rng rng(14);
  layer.init(rng);
  Tensor x = test::random_tensor({3000, cfg.d_model}, DType::F64, 15);
  Arena arena;
  layer.set_training(false);
  std::vector<int64_t> base = forward(layer, x, arena).stats.routed;
  layer.set_training(true);
  std::vector<int64_t> explored = forward(layer, x, arena).stats.routed;
  // Replacing 30% of the slots moves load from the popular experts to the others: the routed
  // counts get closer to uniform, by roughly p of the distance.
  double dist0 = 0, dist1 = 0;
  for (int64_t e = 0; e < 8; ++e) {
    dist0 += std::abs(static_cast<double>(base[e]) - 750.0);
    dist1 += std::abs(static_cast<double>(explored[e]) - 750.0);
  }
  EXPECT_LT(dist1, 0.85 * dist0);
  EXPECT_GT(dist1, 0.4 * dist0);
}

TEST(Routers, BadParametersGiveClearErrors) {
  auto expect_error = [](void (*edit)(MoeConfig&), const std::string& needle) {
    MoeConfig cfg = test::base_config();
    edit(cfg);
    try {
      MoeLayer layer(cfg);
      ADD_FAILURE() << "no error; expected: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([](MoeConfig& c) { c.router = RouterKind::switch_top1; },
               "router switch needs top_k = 1 and renormalize = false");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::noisy_topk;
        c.top_k = 4;
      },
      "router noisy_topk needs top_k < n_experts");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::gshard;
        c.top_k = 1;
      },
      "router gshard needs top_k = 2");
  expect_error([](MoeConfig& c) { c.router = RouterKind::expert_choice; },
               "router expert_choice needs capacity_factor > 0");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::hierarchical;
        c.hme_groups = 3;
      },
      "router hierarchical needs hme_groups >= 1 dividing n_experts = 4, got 3");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::hierarchical;
        c.hme_groups = 2;
        c.hme_expert_k = 3;
      },
      "hme_expert_k must be in [0, experts per group = 2], got 3");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::deepseek;
        c.n_group = 3;
      },
      "n_group must be >= 1 and divide n_experts = 4, got 3");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::deepseek;
        c.n_group = 2;
        c.topk_group = 3;
      },
      "topk_group must be in [1, n_group = 2], got 3");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::deepseek;
        c.routed_scaling_factor = 0;
      },
      "routed_scaling_factor must be finite and > 0");
  expect_error([](MoeConfig& c) { c.jitter_eps = 1.5; }, "jitter_eps must be in [0, 1)");
  expect_error([](MoeConfig& c) { c.explore_prob = -0.1; }, "explore_prob must be in [0, 1]");
  expect_error(
      [](MoeConfig& c) {
        c.frozen_experts = {1, 9};
      },
      "frozen_experts[1] = 9 is not an expert index in [0, 4)");
  expect_error([](MoeConfig& c) { c.capacity_group = -2; }, "capacity_group must be >= 0");
  nlohmann::json j = test::base_config();
  j["router"] = "random";
  try {
    (void)j.get<MoeConfig>();
    ADD_FAILURE() << "no error for an unknown router";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown router 'random' (topk, switch, noisy_topk"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace moe
