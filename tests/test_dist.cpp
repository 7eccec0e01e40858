// Expert parallelism against one process: run by mpirun with 2 and 4 ranks (ctest), every rank
// computes the one-process answer for the whole batch itself and compares its share of the
// distributed answer with it. Also the collectives' own promises (the same bits on every rank).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moe/dist.h"
#include "moe/model.h"
#include "moe/threading.h"
#include "moe/trainer.h"
#include "moe_test_util.h"

namespace moe {

namespace {

const dist::Comm& world() {
  static const dist::Comm w = dist::Comm::world();
  return w;
}

void put(Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::F64) {
    t.data<double>()[i] = v;
  } else {
    t.data<float>()[i] = static_cast<float>(v);
  }
}

// Rows [r0, r0 + n) of a [N, D] tensor, copied.
Tensor rows(const Tensor& t, int64_t r0, int64_t n) {
  const int64_t D = t.size(1);
  Tensor out = Tensor::empty({n, D}, t.dtype());
  if (n > 0)
    std::memcpy(
        out.raw(),
        static_cast<const char*>(t.raw()) + static_cast<size_t>(r0 * D) * dtype_size(t.dtype()),
        out.nbytes());
  return out;
}

TEST(Collectives, SumIsTheRankOrderSumWithTheSameBitsEverywhere) {
  const int P = world().size(), r = world().rank();
  std::vector<float> v(37);
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = 0.1f * static_cast<float>(r + 1) + 1e-3f * static_cast<float>(i);
  std::vector<float> want(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    double s = 0;
    for (int q = 0; q < P; ++q)
      s += 0.1f * static_cast<float>(q + 1) + 1e-3f * static_cast<float>(i);
    want[i] = static_cast<float>(s);
  }
  world().sum(v.data(), static_cast<int64_t>(v.size()));
  EXPECT_EQ(std::memcmp(v.data(), want.data(), v.size() * sizeof(float)), 0);
  // Every rank holds the same bits: gather them and compare.
  std::vector<float> all(v.size() * static_cast<size_t>(P));
  world().allgather(v.data(), all.data(), static_cast<int64_t>(v.size() * sizeof(float)));
  for (int q = 0; q < P; ++q)
    EXPECT_EQ(std::memcmp(all.data() + q * v.size(), v.data(), v.size() * sizeof(float)), 0);
}

TEST(Collectives, AlltoallvDeliversEachRanksBlocks) {
  const int P = world().size(), r = world().rank();
  // Rank r sends q + r values (some zero) to rank q, each value 1000 r + q.
  std::vector<int64_t> sc(static_cast<size_t>(P)), rc(sc), send;
  for (int q = 0; q < P; ++q) {
    sc[static_cast<size_t>(q)] = (q + r) % 3;
    for (int i = 0; i < (q + r) % 3; ++i) send.push_back(1000 * r + q);
  }
  world().alltoall(sc.data(), rc.data(), 1);
  int64_t total = 0;
  for (int q = 0; q < P; ++q) {
    EXPECT_EQ(rc[static_cast<size_t>(q)], (q + r) % 3);
    total += rc[static_cast<size_t>(q)];
  }
  std::vector<int64_t> recv(static_cast<size_t>(total));
  world().alltoallv(send.data(), sc.data(), recv.data(), rc.data(), sizeof(int64_t));
  size_t at = 0;
  for (int q = 0; q < P; ++q)
    for (int i = 0; i < (q + r) % 3; ++i) EXPECT_EQ(recv[at++], 1000 * q + r);
}

struct EpCase {
  int ep;
  DType dtype;
  // A routing variant on top of the base config: "" (softmax top-k with the device-level loss),
  // or a router that draws noise per token or routes densely.
  std::string variant = "";
};

// The layer split over EP ranks (x DP replicas) gives, on each rank's tokens, the output, input
// gradient, losses and routing of one process running the whole batch, and the summed weight
// gradients equal the one-process ones. Rank 1 has no tokens at all, and expert 3 gets none.
void check_layer(const EpCase& c) {
  const int P = world().size(), r = world().rank();
  MoeConfig cfg = test::base_config();
  cfg.d_model = 8;
  cfg.d_ffn = 6;
  cfg.n_experts = 8;
  cfg.top_k = 2;
  cfg.device_aux_loss_coef = 0.05;  // DeepSeek-V2's device-level balance, over 4 groups
  cfg.n_devices = 4;
  if (c.variant == "noisy_topk") {
    cfg.router = RouterKind::noisy_topk;
    cfg.device_aux_loss_coef = 0;
  } else if (c.variant == "jitter_explore") {
    cfg.jitter_eps = 0.1;
    cfg.explore_prob = 0.3;
  } else if (c.variant == "gshard") {  // groups of one token: every rank's tokens split evenly
    cfg.router = RouterKind::gshard;
    cfg.capacity_group = 1;
    cfg.device_aux_loss_coef = 0;
  } else if (c.variant == "deepseek") {  // sequences of one token, so each rank's are whole
    cfg.router = RouterKind::deepseek;
    cfg.seq_len = 1;
    cfg.n_group = 2;
    cfg.topk_group = 1;
    cfg.device_aux_loss_coef = 0;
  } else if (c.variant == "hierarchical") {
    cfg.router = RouterKind::hierarchical;
    cfg.hme_groups = 2;
    cfg.hme_group_k = 1;
    cfg.hme_expert_k = 2;
    cfg.device_aux_loss_coef = 0;
  } else if (c.variant == "expert_choice") {
    cfg.router = RouterKind::expert_choice;
    cfg.capacity_factor = 1.5;
    cfg.device_aux_loss_coef = 0;
  } else if (c.variant == "soft") {
    cfg.router = RouterKind::soft;
    cfg.device_aux_loss_coef = 0;
  }
  const int64_t D = cfg.d_model, E = cfg.n_experts;
  // Tokens per rank: uneven, rank 1 none.
  std::vector<int64_t> n(static_cast<size_t>(P)), first(static_cast<size_t>(P) + 1, 0);
  for (int q = 0; q < P; ++q) n[static_cast<size_t>(q)] = q == 1 ? 0 : 5 + 3 * q;
  for (int q = 0; q < P; ++q)
    first[static_cast<size_t>(q) + 1] = first[static_cast<size_t>(q)] + n[static_cast<size_t>(q)];
  const int64_t Ng = first[static_cast<size_t>(P)];

  // Positive inputs, and expert 3's router row negative: expert 3 never scores above the others.
  MoeLayer full = test::random_layer(cfg, c.dtype, 11);
  Tensor x = test::random_tensor({Ng, D}, c.dtype, 12);
  for (int64_t i = 0; i < x.numel(); ++i) put(x, i, std::abs(x.at(i)));
  Tensor& wr = full.params().w_router;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t d = 0; d < D; ++d) put(wr, e * D + d, e == 3 ? -1.0 : std::abs(wr.at(e * D + d)));
  Tensor dy = test::random_tensor({Ng, D}, c.dtype, 13);

