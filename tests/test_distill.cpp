// Distillation (Switch Transformer section 5): a student trained on a teacher's distributions
// moves toward them, a weight of 0 is plain training bit for bit, a run resumes bit for bit
// (the teacher loaded again from its checkpoint), and what cannot be distilled is refused.
#include <gtest/gtest.h>

#include <filesystem>

#include "moe/trainer.h"
#include "moe_test_util.h"

namespace moe {

namespace {

// The teacher: a small MoE; the student: a dense model of the same width, smaller.
ModelConfig teacher_config() {
  ModelConfig m = model_preset("tiny");
  m.d_model = m.moe.d_model = 32;
  m.moe.d_ffn = 32;
  m.moe.n_experts = 4;
  m.d_ffn = 64;
  m.max_seq_len = 32;
  return m;
}

ModelConfig student_config() {
  ModelConfig m = teacher_config();
  m.moe_every = 0;
  m.d_ffn = 48;
  return m;
}

TrainConfig train_config(int64_t steps) {
  TrainConfig t;
  t.batch = 4;
  t.seq_len = 16;
  t.steps = steps;
  t.warmup = 2;
  t.eval_batches = 2;
  t.lr = 1e-2;
  return t;
}

std::unique_ptr<Model> random_teacher(uint64_t seed, double std = 0.5) {
  auto m = std::make_unique<Model>(teacher_config());
  Rng rng(seed);
  m->init(rng);
  // A teacher with opinions: larger output weights give distributions far from uniform.
  for (NamedParam& p : m->params())
    if (p.name == "lm_head.weight") rng.fill_normal(p.value, 0, std);
  return m;
}

// The student's cross-entropy against the teacher's distributions on a batch of the corpus.
double soft_loss(Model& student, Model& teacher, const Tensor& batch) {
  Arena arena;
  const int64_t B = batch.size(0), T = batch.size(1) - 1;
  Tensor inputs = Tensor::empty({B, T}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      inputs.data<int32_t>()[b * T + t] = batch.data<int32_t>()[b * (T + 1) + t];
  SoftTargets soft;
  soft.logits = teacher.logits(inputs, arena);
  soft.weight = 1;
  return student.forward(batch, arena, &soft).soft_loss;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Distill, TheStudentMovesTowardTheTeachersDistributions) {
  const Corpus corpus = test::toy_corpus();
  const int64_t steps = 30;
  TrainConfig cfg = train_config(steps);
  cfg.soft_weight = 1;  // the teacher's distributions alone
  Trainer distilled(student_config(), cfg, corpus);
  distilled.set_teacher(random_teacher(5));
  Trainer plain(student_config(), cfg, corpus);  // the same student, on the tokens alone
  std::unique_ptr<Model> teacher = random_teacher(5);

  // A fixed held-out batch: eight sequences of the corpus's text as bytes.
  Tensor batch = Tensor::empty({8, 17}, DType::I32);
  const std::string text = corpus.docs[7].text + corpus.docs[8].text + corpus.docs[9].text;
  for (int64_t i = 0; i < batch.numel(); ++i)
    batch.data<int32_t>()[i] = static_cast<unsigned char>(text[static_cast<size_t>(i)]);

  const double before = soft_loss(distilled.model(), *teacher, batch);
  EXPECT_EQ(before, soft_loss(plain.model(), *teacher, batch));  // same initialization
  double first = 0, last = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const StepLog log = distilled.train_step();
    plain.train_step();
    EXPECT_EQ(log.loss, log.soft_loss + log.aux_loss + log.z_loss);
    (s == 0 ? first : last) = log.soft_loss;
  }
  EXPECT_LT(last, first - 0.5);
  const double after = soft_loss(distilled.model(), *teacher, batch);
  const double after_plain = soft_loss(plain.model(), *teacher, batch);
  std::printf(
      "soft loss: before %.4f, after %.4f (trained on the tokens: %.4f); step 1 %.4f, step %lld "
      "%.4f\n",
      before, after, after_plain, first, static_cast<long long>(steps), last);
  EXPECT_LT(after, before - 0.5);
  EXPECT_LT(after, after_plain - 0.5);
}

TEST(Distill, WeightZeroIsPlainTrainingBitForBit) {
  const Corpus corpus = test::toy_corpus();
  TrainConfig cfg = train_config(4);
  cfg.soft_weight = 0;
  Trainer distilled(student_config(), cfg, corpus);
  distilled.set_teacher(random_teacher(5));
  Trainer plain(student_config(), cfg, corpus);
  for (int s = 0; s < 4; ++s) {
    const StepLog a = distilled.train_step(), b = plain.train_step();
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
    EXPECT_EQ(a.grad_norm, b.grad_norm) << "step " << s;
    EXPECT_GT(a.soft_loss, 0);
  }
  EXPECT_EQ(distilled.evaluate(), plain.evaluate());
}

TEST(Distill, StopAndResumeIsBitIdentical) {
  const Corpus corpus = test::toy_corpus();
  const std::string teacher_dir = test::temp_dir("distill_teacher"),
                    dir = test::temp_dir("distill_resume");
  save_model(*random_teacher(9), teacher_dir);
  TrainConfig cfg = train_config(6);
  cfg.teacher = teacher_dir;
  std::vector<double> straight, resumed;
  {
    Trainer t(student_config(), cfg, corpus);
    ASSERT_NE(t.teacher(), nullptr);
    for (int i = 0; i < 6; ++i) straight.push_back(t.train_step().loss);
  }
  {
    Trainer t(student_config(), cfg, corpus);
    for (int i = 0; i < 3; ++i) resumed.push_back(t.train_step().loss);
    t.save(dir);
  }
  {
    Trainer t(student_config(), cfg, corpus);
    t.resume(dir);
    for (int i = 0; i < 3; ++i) resumed.push_back(t.train_step().loss);
  }
  EXPECT_EQ(straight, resumed);
  std::filesystem::remove_all(teacher_dir);
  std::filesystem::remove_all(dir);
}

TEST(Distill, RefusesWhatCannotBeDistilledNamingBoth) {
  const Corpus corpus = test::toy_corpus();
  const TrainConfig cfg = train_config(2);
  // A student larger than its teacher.
  ModelConfig big = teacher_config();
  big.moe.n_experts = 8;
  std::string m = message_of([&] {
    Trainer t(big, cfg, corpus);
    t.set_teacher(random_teacher(1), "the teacher T");
  });
  EXPECT_NE(m.find("the student (0."), std::string::npos) << m;
  EXPECT_NE(m.find("larger than the teacher T (0."), std::string::npos) << m;
  // Different vocabularies.
  ModelConfig other = student_config();
  other.vocab_size = 300;
  m = message_of([&] {
    Trainer t(other, cfg, corpus);
    t.set_teacher(random_teacher(1), "the teacher T");
  });
  EXPECT_NE(m.find("the teacher T has a vocabulary of 259 tokens and the student one of 300"),
            std::string::npos)
      << m;
  // Sequences longer than the teacher reads.
  TrainConfig longer = cfg;
  longer.seq_len = 40;
  ModelConfig wide = student_config();
  wide.max_seq_len = 64;
  m = message_of([&] {
    Trainer t(wide, longer, corpus);
    t.set_teacher(random_teacher(1), "the teacher T");
  });
  EXPECT_NE(m.find("the teacher T reads at most 32 positions, the student's sequences are 40"),
            std::string::npos)
      << m;
  // A weight outside [0, 1], and a teacher that is not there.
  TrainConfig bad = cfg;
  bad.soft_weight = 1.5;
  EXPECT_THROW(Trainer(student_config(), bad, corpus), Error);
  bad = cfg;
  bad.teacher = test::temp_dir("no_such_teacher");
  EXPECT_THROW(Trainer(student_config(), bad, corpus), Error);
}

}  // namespace moe
