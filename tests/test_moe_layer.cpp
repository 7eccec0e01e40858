// The optimized MoE layer against the per-token reference, for every option, plus the edge
// cases of dispatch (empty experts, one token, K = E, ties, capacity) and determinism.
#include <gtest/gtest.h>

#include <cmath>

#include "moe/moe_ref.h"
#include "moe/threading.h"
#include "moe_test_util.h"

namespace moe {

using test::expect_close;
using test::NamedConfig;

namespace {

struct LayerRun {
  MoeOutput out;
  Tensor y, dx;
  MoeParams grads;
};

// Forward and backward of the optimized layer; y and dx copied out of the arena.
LayerRun run_layer(MoeLayer& layer, const Tensor& x, const Tensor& dy, Arena& arena,
                   double d_aux = 1, double d_z = 1) {
  LayerRun r;
  arena.reset();
  layer.zero_grad();
  r.out = layer.forward(x, arena);
  r.y = r.out.y.clone();
  r.dx = Tensor::empty(x.shape(), x.dtype());
  layer.backward(dy, r.dx, arena, d_aux, d_z);
  r.grads = layer.grads();
  return r;
}

void compare_with_reference(MoeLayer& layer, int64_t n_tokens, uint64_t seed,
                            const Tensor* x_in = nullptr) {
  const MoeConfig& cfg = layer.config();
  const DType dtype = layer.dtype();
  const int64_t D = cfg.d_model, E = cfg.n_experts;
  Tensor x = x_in ? *x_in : test::random_tensor({n_tokens, D}, dtype, seed + 1);
  Tensor dy = test::random_tensor({n_tokens, D}, dtype, seed + 2);
  Arena arena;
  const double d_aux = 0.7, d_z = 1.3;
  const test::Noise noise(seed + 3);
  noise.apply(layer);
  LayerRun fast = run_layer(layer, x, dy, arena, d_aux, d_z);

  ref::RefOutput ro = ref::moe_forward(cfg, layer.params(), x, noise.options());
  MoeParams rg = MoeParams::zeros(cfg, dtype);
  Tensor rdx = Tensor::empty(x.shape(), dtype);
  ref::moe_backward(cfg, layer.params(), x, dy, d_aux, d_z, rdx, rg, noise.options());

  // Routing must agree exactly.
  std::vector<int64_t> routed(static_cast<size_t>(E), 0), kept(static_cast<size_t>(E), 0);
  for (size_t p = 0; p < ro.expert.size(); ++p) {
    ++routed[static_cast<size_t>(ro.expert[p])];
    kept[static_cast<size_t>(ro.expert[p])] += ro.kept[p];
  }
  EXPECT_EQ(fast.out.stats.routed, routed);
  EXPECT_EQ(fast.out.stats.kept, kept);

  const bool f64 = dtype == DType::F64;
  const double rtol = f64 ? 1e-12 : 2e-5;
  expect_close(fast.y, ro.y, rtol, 0, "y");
  EXPECT_NEAR(fast.out.aux_loss, ro.aux_loss, (f64 ? 1e-14 : 1e-6) * (1 + ro.aux_loss));
  EXPECT_NEAR(fast.out.z_loss, ro.z_loss, (f64 ? 1e-14 : 1e-6) * (1 + ro.z_loss));
  expect_close(fast.dx, rdx, rtol, 0, "dx");
  std::vector<Tensor> want;
  rg.for_each([&](const std::string&, const Tensor& t) { want.push_back(t); });
  size_t i = 0;
  fast.grads.for_each([&](const std::string& name, const Tensor& g) {
    expect_close(g, want[i++], f64 ? 1e-11 : 5e-5, f64 ? 1e-14 : 1e-7, "grad " + name);
  });
}

void compare_with_reference(const MoeConfig& cfg, DType dtype, int64_t n_tokens, uint64_t seed) {
  MoeLayer layer = test::random_layer(cfg, dtype, seed);
  compare_with_reference(layer, n_tokens, seed);
}

}  // namespace

class LayerVsReference : public ::testing::TestWithParam<NamedConfig> {};

TEST_P(LayerVsReference, Float64) { compare_with_reference(GetParam().cfg, DType::F64, 23, 11); }
TEST_P(LayerVsReference, Float32) { compare_with_reference(GetParam().cfg, DType::F32, 23, 12); }

INSTANTIATE_TEST_SUITE_P(AllOptions, LayerVsReference, ::testing::ValuesIn(test::option_matrix()),
                         [](const auto& p) { return p.param.name; });

TEST(MoeLayer, ExpertThatReceivesNoToken) {
  MoeConfig cfg = test::base_config();
  MoeLayer layer = test::random_layer(cfg, DType::F64, 5);
  // x is positive; expert 3's router row strongly negative: it never wins.
  Tensor x = test::random_tensor({16, cfg.d_model}, DType::F64, 6);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<double>()[i] = std::abs(x.data<double>()[i]) + 0.1;
  double* wr = layer.params().w_router.data<double>();
  for (int64_t d = 0; d < cfg.d_model; ++d) wr[3 * cfg.d_model + d] = -20;
  Arena arena;
  MoeOutput out = layer.forward(x, arena);
  ASSERT_EQ(out.stats.routed[3], 0);
  Tensor dx = Tensor::empty(x.shape(), DType::F64);
  layer.zero_grad();
  layer.backward(test::random_tensor(x.shape(), DType::F64, 7), dx, arena);
  // Expert 3's weight gradients are exactly zero (and not NaN from unwritten memory).
  const Tensor& g = layer.grads().experts.w_up;
  const int64_t per = cfg.d_ffn * cfg.d_model;
  for (int64_t i = 3 * per; i < 4 * per; ++i) ASSERT_EQ(g.at(i), 0.0);
  compare_with_reference(layer, 16, 5, &x);
}

TEST(MoeLayer, SingleToken) {
  for (const NamedConfig& nc : test::option_matrix()) {
    SCOPED_TRACE(nc.name);
    compare_with_reference(nc.cfg, DType::F64, 1, 21);
  }
}

TEST(MoeLayer, ExactTiesGoToTheLowestExpert) {
  MoeConfig cfg = test::base_config();
  cfg.n_experts = 5;
  cfg.top_k = 3;
  MoeLayer layer = test::random_layer(cfg, DType::F64, 8);
  layer.params().w_router.fill(0);  // every probability is exactly 1/E
  Tensor x = test::random_tensor({9, cfg.d_model}, DType::F64, 9);
  Arena arena;
  MoeOutput out = layer.forward(x, arena);
  EXPECT_EQ(out.stats.routed, (std::vector<int64_t>{9, 9, 9, 0, 0}));
  EXPECT_NEAR(out.stats.router_entropy, std::log(5.0), 1e-12);
  compare_with_reference(layer, 9, 8, &x);
}

TEST(MoeLayer, CapacityDropsAndStatistics) {
  MoeConfig cfg = test::base_config();
  cfg.capacity_factor = 0.5;
  MoeLayer layer = test::random_layer(cfg, DType::F32, 10);
  const int64_t N = 40;
  Tensor x = test::random_tensor({N, cfg.d_model}, DType::F32, 11);
  Arena arena;
  MoeOutput out = layer.forward(x, arena);
  const int64_t C = static_cast<int64_t>(std::ceil(0.5 * N * cfg.top_k / cfg.n_experts));
  EXPECT_EQ(out.stats.capacity, C);
  int64_t kept = 0, routed = 0, most = 0;
  for (int64_t e = 0; e < cfg.n_experts; ++e) {
    EXPECT_EQ(out.stats.kept[e], std::min(out.stats.routed[e], C));
    kept += out.stats.kept[e];
    routed += out.stats.routed[e];
    most = std::max(most, out.stats.routed[e]);
  }
  EXPECT_EQ(routed, N * cfg.top_k);
  EXPECT_GT(out.stats.dropped_fraction, 0);
  EXPECT_DOUBLE_EQ(out.stats.dropped_fraction, double(routed - kept) / double(routed));
  EXPECT_DOUBLE_EQ(out.stats.load_imbalance, double(most) / (double(routed) / cfg.n_experts));
  EXPECT_GT(out.stats.router_entropy, 0);
  EXPECT_LT(out.stats.router_entropy, std::log(double(cfg.n_experts)) + 1e-6);
  EXPECT_NE(out.stats.str().find("expert   3"), std::string::npos);
}

TEST(MoeLayer, ScoreDroppingKeepsTheHighestProbabilities) {
  // One expert, capacity for a quarter of the tokens: the kept ones are the most confident.
  MoeConfig cfg = test::base_config();
  cfg.n_experts = 2;
  cfg.top_k = 1;
  cfg.capacity_factor = 0.25;
  cfg.drop_policy = DropPolicy::score;
  MoeLayer layer = test::random_layer(cfg, DType::F64, 12);
  compare_with_reference(layer, 32, 12);
}

TEST(MoeLayer, SameBitsWithOneAndTwoThreads) {
  // E = 16 runs the experts in parallel; E = 2 runs them one by one with threaded GEMMs.
  for (int64_t experts : {16, 2}) {
    MoeConfig cfg;
    cfg.d_model = 64;
    cfg.d_ffn = 96;
    cfg.n_experts = experts;
    cfg.top_k = 2;
    cfg.n_shared = 1;
    cfg.shared_gate = true;
    cfg.capacity_factor = 1.0;
    const int64_t N = 512;
    Tensor x = test::random_tensor({N, cfg.d_model}, DType::F32, 13);
    Tensor dy = test::random_tensor({N, cfg.d_model}, DType::F32, 14);
    std::vector<LayerRun> runs;
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      MoeLayer layer = test::random_layer(cfg, DType::F32, 15);
      Arena arena;
      runs.push_back(run_layer(layer, x, dy, arena));
      runs.back().grads = MoeParams::zeros(cfg, DType::F32);  // a deep copy: the layer dies here
      test::copy_params(layer.grads(), runs.back().grads);
    }
    set_num_threads(0);
    EXPECT_TRUE(test::bit_equal(runs[0].y, runs[1].y)) << "E=" << experts;
    EXPECT_TRUE(test::bit_equal(runs[0].dx, runs[1].dx)) << "E=" << experts;
    EXPECT_EQ(runs[0].out.aux_loss, runs[1].out.aux_loss);
    EXPECT_EQ(runs[0].out.z_loss, runs[1].out.z_loss);
    std::vector<Tensor> g1;
    runs[1].grads.for_each([&](const std::string&, const Tensor& t) { g1.push_back(t); });
    size_t i = 0;
    runs[0].grads.for_each([&](const std::string& name, const Tensor& t) {
      EXPECT_TRUE(test::bit_equal(t, g1[i++])) << name << " E=" << experts;
    });
  }
}

