// Training: the schedule, checkpoints that round-trip, a stop and resume that continues bit for
// bit, and the guard against non-finite values.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "moe/kernels.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"
#include "moe_test_util.h"

namespace moe {

namespace {

ModelConfig toy_model() {
  ModelConfig m = model_preset("tiny");
  m.d_model = 32;
  m.moe.d_model = 32;
  m.moe.d_ffn = 32;
  m.d_ffn = 64;
  m.max_seq_len = 32;
  m.moe.router = RouterKind::noisy_topk;  // exercises the routing noise streams too
  m.moe.n_experts = 4;
  return m;
}

TrainConfig toy_train(int64_t steps) {
  TrainConfig t;
  t.batch = 4;
  t.seq_len = 16;
  t.steps = steps;
  t.warmup = 2;
  t.eval_batches = 2;
  t.keep = 3;
  return t;
}

}  // namespace

TEST(Trainer, WarmupThenCosine) {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr = 0.1;
  t.warmup = 10;
  t.steps = 110;
  EXPECT_DOUBLE_EQ(t.lr_at(0), 0.1);
  EXPECT_DOUBLE_EQ(t.lr_at(9), 1.0);
  EXPECT_DOUBLE_EQ(t.lr_at(10), 1.0);
  EXPECT_NEAR(t.lr_at(60), 0.55, 1e-12);
  EXPECT_NEAR(t.lr_at(110), 0.1, 1e-12);
}

TEST(Trainer, StopAndResumeIsBitIdentical) {
  const Corpus corpus = test::toy_corpus();
  const std::string dir = test::temp_dir("resume");
  // One run of 8 steps straight through.
  std::vector<double> straight;
  {
    Trainer t(toy_model(), toy_train(8), corpus);
    for (int i = 0; i < 8; ++i) straight.push_back(t.train_step().loss);
  }
  // The same run stopped after 5 steps, saved, and resumed in a fresh trainer.
  std::vector<double> resumed;
  {
    Trainer t(toy_model(), toy_train(8), corpus);
    for (int i = 0; i < 5; ++i) resumed.push_back(t.train_step().loss);
    t.save(dir);
  }
  {
    Trainer t(toy_model(), toy_train(8), corpus);
    t.resume(dir);
    EXPECT_EQ(t.step(), 5);
    for (int i = 0; i < 3; ++i) resumed.push_back(t.train_step().loss);
  }
  ASSERT_EQ(straight.size(), resumed.size());
  for (size_t i = 0; i < straight.size(); ++i) EXPECT_EQ(straight[i], resumed[i]) << "step " << i;
  std::filesystem::remove_all(dir);
}

TEST(Trainer, CheckpointRoundTripsAndKeepsTheNewest) {
  const Corpus corpus = test::toy_corpus();
  const std::string dir = test::temp_dir("ckpt");
  TrainConfig cfg = toy_train(5);
  cfg.keep = 2;
  Trainer t(toy_model(), cfg, corpus);
  for (int i = 0; i < 5; ++i) {
    t.train_step();
    t.save(dir);
  }
  // Only the two newest remain, and latest names the last.
  EXPECT_FALSE(std::filesystem::exists(dir + "/step-000003"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/step-000004"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/step-000005/model.safetensors"));
  const SafetensorsFile f = load_safetensors(dir + "/step-000005/model.safetensors");
  for (NamedParam& p : t.model().params()) {
    const Tensor& s = f.at(p.name);
    ASSERT_EQ(s.shape(), p.value.shape()) << p.name;
    EXPECT_EQ(std::memcmp(s.raw(), p.value.raw(), s.nbytes()), 0) << p.name;
  }
  // Nothing temporary is left behind.
  for (const auto& e : std::filesystem::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  std::filesystem::remove_all(dir);
}

// A model with MTP modules (the second's block MoE, with DeepSeek's selection bias): its
// checkpoint loads back with the modules (float32 and as stored), resumes bit for bit, and a
// model trained without modules starts one with them (fresh) or drops them.
TEST(Trainer, MtpModulesSaveLoadAndResume) {
  const Corpus corpus = test::toy_corpus();
  const std::string dir = test::temp_dir("mtp");
  ModelConfig mc = toy_model();
  mc.moe.router = RouterKind::deepseek;
  mc.moe.bias_update_rate = 0.01;
  mc.mtp_depth = 2;
  std::vector<double> straight;
  {
    Trainer t(mc, toy_train(6), corpus);
    for (int i = 0; i < 6; ++i) straight.push_back(t.train_step().loss);
  }
  Trainer t(mc, toy_train(6), corpus);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(t.train_step().loss, straight[static_cast<size_t>(i)]);
  EXPECT_GT(t.train_step().loss, 0);
  t.save(dir);
  Tensor tok = Tensor::empty({2, 12}, DType::I32);
  for (int64_t i = 0; i < tok.numel(); ++i) tok.data<int32_t>()[i] = static_cast<int32_t>(i * 7);
  t.model().set_training(false);
  Arena arena;
  const ModelOutput want = t.model().forward(tok, arena);
  ASSERT_EQ(want.mtp_ce.size(), 2u);
  for (const WeightsAs as : {WeightsAs::float32, WeightsAs::stored}) {
    const std::unique_ptr<Model> m = load_model(dir, as);
    EXPECT_EQ(m->config().mtp_depth, 2);
    m->set_training(false);
    const ModelOutput got = m->forward(tok, arena);
    EXPECT_EQ(got.mtp_ce, want.mtp_ce);
    EXPECT_EQ(got.loss, want.loss);
  }
  {
    Trainer r(mc, toy_train(6), corpus);
    r.resume(dir);
    EXPECT_EQ(r.train_step().loss, straight[5]);
  }
  // Without modules, then with them again: the shared tensors carry over.
  ModelConfig plain = mc;
  plain.mtp_depth = 0;
  Trainer p(plain, toy_train(1), corpus);
  p.init_from(t.model());
  Trainer q(mc, toy_train(1), corpus);
  q.init_from(p.model());
  for (NamedParam& a : q.model().params())
    for (NamedParam& b : p.model().params())
      if (a.name == b.name) {
        EXPECT_EQ(std::memcmp(a.value.raw(), b.value.raw(), a.value.nbytes()), 0) << a.name;
      }
  std::filesystem::remove_all(dir);
}

TEST(Trainer, NonFiniteValuesStopTheStepAndSayWhere) {
  const Corpus corpus = test::toy_corpus();
  Trainer t(toy_model(), toy_train(5), corpus);
  t.train_step();
  // Poison one weight: the loss becomes NaN and the step says so; the weights stay untouched.
  NamedParam& p = t.model().params()[3];
  p.value.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  try {
    t.train_step();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("step 2"), std::string::npos) << m;
    EXPECT_TRUE(m.find("not finite") != std::string::npos ||
                m.find("non-finite") != std::string::npos)
        << m;
  }
  EXPECT_EQ(t.step(), 1);
  // The poisoned weight is named as the cause.
  try {
    t.train_step();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cause: the weight " + p.name + " holds nan at index 0"),
              std::string::npos)
        << e.what();
  }
  // A NaN that reaches only a gradient is named by its tensor.
  Trainer t2(toy_model(), toy_train(5), corpus);
  NamedParam& head = t2.model().params().back();  // lm_head: its NaN poisons only the logits
  head.value.data<float>()[0] = std::numeric_limits<float>::infinity();
  try {
    t2.train_step();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 1"), std::string::npos) << e.what();
  }
}

