// tests/torch/test_torch_oracle.cpp: the MoE layer against PyTorch, in float64 and float32.
//
// moe_oracle.py computes every case's output, losses and gradients with PyTorch autograd in
// float64, written from the math alone (docs/routing.md, every routing method); here our layer
// runs on the same config, weights, inputs, training mode, random draws (replayed through
// set_noise) and DeepSeek selection bias, and every tensor is compared, with the routing counts,
// the exact zeros of frozen weights and DeepSeek's bias after a step. The case file comes in the
// environment variable MOE_TORCH_CASES (ctest sets it, after the torch_oracle_generate test has
// written the file).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/arena.h"
#include "moe/moe_config.h"
#include "moe/moe_layer.h"
#include "moe/tensor.h"

namespace moe {
namespace {

using nlohmann::json;

// A tensor passes when max_i |ours_i - ref_i| <= tol * scale.
// float64: tol = kTolF64 and scale = 1 + max|ref|: both sides compute the same float64 math, so
// only summation order differs.
// float32: the table below, scale = max|ref| (1 when ref is all zero). The inputs are rounded to
// float32 and every step runs in float32; the router gradient, which sums the output, softmax and
// both loss paths, loses the most. The bounds sit 4.3x to 7x above the worst errors measured
// over all cases (router.weight 6.0e-7, y 4.2e-7, weight gradients 4.3e-7, dx 3.7e-7, z_loss
// 1.1e-7, aux_loss 1.2e-7 from noisy top-k's CV^2 losses), the same with 1 to 8 threads. The
// routing decisions themselves agree exactly: the generator keeps every one (and every random
// draw against its threshold) at least 1e-4 (relative) away from its boundary.
constexpr double kTolF64 = 1e-10;

struct Tolerance {
  const char* tensor;
  double f32;
};
constexpr Tolerance kTolF32[] = {
    {"y", 2e-6},
    {"aux_loss", 5e-7},
    {"z_loss", 5e-7},
    {"dx", 2e-6},
    {"router.weight", 3e-6},
    {"experts.w_gate", 2e-6},
    {"experts.w_up", 2e-6},
    {"experts.w_down", 2e-6},
    {"experts.b_gate", 2e-6},
    {"experts.b_up", 2e-6},
    {"experts.b_down", 2e-6},
    {"shared.w_gate", 2e-6},
    {"shared.w_up", 2e-6},
    {"shared.w_down", 2e-6},
    {"shared.b_gate", 2e-6},
    {"shared.b_up", 2e-6},
    {"shared.b_down", 2e-6},
    {"shared.gate", 2e-6},
};

constexpr size_t kMinCases = 40;

double tolerance(const std::string& tensor, DType dtype) {
  if (dtype == DType::F64) return kTolF64;
  for (const Tolerance& t : kTolF32)
    if (tensor == t.tensor) return t.f32;
  throw std::runtime_error("no float32 tolerance for tensor " + tensor);
}

const json& cases_file() {
  static const json file = [] {
    const char* path = std::getenv("MOE_TORCH_CASES");
    if (path == nullptr || *path == '\0')
      throw std::runtime_error(
          "MOE_TORCH_CASES is not set: run through ctest (ctest -R torch), or set it to the JSON "
          "that tests/torch/moe_oracle.py writes");
    std::ifstream in(path);
    if (!in) throw std::runtime_error(std::string("cannot open ") + path);
    return json::parse(in);
  }();
  return file;
}

struct Ref {
  Shape shape;
  std::vector<double> data;
};

Ref ref_of(const json& t) {
  Ref r{t.at("shape").get<Shape>(), t.at("data").get<std::vector<double>>()};
  if (static_cast<int64_t>(r.data.size()) != shape_numel(r.shape))
    throw std::runtime_error("case file: tensor data does not match its shape");
  return r;
}

Tensor tensor_of(const json& t, DType dtype) {
  Ref r = ref_of(t);
  Tensor out = Tensor::empty(r.shape, DType::F64);
  std::copy(r.data.begin(), r.data.end(), out.data<double>());
  return dtype == DType::F64 ? out : out.to(dtype);
}

// The worst error of each tensor over all cases, as a fraction of its tolerance, for the report
// printed at the end of each precision's test.
struct Worst {
  double err_over_scale = 0;
  std::string where;
};
using Report = std::map<std::string, Worst>;

void compare(const std::string& tensor, const Tensor& ours, const Ref& ref, DType dtype,
             const std::string& case_name, Report& report) {
  if (ours.shape() != ref.shape) {
    ADD_FAILURE() << tensor << ": shape " << shape_str(ours.shape()) << ", torch has "
                  << shape_str(ref.shape);
    return;
  }
  double max_ref = 0;
  for (double v : ref.data) max_ref = std::max(max_ref, std::abs(v));
  const double scale = dtype == DType::F64 ? 1 + max_ref : (max_ref > 0 ? max_ref : 1);
  double max_err = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < ours.numel(); ++i) {
    const double err = std::abs(ours.at(i) - ref.data[i]);
    if (!(err <= max_err)) {  // NaN is the worst error of all
      max_err = err;
      at = i;
      if (std::isnan(err)) break;
    }
  }
  const double tol = tolerance(tensor, dtype);
  Worst& w = report[tensor];
  if (!(max_err / scale <= w.err_over_scale)) w = {max_err / scale, case_name};
  EXPECT_LE(max_err, tol * scale) << tensor << "[" << at << "]: ours " << ours.at(at) << ", torch "
                                  << ref.data[at] << " (|err| " << max_err << ", allowed " << tol
                                  << " * " << scale << ")";
}

void compare_scalar(const std::string& tensor, double ours, double ref, DType dtype,
                    const std::string& case_name, Report& report) {
  Tensor t = Tensor::empty({1}, DType::F64);
  t.data<double>()[0] = ours;
  compare(tensor, t, Ref{{1}, {ref}}, dtype, case_name, report);
}

std::set<std::string> keys(const json& object) {
  std::set<std::string> out;
  for (const auto& [k, v] : object.items()) out.insert(k);
  return out;
}

// Every slice e of an expert gradient [E, ...] of a frozen expert must be exactly zero, and
// with a frozen router the whole router gradient.
void expect_frozen_zero(MoeLayer& layer, const MoeConfig& cfg) {
  layer.grads().for_each([&](const std::string& n, Tensor& g) {
    const bool router = n == "router.weight";
    if (router && !cfg.freeze_router) return;
    if (!router && n.rfind("experts.", 0) != 0) return;
    const int64_t E = cfg.n_experts, per = router ? g.numel() : g.numel() / E;
    const std::vector<int64_t> all = {-1};
    for (int64_t e : router ? all : cfg.frozen_experts) {
      const int64_t begin = router ? 0 : e * per;
      int64_t nonzero = 0;
      for (int64_t i = begin; i < begin + per; ++i) nonzero += g.at(i) != 0.0;
      EXPECT_EQ(nonzero, 0) << n << (router ? "" : " of frozen expert " + std::to_string(e))
                            << ": gradient entries that are not exactly zero";
    }
  });
}

void run_case(const json& c, DType dtype, Report& report) {
  const std::string name = c.at("name").get<std::string>();
  const MoeConfig cfg = c.at("config").get<MoeConfig>();
  const std::string router = c.at("config").value("router", std::string("topk"));

  if (c.contains("fine_grained")) {
    // the generator segments the config itself; ours must agree
    const json& fg = c.at("fine_grained");
    const json ours = fine_grained(fg.at("base").get<MoeConfig>(), fg.at("m").get<int64_t>());
    EXPECT_EQ(ours, json(cfg)) << "fine_grained(base, m) differs from the torch config";
  }

  MoeLayer layer(cfg, dtype);
  std::set<std::string> layer_params, layer_grads;
  layer.params().for_each([&](const std::string& n, Tensor&) { layer_params.insert(n); });
  layer.grads().for_each([&](const std::string& n, Tensor&) { layer_grads.insert(n); });
  // every parameter is compared, and torch knows no parameter we lack
  ASSERT_EQ(layer_params, keys(c.at("params"))) << "parameter names, ours vs torch";
  ASSERT_EQ(layer_grads, keys(c.at("grads"))) << "gradient names, ours vs torch";

  layer.params().for_each([&](const std::string& n, Tensor& t) {
    Tensor src = tensor_of(c.at("params").at(n), dtype);
    ASSERT_EQ(t.shape(), src.shape()) << n << ": ours " << t.str() << ", torch " << src.str();
    ASSERT_EQ(t.dtype(), src.dtype()) << n;
    std::memcpy(t.raw(), src.raw(), t.nbytes());
  });
  const Tensor x = tensor_of(c.at("x"), dtype);
  const Tensor dy = tensor_of(c.at("dy"), dtype);
  const int64_t N = x.size(0), E = cfg.n_experts;

  // The random draws torch used (jitter, noise, sampling, exploration), replayed in order, and
  // DeepSeek's selection bias.
  layer.set_training(c.at("training").get<bool>());
  const auto normal = c.at("noise").at("normal").get<std::vector<double>>();
  const auto uniform = c.at("noise").at("uniform").get<std::vector<double>>();
  layer.set_noise(&normal, &uniform);
  std::vector<double>* bias = layer.router().selection_bias();
  ASSERT_EQ(bias != nullptr, c.contains("selection_bias")) << "a selection bias, ours vs torch";
  if (bias != nullptr) {
    ASSERT_EQ(static_cast<int64_t>(bias->size()), E);
    *bias = c.at("selection_bias").get<std::vector<double>>();
  }

  // An earlier micro-batch of the same step, whose choices global_balance counts too.
  Arena earlier_arena;
  if (c.contains("earlier_x") && !c.at("earlier_x").is_null())
    layer.forward(tensor_of(c.at("earlier_x"), dtype), earlier_arena);
  Arena arena;
  MoeOutput out = layer.forward(x, arena);
  compare("y", out.y, ref_of(c.at("y")), dtype, name, report);
  compare_scalar("aux_loss", out.aux_loss, c.at("aux_loss").get<double>(), dtype, name, report);
  compare_scalar("z_loss", out.z_loss, c.at("z_loss").get<double>(), dtype, name, report);

  // Routing: torch's (token, expert) pairs before and after capacity, counted per expert.
  EXPECT_EQ(out.stats.routed, c.at("routed").get<std::vector<int64_t>>())
      << "pairs routed per expert";
  EXPECT_EQ(out.stats.kept, c.at("kept").get<std::vector<int64_t>>()) << "pairs kept per expert";
  EXPECT_EQ(out.stats.capacity, c.at("capacity").get<int64_t>());
  EXPECT_EQ(out.stats.n_tokens, N);
  if (router == "expert_choice") {
    // every expert takes exactly its C tokens
    const int64_t C = c.at("tokens_per_expert").get<int64_t>();
    EXPECT_EQ(out.stats.routed, std::vector<int64_t>(E, C)) << "expert choice: C tokens each";
  }

  layer.zero_grad();
  Tensor dx = Tensor::empty(x.shape(), dtype);
  layer.backward(dy, dx, arena, c.at("d_aux").get<double>(), c.at("d_z").get<double>());
  compare("dx", dx, ref_of(c.at("dx")), dtype, name, report);
  layer.grads().for_each([&](const std::string& n, Tensor& g) {
    compare(n, g, ref_of(c.at("grads").at(n)), dtype, name, report);
  });
  expect_frozen_zero(layer, cfg);

  if (bias != nullptr) {
    // DeepSeek-V3's auxiliary-loss-free update from this forward's routed counts
    layer.after_step();
    const auto want = c.at("selection_bias_after_step").get<std::vector<double>>();
    ASSERT_EQ(bias->size(), want.size());
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR((*bias)[i], want[i], 1e-15) << "selection bias after the step, expert " << i;
  }
}

void run_all(DType dtype) {
  const json& file = cases_file();
  const json& cases = file.at("cases");
  ASSERT_GE(cases.size(), kMinCases) << "the oracle must cover at least " << kMinCases << " cases";
  Report report;
  std::set<std::string> names;
  for (const json& c : cases) {
    const std::string name = c.at("name").get<std::string>();
    EXPECT_TRUE(names.insert(name).second) << "duplicate case " << name;
    SCOPED_TRACE("case " + name + ", " + dtype_name(dtype));
    try {
      run_case(c, dtype, report);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw: " << e.what();
    }
  }
  std::printf("%s, %zu cases: worst |ours - torch| / scale per tensor\n", dtype_name(dtype),
              cases.size());
  for (const auto& [tensor, w] : report)
    std::printf("  %-16s %9.2e  (tolerance %7.1e, case %s)\n", tensor.c_str(), w.err_over_scale,
                tolerance(tensor, dtype), w.where.c_str());
}

TEST(TorchOracle, Float64) { run_all(DType::F64); }

TEST(TorchOracle, Float32) { run_all(DType::F32); }

}  // namespace
}  // namespace moe