TEST(MoeLayer, FineGrainedSegmentationKeepsComputeAndParameters) {
  MoeConfig c;
  c.d_model = 64;
  c.d_ffn = 1408;
  c.n_experts = 8;
  c.top_k = 2;
  c.n_shared = 2;
  MoeConfig f = fine_grained(c, 4);
  EXPECT_EQ(f.n_experts, 32);
  EXPECT_EQ(f.top_k, 8);
  EXPECT_EQ(f.d_ffn, 352);
  EXPECT_EQ(f.n_shared, 8);
  EXPECT_EQ(f.shared_width(), 352);
  EXPECT_EQ(f.top_k * f.d_ffn, c.top_k * c.d_ffn);  // active width per token
  const int64_t router_delta = (f.n_experts - c.n_experts) * c.d_model;
  EXPECT_EQ(MoeParams::zeros(f, DType::F32).numel() - router_delta,
            MoeParams::zeros(c, DType::F32).numel());
  EXPECT_THROW(fine_grained(c, 3), Error);  // 1408 is not divisible by 3
  EXPECT_THROW(fine_grained(c, 0), Error);
}

TEST(MoeLayer, SteadyStateMakesNoArenaAllocation) {
  MoeConfig cfg = test::base_config();
  cfg.n_shared = 1;
  MoeLayer layer = test::random_layer(cfg, DType::F32, 16);
  Tensor x = test::random_tensor({64, cfg.d_model}, DType::F32, 17);
  Tensor dy = test::random_tensor({64, cfg.d_model}, DType::F32, 18);
  Tensor dx = Tensor::empty(x.shape(), DType::F32);
  Arena arena;
  int64_t allocs = 0;
  for (int step = 0; step < 4; ++step) {
    arena.reset();
    if (step == 2) allocs = arena.heap_allocations();
    layer.forward(x, arena);
    layer.backward(dy, dx, arena);
  }
  EXPECT_EQ(arena.heap_allocations(), allocs);
}

TEST(MoeLayer, BackwardNeedsAForward) {
  MoeLayer layer(test::base_config());
  Tensor dy = Tensor::zeros({3, 6}, DType::F32), dx = Tensor::zeros({3, 6}, DType::F32);
  Arena arena;
  EXPECT_THROW(layer.backward(dy, dx, arena), Error);
}

}  // namespace moe
