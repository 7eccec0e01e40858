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

// Router warm-up: dense routing is the soft router on the same weights, bit for bit (output,
// losses, input and weight gradients), whatever the configured router; switched off, the
// configured routing is back. Routers with other logits than one per expert are refused.
TEST(Routers, DenseWarmupRoutesAsTheSoftRouterDoes) {
  auto equal = [](const Tensor& a, const Tensor& b, const std::string& what) {
    ASSERT_EQ(a.shape(), b.shape()) << what;
    for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.at(i), b.at(i)) << what << "[" << i << "]";
  };
  for (RouterKind kind :
       {RouterKind::topk, RouterKind::gshard, RouterKind::expert_choice, RouterKind::deepseek}) {
    SCOPED_TRACE(to_string(kind));
    MoeConfig cfg = router_config(kind);
    if (kind == RouterKind::expert_choice || kind == RouterKind::gshard) cfg.capacity_factor = 1;
    cfg.n_shared = 1;
    MoeConfig soft = cfg;
    soft.router = RouterKind::soft;
    soft.capacity_factor = 0;
    MoeLayer warm = test::random_layer(cfg, DType::F64, 5);
    MoeLayer dense = test::random_layer(soft, DType::F64, 6);
    test::copy_params(warm.params(), dense.params());
    const Tensor x = test::random_tensor({10, cfg.d_model}, DType::F64, 7);
    const Tensor dy = test::random_tensor({10, cfg.d_model}, DType::F64, 8);
    warm.set_dense_routing(true);
    Arena a1, a2;
    const MoeOutput o1 = warm.forward(x, a1), o2 = dense.forward(x, a2);
    equal(o1.y, o2.y, "y");
    EXPECT_EQ(o1.z_loss, o2.z_loss);
    EXPECT_EQ(o1.aux_loss, 0);
    EXPECT_EQ(o1.stats.routed, std::vector<int64_t>(static_cast<size_t>(cfg.n_experts), 10));
    Tensor dx1 = Tensor::empty(x.shape(), DType::F64), dx2 = Tensor::empty(x.shape(), DType::F64);
    warm.zero_grad();
    dense.zero_grad();
    warm.backward(dy, dx1, a1);
    dense.backward(dy, dx2, a2);
    equal(dx1, dx2, "dx");
    equal(warm.grads().w_router, dense.grads().w_router, "router gradient");
    equal(warm.grads().experts.w_down, dense.grads().experts.w_down, "expert gradient");
    // Warm-up over: the configured routing, as a layer that never warmed up.
    warm.set_dense_routing(false);
    MoeLayer plain = test::random_layer(cfg, DType::F64, 9);
    test::copy_params(warm.params(), plain.params());
    equal(forward(warm, x, a1).y, forward(plain, x, a2).y, "y after warm-up");
  }
  MoeConfig noisy = router_config(RouterKind::noisy_topk);
  MoeLayer layer(noisy, DType::F64);
  try {
    layer.set_dense_routing(true);
    ADD_FAILURE() << "noisy_topk's 2E logit rows were not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the noisy_topk router has 8 logit rows for 4 experts"),
              std::string::npos)
        << e.what();
  }
}