// A fault injected into a gradient (after the backward, before the update) stops that step with
// the tensor, the index and the step named, and updates nothing; the next step goes on.
TEST(Trainer, InjectedGradientFaultsAreNamedAndUpdateNothing) {
  const Corpus corpus = test::toy_corpus();
  Trainer t(toy_model(), toy_train(10), corpus);
  t.train_step();
  t.train_step();
  std::vector<std::vector<float>> before;
  for (NamedParam& p : t.model().params())
    before.emplace_back(p.value.data<float>(), p.value.data<float>() + p.value.numel());
  const std::string target = t.model().params()[5].name;
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    t.set_gradient_hook([&](Model& m, int64_t step) {
      if (step == 3) m.params()[5].grad.data<float>()[7] = bad;
    });
    try {
      t.train_step();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      const std::string want = fmt::format(
          "step 3: the gradient of {} holds {} at index 7; no "
          "weight was updated",
          target, bad);
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    EXPECT_EQ(t.step(), 2);
    for (size_t i = 0; i < before.size(); ++i)
      ASSERT_EQ(std::memcmp(before[i].data(), t.model().params()[i].value.data<float>(),
                            before[i].size() * sizeof(float)),
                0)
          << t.model().params()[i].name << " changed";
  }
  t.set_gradient_hook({});
  EXPECT_EQ(t.train_step().step, 3);
}