  Arena a1;
  full.zero_grad();
  MoeOutput ro = full.forward(x, a1);
  Tensor y_ref = ro.y.clone();
  Tensor dx_ref = Tensor::empty({Ng, D}, c.dtype);
  full.backward(dy, dx_ref, a1, 0.7, 1.3);
  if (c.variant.empty()) {
    ASSERT_EQ(ro.stats.routed[3], 0) << "the case needs an expert without tokens";
  }

  MoeLayer part = test::random_layer(cfg, c.dtype, 11);
  test::copy_params(full.params(), part.params());
  const dist::ExpertGroups groups = dist::make_expert_groups(world(), c.ep);
  part.set_expert_parallel(groups);
  EXPECT_EQ(part.local_experts(), E / c.ep);
  EXPECT_EQ(part.first_expert(), (r % c.ep) * (E / c.ep));
  const int64_t r0 = first[static_cast<size_t>(r)], nr = n[static_cast<size_t>(r)];
  Arena a2;
  part.zero_grad();
  MoeOutput po = part.forward(rows(x, r0, nr), a2);
  Tensor y = po.y.clone();
  Tensor dx = Tensor::empty({nr, D}, c.dtype);
  part.backward(rows(dy, r0, nr), dx, a2, 0.7, 1.3);

  const bool f64 = c.dtype == DType::F64;
  const double tol = f64 ? 1e-12 : 2e-6;
  EXPECT_EQ(po.stats.routed, ro.stats.routed);
  EXPECT_EQ(po.stats.n_tokens, Ng);
  EXPECT_NEAR(po.aux_loss, ro.aux_loss, tol * (1 + ro.aux_loss));
  EXPECT_NEAR(po.z_loss, ro.z_loss, tol * (1 + ro.z_loss));
  if (nr > 0) {
    test::expect_close(y, rows(y_ref, r0, nr), tol, 0, "y");
    test::expect_close(dx, rows(dx_ref, r0, nr), tol, 0, "dx");
  }
  // Weight gradients: the router's summed over every rank, the experts' over their replicas.
  Tensor gr = part.grads().w_router.clone();
  if (f64) {
    world().sum(gr.data<double>(), gr.numel());
  } else {
    world().sum(gr.data<float>(), gr.numel());
  }
  test::expect_close(gr, full.grads().w_router, f64 ? 1e-11 : 1e-5, 0, "router gradient");
  const int64_t El = E / c.ep, e0 = part.first_expert();
  auto compare_experts = [&](const Tensor& mine, const Tensor& all, const std::string& what) {
    Tensor g = mine.clone();
    if (f64) {
      groups.dp.sum(g.data<double>(), g.numel());
    } else {
      groups.dp.sum(g.data<float>(), g.numel());
    }
    const int64_t per = all.numel() / E;
    Tensor want = Tensor::empty(g.shape(), all.dtype());
    std::memcpy(want.raw(),
                static_cast<const char*>(all.raw()) +
                    static_cast<size_t>(e0 * per) * dtype_size(all.dtype()),
                want.nbytes());
    test::expect_close(g, want, f64 ? 1e-11 : 1e-5, 0, what);
  };
  EXPECT_EQ(part.grads().experts.w_up.size(0), El);
  compare_experts(part.grads().experts.w_gate, full.grads().experts.w_gate, "w_gate gradient");
  compare_experts(part.grads().experts.w_up, full.grads().experts.w_up, "w_up gradient");
  compare_experts(part.grads().experts.w_down, full.grads().experts.w_down, "w_down gradient");
}