// Global-batch balancing: f counts every micro-batch of the step so far. The first micro-batch's
// losses are the plain ones; the second's use both batches' counts (checked against the
// formula, and its gradient by finite differences in double precision with the first batch
// replayed before every evaluation); after_step() starts a new window; inference adds nothing.
TEST(Routers, GlobalBalanceCountsTheStepsMicroBatches) {
  MoeConfig cfg = router_config(RouterKind::topk);
  cfg.n_experts = 6;
  cfg.aux_loss_coef = 0.3;
  cfg.device_aux_loss_coef = 0.2;
  cfg.n_devices = 2;
  MoeConfig global = cfg;
  global.global_balance = true;
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k;
  MoeLayer g = test::random_layer(global, DType::F64, 3);
  MoeLayer plain = test::random_layer(cfg, DType::F64, 4);
  test::copy_params(g.params(), plain.params());
  const Tensor x1 = test::random_tensor({12, D}, DType::F64, 5);
  const Tensor x2 = test::random_tensor({9, D}, DType::F64, 6);
  Arena a1, a2;
  const MoeOutput o1 = forward(g, x1, a1);
  EXPECT_EQ(o1.aux_loss, forward(plain, x1, a2).aux_loss);
  const std::vector<int64_t> c1 = o1.stats.routed;
  const MoeOutput o2 = forward(g, x2, a1);
  // The expected losses from the two batches' counts and the second one's probabilities.
  std::vector<double> f(static_cast<size_t>(E)), p(static_cast<size_t>(E), 0.0);
  for (int64_t e = 0; e < E; ++e)
    f[static_cast<size_t>(e)] =
        static_cast<double>(c1[static_cast<size_t>(e)] + o2.stats.routed[static_cast<size_t>(e)]) /
        (21.0 * static_cast<double>(K));
  const Tensor& l = o2.router_logits;
  for (int64_t t = 0; t < 9; ++t) {
    double mx = -1e300, sum = 0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l.at(t * E + e));
    for (int64_t e = 0; e < E; ++e) sum += std::exp(l.at(t * E + e) - mx);
    for (int64_t e = 0; e < E; ++e)
      p[static_cast<size_t>(e)] += std::exp(l.at(t * E + e) - mx) / sum / 9.0;
  }
  double aux = 0, dev = 0;
  for (int64_t e = 0; e < E; ++e)
    aux += cfg.aux_loss_coef * static_cast<double>(E) * f[static_cast<size_t>(e)] *
           p[static_cast<size_t>(e)];
  for (int64_t d = 0; d < 2; ++d) {
    double fd = 0, pd = 0;
    for (int64_t e = 3 * d; e < 3 * d + 3; ++e) {
      fd += static_cast<double>(E) * f[static_cast<size_t>(e)] / 3.0;
      pd += p[static_cast<size_t>(e)];
    }
    dev += cfg.device_aux_loss_coef * fd * pd;
  }
  EXPECT_NEAR(o2.aux_loss, aux + dev, 1e-14);
  EXPECT_NE(o2.aux_loss, forward(plain, x2, a2).aux_loss);

  // Finite differences of L = <y, dy> + aux + z at the second micro-batch.
  const Tensor dy = test::random_tensor({9, D}, DType::F64, 7);
  auto objective = [&] {
    g.after_step();
    forward(g, x1, a1);
    const MoeOutput o = forward(g, x2, a2);
    double v = o.aux_loss + o.z_loss;
    for (int64_t i = 0; i < dy.numel(); ++i) v += o.y.at(i) * dy.at(i);
    return v;
  };
  objective();
  g.zero_grad();
  Tensor dx = Tensor::empty(x2.shape(), DType::F64);
  g.backward(dy, dx, a2);
  Tensor& wr = g.params().w_router;
  for (int64_t i = 0; i < wr.numel(); ++i) {
    double* v = wr.data<double>() + i;
    const double saved = *v, h = 1e-6;
    *v = saved + h;
    const double lp = objective();
    *v = saved - h;
    const double lm = objective();
    *v = saved;
    ASSERT_NEAR(g.grads().w_router.at(i), (lp - lm) / (2 * h), 1e-7) << "router weight " << i;
  }
  // A new step's window, and inference, count this batch alone.
  g.after_step();
  EXPECT_EQ(forward(g, x2, a1).aux_loss, forward(plain, x2, a2).aux_loss);
  g.after_step();
  g.set_training(false);
  forward(g, x1, a1);
  g.set_training(true);
  EXPECT_EQ(forward(g, x2, a1).aux_loss, forward(plain, x2, a2).aux_loss);
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
  expect_error(
      [](MoeConfig& c) {
        c.device_aux_loss_coef = 0.05;
        c.n_devices = 3;
      },
      "the device-level balance loss needs n_devices >= 1 dividing n_experts = 4, got 3");
  expect_error(
      [](MoeConfig& c) {
        c.router = RouterKind::soft;
        c.device_aux_loss_coef = 0.05;
        c.n_devices = 2;
      },
      "the device-level balance loss (device_aux_loss_coef) needs the topk or switch router, got "
      "soft");
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
