// Sparse upcycling (moe/upcycle.h): the MoE model it makes holds the dense model's FFN in every
// expert and its other parameters unchanged, routers drawn afresh, and computes what the dense
// model computes while its combine weights sum to 1; what it refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "moe/rng.h"
#include "moe/trainer.h"
#include "moe/upcycle.h"

namespace moe {
namespace {

Model dense_model(uint64_t seed) {
  Model m(model_preset("small-dense"));
  Rng rng(seed);
  m.init(rng);
  return m;
}

Tensor random_tokens(const ModelConfig& c, int64_t b, int64_t t, uint64_t seed) {
  Tensor ids = Tensor::empty({b, t}, DType::I32);
  Rng rng(seed);
  for (int64_t i = 0; i < b * t; ++i)
    ids.data<int32_t>()[i] = static_cast<int32_t>(rng.randint(0, c.vocab_size));
  return ids;
}

// max |a - b| / max |b|
double rel_diff(const Tensor& a, const Tensor& b) {
  double d = 0, m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    d = std::max(d, std::fabs(double(a.data<float>()[i]) - b.data<float>()[i]));
    m = std::max(m, std::fabs(double(b.data<float>()[i])));
  }
  return d / m;
}

TEST(Upcycle, EveryExpertIsTheDenseFfnAndEverythingElseIsKept) {
  Model dense = dense_model(5);
  UpcycleOptions o;
  o.experts = 4;
  o.top_k = 2;
  Model up = upcycle(dense, o);
  const ModelConfig& c = up.config();
  ASSERT_EQ(c.moe.n_experts, 4);
  ASSERT_EQ(c.moe.d_ffn, dense.config().d_ffn);
  for (int64_t i = 0; i < c.n_layers; ++i) ASSERT_EQ(c.is_moe_layer(i), i % 2 == 1) << i;
  std::map<std::string, const Tensor*> d;
  for (NamedParam& p : dense.params()) d[p.name] = &p.value;
  int64_t experts = 0, routers = 0, kept = 0;
  for (NamedParam& p : up.params()) {
    const float* v = p.value.data<float>();
    const size_t at = p.name.find(".moe.experts.w_");
    if (at != std::string::npos) {
      const Tensor& f = *d.at(p.name.substr(0, at) + ".ffn." + p.name.substr(at + 13));
      for (int64_t e = 0; e < 4; ++e)
        ASSERT_EQ(std::memcmp(v + e * f.numel(), f.data<float>(), size_t(f.numel()) * 4), 0)
            << p.name << " expert " << e;
      ++experts;
    } else if (p.name.find(".moe.router.") != std::string::npos) {
      // N(0, init_std^2): mean and spread of its values.
      double s = 0, s2 = 0;
      for (int64_t i = 0; i < p.value.numel(); ++i) {
        s += v[i];
        s2 += double(v[i]) * v[i];
      }
      const double n = double(p.value.numel()), mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
      EXPECT_LT(std::fabs(mean), 4 * c.init_std / std::sqrt(n)) << p.name;
      EXPECT_NEAR(sd, c.init_std, 0.1 * c.init_std) << p.name;
      ++routers;
    } else {
      const Tensor& f = *d.at(p.name);
      ASSERT_EQ(f.numel(), p.value.numel()) << p.name;
      ASSERT_EQ(std::memcmp(v, f.data<float>(), size_t(f.numel()) * 4), 0) << p.name;
      ++kept;
    }
  }
  EXPECT_EQ(experts, 2 * 3);  // two MoE layers, gate, up and down
  EXPECT_EQ(routers, 2);
  EXPECT_GT(kept, 0);
  // Another seed draws other routers and changes nothing else.
  o.seed = 2;
  Model other = upcycle(dense, o);
  bool differs = false;
  for (size_t i = 0; i < other.params().size(); ++i) {
    const NamedParam& a = up.params()[i];
    const NamedParam& b = other.params()[i];
    const bool same =
        std::memcmp(a.value.data<float>(), b.value.data<float>(), size_t(a.value.numel()) * 4) == 0;
    if (a.name.find(".moe.router.") != std::string::npos)
      differs |= !same;
    else
      ASSERT_TRUE(same) << a.name;
  }
  EXPECT_TRUE(differs);
}

// sum_k g_k FFN(x) = FFN(x) when the g_k sum to 1: the logits of the dense model, to float32's
// rounding, for every layer upcycled and every other, top-1 and top-2, and after saving and
// loading the checkpoint.
TEST(Upcycle, ComputesWhatTheDenseModelComputes) {
  Model dense = dense_model(7);
  const Tensor ids = random_tokens(dense.config(), 2, 24, 3);
  Arena arena;
  const Tensor want = dense.logits(ids, arena).clone();
  for (int64_t every : {1, 2}) {
    for (int64_t k : {1, 2}) {
      UpcycleOptions o;
      o.experts = 4;
      o.top_k = k;
      o.moe_every = every;
      Model up = upcycle(dense, o);
      Arena a2;
      const Tensor got = up.logits(ids, a2).clone();
      EXPECT_LT(rel_diff(got, want), 2e-6) << "every " << every << " top-" << k;
      if (every == 2 && k == 2) {
        const auto dir = std::filesystem::temp_directory_path() / "moe_upcycle_roundtrip";
        std::filesystem::remove_all(dir);
        save_model(up, dir.string());
        std::unique_ptr<Model> back = load_model(dir.string());
        Arena a3;
        const Tensor again = back->logits(ids, a3).clone();
        ASSERT_EQ(std::memcmp(again.data<float>(), got.data<float>(), size_t(got.numel()) * 4), 0);
        std::filesystem::remove_all(dir);
      }
    }
  }
  // The Switch router keeps its one expert's probability (no renormalization): no longer the
  // dense function, but the FFN scaled by p < 1.
  UpcycleOptions s;
  s.experts = 4;
  s.top_k = 1;
  s.router = RouterKind::switch_top1;
  Model sw = upcycle(dense, s);
  Arena a4;
  EXPECT_GT(rel_diff(sw.logits(ids, a4), want), 1e-4);
}

// Fine-grained experts: expert e holds the FFN's hidden units of run e % m (its down projection
// times m), so that with the m runs each chosen with weight 1 / m (routers at zero: uniform
// probabilities; m experts, top-m) the layer computes the dense FFN again, to float32's
// rounding of the runs' sum.
TEST(Upcycle, SegmentedExpertsSumToTheDenseFfn) {
  Model dense = dense_model(9);
  const ModelConfig& dc = dense.config();
  UpcycleOptions o;
  o.segments = 4;
  o.experts = 8;
  o.top_k = 4;
  o.moe_every = 1;
  Model up = upcycle(dense, o);
  const int64_t F = dc.d_ffn, f = F / 4, D = dc.d_model;
  ASSERT_EQ(up.config().moe.d_ffn, f);
  std::map<std::string, const Tensor*> d;
  for (NamedParam& p : dense.params()) d[p.name] = &p.value;
  for (NamedParam& p : up.params()) {
    const size_t at = p.name.find(".moe.experts.w_");
    if (at == std::string::npos) continue;
    const float* src = d.at(p.name.substr(0, at) + ".ffn." + p.name.substr(at + 13))->data<float>();
    const float* v = p.value.data<float>();
    const bool down = p.name.find("w_down") != std::string::npos;
    for (int64_t e = 0; e < 8; ++e)
      for (int64_t r = 0; r < (down ? D : f); ++r)
        for (int64_t c = 0; c < (down ? f : D); ++c) {
          const float want =
              down ? 4 * src[r * F + (e % 4) * f + c] : src[((e % 4) * f + r) * D + c];
          ASSERT_EQ(v[(e * (down ? D : f) + r) * (down ? f : D) + c], want) << p.name << " " << e;
        }
  }
  // Four experts, one per run, all chosen with weight 1/4: the dense logits.
  o.experts = 4;
  Model four = upcycle(dense, o);
  for (NamedParam& p : four.params())
    if (p.name.find(".moe.router.") != std::string::npos)
      std::fill(p.value.data<float>(), p.value.data<float>() + p.value.numel(), 0.0f);
  const Tensor ids = random_tokens(dc, 2, 16, 4);
  Arena a1, a2;
  const Tensor want = dense.logits(ids, a1).clone();
  EXPECT_LT(rel_diff(four.logits(ids, a2), want), 2e-6);
}

TEST(Upcycle, RefusesWhatItCannotDo) {
  Model dense = dense_model(1);
  const auto fails = [&](Model& m, const UpcycleOptions& o, const char* what) {
    try {
      upcycle(m, o);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  UpcycleOptions o;
  o.experts = 1;
  fails(dense, o, "--experts");
  o = {};
  o.top_k = 9;
  fails(dense, o, "--top-k");
  o = {};
  o.moe_every = 0;
  fails(dense, o, "--moe-every");
  o = {};
  o.segments = 3;
  fails(dense, o, "--segments");
  o = {};
  o.router = RouterKind::gshard;
  o.top_k = 1;
  fails(dense, o, "gshard needs top_k = 2");
  Model moe(model_preset("small"));
  Rng rng(1);
  moe.init(rng);
  fails(moe, UpcycleOptions{}, "already has MoE layers");
}

}  // namespace
}  // namespace moe