TEST(ExpertParallel, LayerEqualsOneProcessF64) {
  for (int ep = 1; ep <= world().size(); ep *= 2) {
    SCOPED_TRACE(fmt::format("EP={} x DP={}", ep, world().size() / ep));
    check_layer({ep, DType::F64});
  }
}

TEST(ExpertParallel, LayerEqualsOneProcessF32) {
  for (int ep = 1; ep <= world().size(); ep *= 2) {
    SCOPED_TRACE(fmt::format("EP={} x DP={}", ep, world().size() / ep));
    check_layer({ep, DType::F32});
  }
}

// Routers that draw noise for every token (noisy top-k, jitter, exploration, GShard's second
// expert) draw one process's noise and keep their share of it; GShard's capacity groups and the
// soft router's statistics are summed over the ranks.
TEST(ExpertParallel, NoisyAndDenseRoutingEqualsOneProcess) {
  for (const char* variant : {"noisy_topk", "jitter_explore", "gshard", "deepseek", "hierarchical",
                              "expert_choice", "soft"})
    for (int ep = 1; ep <= world().size(); ep *= 2) {
      SCOPED_TRACE(fmt::format("{}, EP={} x DP={}", variant, ep, world().size() / ep));
      check_layer({ep, DType::F64, variant});
    }
}