TEST(Trainer, BadConfigsAreClearErrors) {
  TrainConfig t = toy_train(5);
  t.seq_len = 64;  // longer than the model's max_seq_len of 32
  try {
    Trainer tr(toy_model(), t, test::toy_corpus());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("seq_len 64 exceeds the model's max_seq_len 32"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(model_preset("huge"), Error);
  nlohmann::json j = {{"stepz", 3}};
  EXPECT_THROW((void)j.get<TrainConfig>(), Error);
}

}  // namespace moe

namespace moe {

// A fixed token batch (moe train --tokens): every step trains on all of it, and the model
// overfits it.
// --router-warmup: the first steps route every token to every expert (perfectly even load),
// the following ones sparsely; a run stopped inside the warm-up resumes bit for bit; a router
// that cannot route densely is refused when the trainer is made.
TEST(Trainer, RouterWarmupRoutesDenselyThenSparsely) {
  const Corpus corpus = test::toy_corpus();
  ModelConfig m = toy_model();
  m.moe.router = RouterKind::topk;
  TrainConfig cfg = toy_train(5);
  cfg.router_warmup = 2;
  const std::string dir = test::temp_dir("warmup");
  std::vector<double> straight, resumed;
  {
    Trainer t(m, cfg, corpus);
    for (int i = 0; i < 5; ++i) {
      const StepLog log = t.train_step();
      straight.push_back(log.loss);
      if (i < 2) {
        EXPECT_EQ(log.load_imbalance, 1.0) << "step " << log.step;
      } else {
        EXPECT_GT(log.load_imbalance, 1.0) << "step " << log.step;
      }
    }
  }
  {
    Trainer t(m, cfg, corpus);
    resumed.push_back(t.train_step().loss);
    t.save(dir);
  }
  {
    Trainer t(m, cfg, corpus);
    t.resume(dir);
    for (int i = 0; i < 4; ++i) resumed.push_back(t.train_step().loss);
  }
  EXPECT_EQ(straight, resumed);
  std::filesystem::remove_all(dir);
  m.moe.router = RouterKind::noisy_topk;
  EXPECT_THROW(Trainer(m, cfg, corpus), Error);
}

TEST(Trainer, FixedTokenBatchOverfits) {
  TrainConfig t;
  t.steps = 40;
  t.warmup = 0;
  t.lr = 1e-2;
  t.min_lr = 1e-2;
  const std::vector<std::vector<int32_t>> batch = {{256, 72, 101, 108, 108, 111, 33, 257},
                                                   {256, 87, 111, 114, 108, 100, 46, 257}};
  Trainer trainer(model_preset("tiny"), t, batch);
  EXPECT_EQ(trainer.config().batch, 2);
  EXPECT_EQ(trainer.config().seq_len, 7);
  const double first = trainer.evaluate();
  for (int i = 0; i < 40; ++i) trainer.train_step();
  EXPECT_LT(trainer.evaluate(), 0.25 * first);
  EXPECT_THROW(Trainer(model_preset("tiny"), t, {{1, 2, 3}, {4, 5}}), Error);
  EXPECT_THROW(Trainer(model_preset("tiny"), t, {{1, 2, 999}}), Error);
}

}  // namespace moe

namespace moe {

// Mixed precision (--dtype bf16): the products see bf16 operands, so the losses differ from
// float32 by bf16's rounding and no more (the first step's loss to 1e-2 relative, and both runs
// learn alike), the run is bit for bit the same on 1 and 2 threads, the eval stays float32, the
// checkpoint keeps the float32 master weights and the setting, and a bad dtype is refused.
TEST(Trainer, Bf16OperandsTrainLikeFloat32) {
  const Corpus corpus = test::toy_corpus();
  // Wide enough that the products go to bf16 (a dimension of 32 or less stays float32), and every
  // operand kept for a step is checked against its contents when a product reads it.
  ModelConfig wide = toy_model();
  wide.d_model = wide.moe.d_model = wide.moe.d_ffn = 64;
  wide.d_ffn = 128;
  cpu::Bf16Store::set_verify(true);
  const auto run = [&](const std::string& dtype, int threads) {
    TrainConfig t = toy_train(12);
    t.dtype = dtype;
    t.batch = 8;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    Trainer tr(wide, t, corpus);
    std::vector<double> losses;
    for (int i = 0; i < 12; ++i) losses.push_back(tr.train_step().loss);
    losses.push_back(tr.evaluate());
    omp_set_num_threads(saved);
    return losses;
  };
  const std::vector<double> f32 = run("f32", 2), bf16 = run("bf16", 2), bf16_one = run("bf16", 1);
  EXPECT_EQ(bf16, bf16_one);  // the same bits whatever the thread count
  EXPECT_NE(f32, bf16);       // the operands were rounded
  EXPECT_NEAR(bf16[0], f32[0], 1e-2 * f32[0]);
  EXPECT_LT(bf16[11], 0.8 * bf16[0]);  // it learns
  EXPECT_NEAR(bf16[12], f32[12], 0.05 * f32[12]);
  EXPECT_FALSE(cpu::Bf16Operands::active());  // only inside the step
  cpu::Bf16Store::set_verify(false);

  TrainConfig t = toy_train(2);
  t.dtype = "bf16";
  const nlohmann::json j = t;
  EXPECT_EQ(j.get<TrainConfig>().dtype, "bf16");
  t.dtype = "fp8";
  try {
    Trainer tr(toy_model(), t, corpus);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dtype must be f32, bf16 or auto, got 'fp8'"),
              std::string::npos)
        << e.what();
  }
  t.dtype = "auto";
  EXPECT_EQ(t.matmul_dtype(), cpu::bf16_native() ? "bf16" : "f32");
}

}  // namespace moe
