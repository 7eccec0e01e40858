// Finite-difference checks in double precision: the backward of the MoE layer (optimized and
// reference) against central differences of its forward, for every option, every input
// coordinate and every parameter. The objective is L = <y, R> + d_aux * aux + d_z * z.
//
// Routing is piecewise constant: a coordinate whose perturbation changes any expert selection
// or capacity decision is skipped (and counted, so a test where everything is skipped fails).
#include <gtest/gtest.h>

#include <functional>

#include "moe/moe_ref.h"
#include "moe_test_util.h"

namespace moe {

namespace {

constexpr double kStep = 1e-6;
constexpr double kTol = 1e-6;  // |analytic - numeric| <= kTol * max(1, |analytic|)
constexpr double kDAux = 0.8, kDZ = 1.7;

struct Objective {
  const MoeConfig& cfg;
  MoeParams& params;
  Tensor& x;
  const Tensor& r;
  bool use_reference;
  const test::Noise& noise;
  MoeLayer& layer;  // owns `params`; evaluated in place
  Arena arena;

  // L at the current parameters, and the routing it took.
  double eval(std::vector<int32_t>* idx, std::vector<uint8_t>* kept) {
    ref::RefOutput ro = ref::moe_forward(cfg, params, x, noise.options());
    if (idx) *idx = ro.expert;
    if (kept) *kept = ro.kept;
    double aux = ro.aux_loss, z = ro.z_loss;
    Tensor y = ro.y;
    if (!use_reference) {
      arena.reset();
      MoeOutput out = layer.forward(x, arena);
      y = out.y;
      aux = out.aux_loss;
      z = out.z_loss;
    }
    double l = kDAux * aux + kDZ * z;
    for (int64_t i = 0; i < y.numel(); ++i) l += y.at(i) * r.at(i);
    return l;
  }
};

void check_gradients(const MoeConfig& cfg, bool use_reference, uint64_t seed) {
  const int64_t N = 10;
  MoeLayer layer = test::random_layer(cfg, DType::F64, seed);
  Tensor x = test::random_tensor({N, cfg.d_model}, DType::F64, seed + 1);
  Tensor r = test::random_tensor({N, cfg.d_model}, DType::F64, seed + 2);
  MoeParams& params = layer.params();
  const test::Noise noise(seed + 3);

  // Analytic gradients.
  Tensor dx = Tensor::empty(x.shape(), DType::F64);
  MoeParams grads = MoeParams::zeros(cfg, DType::F64);
  if (use_reference) {
    ref::moe_backward(cfg, params, x, r, kDAux, kDZ, dx, grads, noise.options());
  } else {
    Arena arena;
    noise.apply(layer);
    layer.zero_grad();
    layer.forward(x, arena);
    layer.backward(r, dx, arena, kDAux, kDZ);
    test::copy_params(layer.grads(), grads);
  }

  Objective obj{cfg, params, x, r, use_reference, noise, layer, Arena()};
  std::vector<int32_t> idx0, idx;
  std::vector<uint8_t> kept0, kept;
  obj.eval(&idx0, &kept0);
  int64_t checked = 0, skipped = 0;
  // Frozen parameters (fine-tuning switches) must get exactly zero gradient instead.
  auto frozen = [&](const std::string& name, int64_t i, const Tensor& t) {
    if (name == "router.weight") return cfg.freeze_router;
    if (name.rfind("experts.", 0) != 0) return false;
    const int64_t e = i / (t.numel() / cfg.n_experts);
    for (int64_t f : cfg.frozen_experts)
      if (f == e) return true;
    return false;
  };
  auto check = [&](const std::string& name, Tensor& value, const Tensor& grad) {
    double* v = value.data<double>();
    for (int64_t i = 0; i < value.numel(); ++i) {
      if (frozen(name, i, value)) {
        ASSERT_EQ(grad.at(i), 0.0) << name << "[" << i << "] is frozen";
        continue;
      }
      const double saved = v[i];
      v[i] = saved + kStep;
      const double lp = obj.eval(&idx, &kept);
      const bool same_p = idx == idx0 && kept == kept0;
      v[i] = saved - kStep;
      const double lm = obj.eval(&idx, &kept);
      const bool same_m = idx == idx0 && kept == kept0;
      v[i] = saved;
      if (!same_p || !same_m) {
        ++skipped;
        continue;
      }
      ++checked;
      const double numeric = (lp - lm) / (2 * kStep);
      const double analytic = grad.at(i);
      ASSERT_NEAR(analytic, numeric, kTol * std::max(1.0, std::abs(analytic)))
          << name << "[" << i << "]";
    }
  };
  check("x", x, dx);
  std::vector<std::pair<std::string, Tensor>> gl;
  grads.for_each([&](const std::string& n, const Tensor& t) { gl.emplace_back(n, t); });
  size_t k = 0;
  params.for_each([&](const std::string& name, Tensor& t) {
    ASSERT_EQ(gl[k].first, name);
    check(name, t, gl[k++].second);
  });
  EXPECT_GT(checked, 20 * (skipped + 1)) << "too many coordinates change the routing";
}

}  // namespace

class FiniteDifferences : public ::testing::TestWithParam<test::NamedConfig> {};

TEST_P(FiniteDifferences, OptimizedLayer) { check_gradients(GetParam().cfg, false, 31); }
TEST_P(FiniteDifferences, ReferenceLayer) { check_gradients(GetParam().cfg, true, 41); }

INSTANTIATE_TEST_SUITE_P(AllOptions, FiniteDifferences, ::testing::ValuesIn(test::option_matrix()),
                         [](const auto& p) { return p.param.name; });

}  // namespace moe