// A model built split (each rank allocating its own experts only) holds, after init(), the
// values a whole model's init() gives those experts, and loads its experts alone from a whole
// checkpoint, in this engine's layout and in Mixtral's.
TEST(ExpertParallel, ModelBuiltSplitInitsAndLoadsItsOwnExperts) {
  ModelConfig c = model_preset("tiny");
  c.moe.n_experts = 8;
  for (const bool mixtral : {false, true}) {
    c.moe_every = mixtral ? 1 : 2;
    for (int ep = 2; ep <= world().size(); ep *= 2) {
      SCOPED_TRACE(fmt::format("{} layout, EP={}", mixtral ? "Mixtral" : "native", ep));
      const dist::ExpertGroups groups = dist::make_expert_groups(world(), ep);
      Model whole(c);
      Rng r1(42);
      whole.init(r1);
      Model split(c, DType::F32, groups);
      Rng r2(42);
      split.init(r2);
      EXPECT_EQ(r1.next_u64(), r2.next_u64()) << "the generators end in the same state";
      whole.set_expert_parallel(groups);
      ASSERT_EQ(split.params().size(), whole.params().size());
      for (size_t i = 0; i < split.params().size(); ++i) {
        const NamedParam &a = split.params()[i], &b = whole.params()[i];
        ASSERT_EQ(a.name, b.name);
        ASSERT_EQ(a.value.shape(), b.value.shape()) << a.name;
        if (a.routed) {
          EXPECT_EQ(a.value.size(0), c.moe.n_experts / ep) << a.name;
        }
        EXPECT_EQ(std::memcmp(a.value.raw(), b.value.raw(), a.value.nbytes()), 0) << a.name;
      }
      // A whole checkpoint (rank 0 writes it), loaded into a split model.
      const std::string dir = (std::filesystem::temp_directory_path() /
                               fmt::format("moe_test_ep_load_{}_{}", mixtral, ep))
                                  .string();
      Model writer(c);
      Rng r3(7);
      writer.init(r3);
      if (world().rank() == 0) {
        std::filesystem::remove_all(dir);
        save_model(writer, dir);
      }
      world().barrier();
      Model loaded(c, DType::F32, groups);
      load_checkpoint_weights(loaded, read_checkpoint_info(dir));
      writer.set_expert_parallel(groups);
      for (size_t i = 0; i < loaded.params().size(); ++i) {
        const NamedParam &a = loaded.params()[i], &b = writer.params()[i];
        EXPECT_EQ(std::memcmp(a.value.raw(), b.value.raw(), a.value.nbytes()), 0) << a.name;
      }
      world().barrier();
      if (world().rank() == 0) std::filesystem::remove_all(dir);
    }
  }
}

TEST(ExpertParallel, RefusesWhatItCannotSplit) {
  MoeConfig cfg = test::base_config();
  cfg.n_experts = 6;
  if (world().size() == 4) {
    MoeLayer layer(cfg, DType::F32);
    EXPECT_THROW(layer.set_expert_parallel(dist::make_expert_groups(world(), 4)), Error);
  }
  cfg.n_experts = 8;
  cfg.router = RouterKind::gshard;  // one capacity group: the whole batch, across the ranks
  MoeLayer layer(cfg, DType::F32);
  EXPECT_THROW(layer.set_expert_parallel(dist::make_expert_groups(world(), world().size())), Error);
}

}  // namespace

}  // namespace moe

int main(int argc, char** argv) {
  // Every rank runs every test; the ranks after the first report failures only.
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (rank && std::string(rank) != "0") setenv("GTEST_BRIEF", "1", 1);
  ::testing::InitGoogleTest(&argc, argv);
  moe::dist::init(&argc, &argv, 120);
  moe::set_num_threads(1);
  return RUN_ALL_TESTS();
}
