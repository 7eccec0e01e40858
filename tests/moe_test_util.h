// Shared helpers for the MoE layer tests: the option matrix, random layers, tensor comparison.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <ostream>
#include <string>
#include <vector>

#include "moe/data.h"
#include "moe/moe_layer.h"
#include "moe/moe_ref.h"

namespace moe::test {

struct NamedConfig {
  std::string name;
  MoeConfig cfg;
};
inline void PrintTo(const NamedConfig& c, std::ostream* os) {
  *os << c.name << " (" << c.cfg.summary() << ")";
}

// A small two-language text corpus for training tests: 200 documents of repeated words.
inline Corpus toy_corpus() {
  Corpus c;
  c.languages = {"en", "de"};
  for (int i = 0; i < 200; ++i) {
    std::string text;
    for (int w = 0; w < 12; ++w) text += (i % 2 ? "der die das " : "the cat sat ");
    c.docs.push_back({text + std::to_string(i), i % 2});
  }
  return c;
}

// A fresh (removed) path under the temporary folder.
inline std::string temp_dir(const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() / ("moe_test_" + name);
  std::filesystem::remove_all(p);
  return p.string();
}

inline MoeConfig base_config() {
  MoeConfig c;
  c.d_model = 6;
  c.d_ffn = 5;
  c.n_experts = 4;
  c.top_k = 2;
  c.aux_loss_coef = 0.1;  // larger than the defaults, so the losses weigh in the gradients
  c.z_loss_coef = 0.05;
  return c;
}

// Every expert, router, shared-expert, capacity and balancing option of the layer.
inline std::vector<NamedConfig> option_matrix() {
  std::vector<NamedConfig> v;
  auto add = [&](const std::string& name, auto&& edit) {
    MoeConfig c = base_config();
    edit(c);
    v.push_back({name, c});
  };
  add("swiglu_top2_renorm", [](MoeConfig&) {});
  add("relu_top1_switch", [](MoeConfig& c) {
    c.act = ExpertAct::relu;
    c.top_k = 1;
    c.renormalize = false;
  });
  add("swiglu_top1_renorm", [](MoeConfig& c) { c.top_k = 1; });
  add("gelu_top2_norenorm_bias", [](MoeConfig& c) {
    c.act = ExpertAct::gelu;
    c.renormalize = false;
    c.expert_bias = true;
  });
  add("swiglu_bias", [](MoeConfig& c) { c.expert_bias = true; });
  add("relu_bias", [](MoeConfig& c) {
    c.act = ExpertAct::relu;
    c.expert_bias = true;
  });
  add("k_equals_e", [](MoeConfig& c) { c.top_k = c.n_experts; });
  add("one_expert", [](MoeConfig& c) {
    c.n_experts = 1;
    c.top_k = 1;
  });
  // gpt-oss: router and expert biases, the clamped SwiGLU at its own limit (no value reaches it
  // here) and at one most values pass (both sides of both clamps).
  add("gpt_oss", [](MoeConfig& c) {
    c.act = ExpertAct::swiglu_oai;
    c.expert_bias = true;
    c.router_bias = true;
  });
  add("gpt_oss_clamped", [](MoeConfig& c) {
    c.act = ExpertAct::swiglu_oai;
    c.swiglu_limit = 0.02;
    c.expert_bias = true;
    c.router_bias = true;
    c.n_shared = 1;
  });
  add("shared1", [](MoeConfig& c) { c.n_shared = 1; });
  add("shared2_gated", [](MoeConfig& c) {
    c.n_shared = 2;
    c.d_shared_ffn = 3;
    c.shared_gate = true;
    c.expert_bias = true;
  });
  add("capacity_position", [](MoeConfig& c) { c.capacity_factor = 0.5; });
  add("capacity_score", [](MoeConfig& c) {
    c.capacity_factor = 0.5;
    c.drop_policy = DropPolicy::score;
  });
  add("capacity_score_norenorm_gelu", [](MoeConfig& c) {
    c.capacity_factor = 0.75;
    c.drop_policy = DropPolicy::score;
    c.renormalize = false;
    c.act = ExpertAct::gelu;
  });
  add("fine_grained_m2", [](MoeConfig& c) {
    c.d_ffn = 6;
    c.n_shared = 1;
    c = fine_grained(c, 2);
  });
  add("jitter", [](MoeConfig& c) { c.jitter_eps = 0.1; });
  add("explore", [](MoeConfig& c) {
    c.n_experts = 6;
    c.explore_prob = 0.4;
  });
  add("switch_jitter_capacity", [](MoeConfig& c) {
    c.top_k = 1;
    c.renormalize = false;
    c.jitter_eps = 0.05;
    c.capacity_factor = 1.0;
  });
  add("device_balance", [](MoeConfig& c) {  // DeepSeek-V2's device-level loss
    c.n_experts = 6;
    c.n_devices = 3;
    c.device_aux_loss_coef = 0.2;
  });
  add("frozen_router", [](MoeConfig& c) { c.freeze_router = true; });
  add("frozen_experts", [](MoeConfig& c) {
    c.frozen_experts = {0, 2};
    c.expert_bias = true;
  });
  add("switch_router", [](MoeConfig& c) {
    c.router = RouterKind::switch_top1;
    c.top_k = 1;
    c.renormalize = false;
    c.jitter_eps = 0.1;
  });
  add("noisy_topk", [](MoeConfig& c) {
    c.router = RouterKind::noisy_topk;
    c.n_experts = 5;
  });
  add("gshard", [](MoeConfig& c) {
    c.router = RouterKind::gshard;
    c.capacity_factor = 1.0;
    c.capacity_group = 5;
    c.drop_policy = DropPolicy::slot;
  });
  add("expert_choice", [](MoeConfig& c) {
    c.router = RouterKind::expert_choice;
    c.capacity_factor = 1.5;
  });
  add("soft", [](MoeConfig& c) { c.router = RouterKind::soft; });
  add("hierarchical_dense", [](MoeConfig& c) {
    c.router = RouterKind::hierarchical;
    c.n_experts = 6;
    c.hme_groups = 2;
  });
  add("hierarchical_sparse", [](MoeConfig& c) {
    c.router = RouterKind::hierarchical;
    c.n_experts = 8;
    c.hme_groups = 2;
    c.hme_group_k = 1;
    c.hme_expert_k = 2;
  });
  add("hierarchical_sparse_norenorm", [](MoeConfig& c) {
    c.router = RouterKind::hierarchical;
    c.n_experts = 6;
    c.hme_groups = 3;
    c.hme_group_k = 2;
    c.hme_expert_k = 1;
    c.renormalize = false;
  });
  add("deepseek_groups", [](MoeConfig& c) {
    c.router = RouterKind::deepseek;
    c.n_experts = 8;
    c.n_group = 4;
    c.topk_group = 2;
    c.routed_scaling_factor = 2.5;
    c.seq_len = 4;
  });
  add("deepseek_plain", [](MoeConfig& c) {
    c.router = RouterKind::deepseek;
    c.renormalize = false;
    c.n_shared = 1;
  });
  add("no_losses", [](MoeConfig& c) {
    c.aux_loss_coef = 0;
    c.z_loss_coef = 0;
  });
  return v;
}

// Fixed routing noise, replayed identically by the layer and the reference (training mode).
struct Noise {
  std::vector<double> normal, uniform;
  explicit Noise(uint64_t seed, size_t n = 20000) {
    Rng rng(seed);
    for (size_t i = 0; i < n; ++i) normal.push_back(rng.normal());
    for (size_t i = 0; i < n; ++i) uniform.push_back(rng.uniform());
  }
  void apply(MoeLayer& layer) const {
    layer.set_training(true);
    layer.set_noise(&normal, &uniform);
  }
  ref::RefOptions options() const { return {true, &normal, &uniform}; }
};

// A layer with random weights (std 0.5, so routing margins are wide) in the given dtype.
inline MoeLayer random_layer(const MoeConfig& cfg, DType dtype, uint64_t seed) {
  MoeLayer layer(cfg, dtype);
  Rng rng(seed);
  layer.params().for_each([&](const std::string&, Tensor& t) { rng.fill_normal(t, 0, 0.5); });
  return layer;
}

inline Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double std = 1.0) {
  Tensor t = Tensor::empty(shape, dtype);
  Rng rng(seed);
  rng.fill_normal(t, 0, std);
  return t;
}

// Copies every parameter of `from` into `to` (converting dtype).
inline void copy_params(const MoeParams& from, MoeParams& to) {
  std::vector<Tensor> src;
  from.for_each([&](const std::string&, const Tensor& t) { src.push_back(t); });
  size_t i = 0;
  to.for_each([&](const std::string&, Tensor& t) {
    Tensor c = src[i++].to(t.dtype());
    std::memcpy(t.raw(), c.raw(), t.nbytes());
  });
}

inline double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.at(i)));
  return m;
}

// Max |a - b| <= atol + rtol * max|b|, reporting the worst element.
inline void expect_close(const Tensor& a, const Tensor& b, double rtol, double atol,
                         const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  double worst = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = std::abs(a.at(i) - b.at(i));
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  const double bound = atol + rtol * max_abs(b);
  EXPECT_LE(worst, bound) << what << ": worst at " << at << ": " << a.at(at) << " vs " << b.at(at);
}

inline bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

}  // namespace moe::test
