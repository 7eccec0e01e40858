// The language model: finite differences of its loss in double precision for every parameter,
// overfitting one batch, the same bits for any thread count, and its errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "moe/model.h"
#include "moe/optimizer.h"
#include "moe/threading.h"
#include "moe/trainer.h"

namespace moe {

namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.d_ffn = 12;
  c.max_seq_len = 8;
  c.moe_every = 2;  // layer 1 is MoE, layer 0 dense
  c.moe.d_model = 8;
  c.moe.d_ffn = 6;
  c.moe.n_experts = 4;
  c.moe.top_k = 2;
  c.moe.aux_loss_coef = 0.1;
  c.moe.z_loss_coef = 0.05;
  return c;
}

Tensor tokens_for(const ModelConfig& c, int64_t b, int64_t t1, uint64_t seed) {
  Tensor tok = Tensor::empty({b, t1}, DType::I32);
  Rng rng(seed);
  for (int64_t i = 0; i < tok.numel(); ++i)
    tok.data<int32_t>()[i] = static_cast<int32_t>(rng.randint(0, c.vocab_size));
  return tok;
}

Model random_model(const ModelConfig& c, DType dtype, uint64_t seed, double std = 0.3) {
  Model m(c, dtype);
  Rng rng(seed);
  for (NamedParam& p : m.params()) {
    rng.fill_normal(p.value, 0, std);
    if (p.name.find("norm") != std::string::npos)
      for (int64_t i = 0; i < p.value.numel(); ++i)
        p.value.data<double>()[i] = 1 + 0.1 * rng.normal();
  }
  return m;
}

// soft: distillation's teacher logits [2, 5, V] mixed into the targets (SoftTargets).
void check_model_gradients(const ModelConfig& c, uint64_t seed, const SoftTargets* soft = nullptr) {
  Model m = random_model(c, DType::F64, seed);
  Tensor tok = tokens_for(c, 2, 6, seed + 1);
  Arena arena;
  m.zero_grad();
  const double loss = m.forward_backward(tok, arena, 1.0, soft).loss;
  ASSERT_TRUE(std::isfinite(loss));
  int64_t checked = 0;
  for (NamedParam& p : m.params()) {
    double* v = p.value.data<double>();
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      const double saved = v[i], h = 1e-6;
      v[i] = saved + h;
      arena.reset();
      const double lp = m.forward(tok, arena, soft).loss;
      v[i] = saved - h;
      arena.reset();
      const double lm = m.forward(tok, arena, soft).loss;
      v[i] = saved;
      const double numeric = (lp - lm) / (2 * h);
      const double analytic = p.grad.at(i);
      ASSERT_NEAR(analytic, numeric, 1e-6 * std::max(1.0, std::abs(analytic)))
          << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, m.n_params());
}

}  // namespace

TEST(Model, FiniteDifferencesDenseAndMoe) { check_model_gradients(tiny_config(), 1); }

TEST(Model, FiniteDifferencesTiedAllMoeGroupedHeads) {
  ModelConfig c = tiny_config();
  c.tie_embeddings = true;
  c.moe_every = 1;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;  // H * head_dim = 16 != D
  c.moe.n_shared = 1;
  c.moe.capacity_factor = 1.0;
  check_model_gradients(c, 2);
}

// Multi-token prediction: two modules, the first dense (block 2) and the second MoE (block 3),
// tied and untied heads; the loss adds mtp_weight times their mean cross-entropy.
TEST(Model, FiniteDifferencesWithMtp) {
  ModelConfig c = tiny_config();
  c.mtp_depth = 2;
  c.mtp_weight = 0.5;
  check_model_gradients(c, 4);
  c.tie_embeddings = true;
  c.mtp_depth = 1;
  check_model_gradients(c, 5);
}

TEST(Model, MtpLossParts) {
  ModelConfig c = tiny_config();
  c.mtp_depth = 2;
  c.mtp_weight = 0.25;
  Model m = random_model(c, DType::F64, 6);
  const Tensor tok = tokens_for(c, 2, 6, 7);
  Arena arena;
  const ModelOutput out = m.forward(tok, arena);
  ASSERT_EQ(out.mtp_ce.size(), 2u);
  EXPECT_GT(out.mtp_ce[0], 0);
  EXPECT_GT(out.mtp_ce[1], 0);
  EXPECT_DOUBLE_EQ(out.mtp_loss, (out.mtp_ce[0] + out.mtp_ce[1]) / 2);
  EXPECT_NEAR(out.loss, out.ce_loss + out.aux_loss + out.z_loss + 0.25 * out.mtp_loss, 1e-12);
  EXPECT_EQ(out.routing.size(), 2u);  // block 1 and module 2's block 3
  // The main model's loss is the same with or without the modules (they come after it, and take
  // no weights from its draw).
  ModelConfig c0 = c;
  c0.mtp_depth = 0;
  Model plain(c0, DType::F64);
  for (NamedParam& p : plain.params())
    for (NamedParam& q : m.params())
      if (p.name == q.name) std::memcpy(p.value.raw(), q.value.raw(), p.value.nbytes());
  const ModelOutput base = plain.forward(tok, arena);
  EXPECT_EQ(base.ce_loss, out.ce_loss);
  EXPECT_EQ(base.mtp_loss, 0);
  EXPECT_TRUE(base.mtp_ce.empty());
  // Sequences too short for the modules are refused, naming both.
  const Tensor short_tok = tokens_for(c, 2, 3, 8);
  try {
    m.forward(short_tok, arena);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("2 MTP modules"), std::string::npos) << e.what();
  }
  ModelConfig bad = c;
  bad.max_seq_len = 3;
  EXPECT_THROW(bad.validate(), Error);
}

// Distillation: the loss mixes the cross-entropy against the next tokens with the one against a
// teacher's distributions, and its gradient is checked as the plain loss's is.
TEST(Model, FiniteDifferencesWithSoftTargets) {
  const ModelConfig c = tiny_config();
  SoftTargets soft;
  soft.logits = Tensor::empty({2, 5, c.vocab_size}, DType::F64);
  Rng rng(7);
  rng.fill_normal(soft.logits, 0, 2.0);
  soft.weight = 0.3;
  check_model_gradients(c, 3, &soft);

  // The parts: weight 0 is the plain loss (and gradient), weight 1 the teacher's cross-entropy
  // alone, which is smallest where the student's distributions are the teacher's.
  Model m = random_model(c, DType::F64, 3);
  const Tensor tok = tokens_for(c, 2, 6, 4);
  Arena arena;
  const ModelOutput plain = m.forward(tok, arena);
  soft.weight = 0;
  const ModelOutput w0 = m.forward(tok, arena, &soft);
  EXPECT_EQ(w0.loss, plain.loss);
  EXPECT_EQ(w0.ce_loss, plain.ce_loss);
  EXPECT_GT(w0.soft_loss, 0);
  soft.weight = 1;
  const ModelOutput w1 = m.forward(tok, arena, &soft);
  EXPECT_NEAR(w1.loss, w1.soft_loss + w1.aux_loss + w1.z_loss, 1e-12);
  EXPECT_EQ(w1.ce_loss, plain.ce_loss);
  // A teacher that is the student itself: the soft term is then at its minimum (the entropy of
  // the student's distributions), so with weight 1 and no balancing terms every gradient is 0.
  ModelConfig c0 = c;
  c0.moe.aux_loss_coef = c0.moe.z_loss_coef = 0;
  Model self = random_model(c0, DType::F64, 3);
  Tensor inputs = Tensor::empty({2, 5}, DType::I32);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 5; ++t)
      inputs.data<int32_t>()[b * 5 + t] = tok.data<int32_t>()[b * 6 + t];
  SoftTargets same;
  same.logits = self.logits(inputs, arena).to(DType::F64);
  same.weight = 1;
  self.zero_grad();
  self.forward_backward(tok, arena, 1.0, &same);
  for (const NamedParam& p : self.params())
    for (int64_t i = 0; i < p.grad.numel(); ++i) ASSERT_NEAR(p.grad.at(i), 0, 1e-12) << p.name;
  // A bad shape or weight is refused.
  SoftTargets bad;
  bad.logits = Tensor::empty({2, 4, c.vocab_size}, DType::F64);
  EXPECT_THROW(m.forward(tok, arena, &bad), Error);
  soft.weight = 1.5;
  EXPECT_THROW(m.forward(tok, arena, &soft), Error);
}

TEST(Model, OverfitsOneBatch) {
  ModelConfig c = tiny_config();
  c.vocab_size = 16;
  c.d_model = 32;
  c.moe.d_model = 32;
  c.moe.d_ffn = 32;
  c.d_ffn = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.max_seq_len = 16;
  Model m(c, DType::F32);
  Rng rng(3);
  m.init(rng);
  AdamW opt(AdamWConfig{3e-3, 0.9, 0.95, 1e-8, 0.0});
  for (NamedParam& p : m.params()) opt.add(p.name, p.value, p.grad, p.decay);
  Tensor tok = tokens_for(c, 4, 17, 4);
  Arena arena;
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    arena.reset();
    m.zero_grad();
    const ModelOutput out = m.forward_backward(tok, arena);
    if (step == 0) first = out.ce_loss;
    last = out.ce_loss;
    opt.step();
  }
  EXPECT_GT(first, 2.0);
  EXPECT_LT(last, 0.05) << "cross-entropy after 300 steps on one batch";
}

TEST(Model, SameBitsWithOneAndTwoThreads) {
  ModelConfig c = tiny_config();
  c.d_model = 64;
  c.moe.d_model = 64;
  c.moe.n_experts = 16;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.max_seq_len = 32;
  c.moe_every = 1;
  Tensor tok = tokens_for(c, 4, 33, 5);
  std::vector<std::vector<float>> grads[2];
  double losses[2];
  for (int run = 0; run < 2; ++run) {
    set_num_threads(run + 1);
    Model m(c, DType::F32);
    Rng rng(6);
    m.init(rng);
    Arena arena;
    m.zero_grad();
    losses[run] = m.forward_backward(tok, arena).loss;
    for (NamedParam& p : m.params())
      grads[run].emplace_back(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  }
  set_num_threads(0);
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_TRUE(grads[0] == grads[1]);
}

TEST(Model, BadConfigAndTokens) {
  auto expect_error = [](const auto& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  ModelConfig c = tiny_config();
  c.n_kv_heads = 3;
  expect_error([&] { Model m(c); }, "n_kv_heads must be >= 1 and divide n_heads = 2, got 3");
  c = tiny_config();
  c.moe.d_model = 5;
  expect_error([&] { Model m(c); }, "moe.d_model = 5 must equal d_model = 8");
  c = tiny_config();
  c.vocab_size = 1;
  expect_error([&] { Model m(c); }, "vocab_size must be >= 2");
  Model m(tiny_config());
  Arena arena;
  Tensor tok = tokens_for(tiny_config(), 1, 4, 7);
  tok.data<int32_t>()[2] = 11;
  expect_error([&] { m.forward(tok, arena); },
               "token 11 at [0, 2] is outside the vocabulary [0, 11)");
  expect_error([&] { m.forward(tokens_for(tiny_config(), 1, 10, 7), arena); },
               "sequence length 9 exceeds max_seq_len = 8");
  expect_error(
      [&] {
        m.forward(Tensor::zeros({2, 4}, DType::F32), arena);
      },
      "tokens must be i32[B, T+1]");
}

}  // namespace moe

namespace moe {

TEST(Model, ParameterCountsMatchTheAllocatedModel) {
  for (const char* preset : {"tiny", "small", "small-dense", "medium"}) {
    SCOPED_TRACE(preset);
    ModelConfig c = model_preset(preset);
    EXPECT_EQ(count_params(c).total, Model(c).n_params());
  }
  ModelConfig c = tiny_config();
  c.tie_embeddings = true;
  c.first_dense = 1;
  c.moe_every = 1;
  c.n_layers = 3;
  c.moe.n_shared = 2;
  c.moe.d_shared_ffn = 5;
  c.moe.shared_gate = true;
  c.moe.expert_bias = true;
  c.moe.router = RouterKind::noisy_topk;
  const ParamCount n = count_params(c);
  EXPECT_EQ(n.total, Model(c).n_params());
  // Active: everything but (E - K) / E of the routed experts.
  EXPECT_EQ(n.total - n.active,
            n.routed_experts / c.moe.n_experts * (c.moe.n_experts - c.moe.top_k));
}

}  // namespace moe

namespace moe {

// moe params --preset NAME against the totals the systems' authors published (docs/model.md
// says how each is counted). Grok-1's "about 78B" active is 25% of 314B: our count adds the
// attention and the embedding (5.6B + 0.8B) to its two experts (77.3B). GPT-4's figures are
// rumors; its preset reproduces the total and comes within 8% of the rumored active count.
// Switch-Base, Switch-C and GShard count the encoder and decoder as one stack. GShard's "600B"
// is a round figure ("beyond 600 billion parameters"): the shape of its paper gives 619B, so
// that one is held to 3.5%.
TEST(Model, PublishedPresetsReproducePublishedCounts) {
  struct Case {
    const char* name;
    double total, active, active_tol, total_tol = 0.02;
  };
  const Case cases[] = {{"mixtral-8x7b", 46.7e9, 12.9e9, 0.02},
                        {"mixtral-8x22b", 141e9, 39e9, 0.02},
                        {"deepseek-v2", 236e9, 21e9, 0.02},
                        {"deepseek-v3", 671e9, 37e9, 0.02},
                        {"qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, 0.02},
                        {"dbrx", 132e9, 36e9, 0.02},
                        {"grok-1", 314e9, 78e9, 0.08},
                        {"mistral-large-3", 675e9, 41e9, 0.03},
                        {"gpt-4-rumored", 1.76e12, 220e9, 0.08},
                        // Switch and GShard: totals only (their papers give FLOPs per token,
                        // matched to T5-Base's 223M parameters for Switch-Base, not active
                        // counts).
                        {"switch-base", 7.4e9, 0, 0},
                        {"switch-c", 1571e9, 0, 0},
                        {"gshard-600b", 600e9, 0, 0, 0.035}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const ModelConfig cfg = model_preset(c.name);
    cfg.validate();
    const ParamCount n = count_params(cfg);
    EXPECT_NEAR(static_cast<double>(n.total) / c.total, 1.0, c.total_tol);
    if (c.active > 0) {
      EXPECT_NEAR(static_cast<double>(n.active) / c.active, 1.0, c.active_tol);
    }
  }
}

// The counts follow every architecture variant: the allocated model has exactly as many.
TEST(Model, ParameterCountsFollowEveryVariant) {
  auto base = [] {
    ModelConfig c = tiny_config();
    c.n_layers = 3;
    return c;
  };
  std::vector<ModelConfig> configs;
  ModelConfig c = base();
  c.qkv_bias = true;
  c.qk_norm = QkNorm::head;
  c.dense_layers = {1};
  configs.push_back(c);
  c = base();
  c.qk_norm = QkNorm::full;
  c.norm = NormKind::layer;
  c.clip_qkv = 4;
  configs.push_back(c);
  for (int64_t q_lora : {0, 12}) {
    c = base();
    c.q_lora_rank = q_lora;
    c.kv_lora_rank = 10;
    c.qk_nope_dim = 6;
    c.qk_rope_dim = 4;
    c.v_head_dim = 5;
    c.first_dense = 1;
    c.moe.n_shared = 1;
    c.moe.d_shared_ffn = 7;
    configs.push_back(c);
  }
  c = base();  // gpt-oss
  c.qkv_bias = true;
  c.attn_sinks = true;
  c.o_bias = true;
  c.moe.router_bias = true;
  c.moe.expert_bias = true;
  c.moe.act = ExpertAct::swiglu_oai;
  configs.push_back(c);
  for (const ModelConfig& cfg : configs) {
    const ParamCount n = count_params(cfg);
    EXPECT_EQ(n.total, Model(cfg).n_params());
    EXPECT_EQ(n.total - n.active,
              n.routed_experts / cfg.moe.n_experts * (cfg.moe.n_experts - cfg.moe.top_k));
  }
  // dense_layers = {1} makes all three layers dense.
  EXPECT_EQ(count_params(configs[0]).dense_ffn, 3 * 3 * configs[0].d_model * configs[0].d_ffn);
}

// Every architecture variant trains: finite differences of the whole model's loss in double
// precision, for each parameter.
TEST(Model, FiniteDifferencesQwenVariants) {
  ModelConfig c = tiny_config();
  c.n_layers = 3;
  c.moe_every = 1;
  c.dense_layers = {1};
  c.qkv_bias = true;
  c.qk_norm = QkNorm::head;  // Qwen3-MoE
  c.sliding_window = 3;
  c.rope_interleave = true;
  c.moe.renormalize = false;  // Qwen2-MoE: norm_topk_prob false, a gated shared expert
  c.moe.n_shared = 1;
  c.moe.d_shared_ffn = 5;
  c.moe.shared_gate = true;
  check_model_gradients(c, 5);
}

// Fine-tuning only the experts skips the other weight gradients: the experts' (and the norms')
// come out bit-identical to a full backward's, the embedding's, head's and attention's zero.
TEST(Model, ExpertsOnlySkipsTheOtherWeightGradients) {
  for (bool latent : {false, true}) {
    SCOPED_TRACE(latent);
    ModelConfig c = tiny_config();
    c.qkv_bias = !latent;
    if (latent) {
      c.n_kv_heads = c.n_heads;
      c.q_lora_rank = 6;
      c.kv_lora_rank = 10;
      c.qk_nope_dim = 6;
      c.qk_rope_dim = 4;
      c.v_head_dim = 5;
    }
    Model m = random_model(c, DType::F64, 11);
    const Tensor tok = tokens_for(c, 2, 6, 12);
    Arena arena;
    m.zero_grad();
    (void)m.forward_backward(tok, arena);
    std::vector<Tensor> full;
    for (NamedParam& p : m.params()) full.push_back(p.grad.clone());
    m.set_experts_only(true);
    m.zero_grad();
    arena.reset();
    (void)m.forward_backward(tok, arena);
    size_t i = 0, skipped = 0;
    for (NamedParam& p : m.params()) {
      const Tensor& want = full[i++];
      const bool other =
          p.name == "embed.weight" || p.name == "lm_head.weight" ||
          (p.name.find(".attn.") != std::string::npos && p.name.find("norm") == std::string::npos);
      if (other) {
        for (int64_t j = 0; j < p.grad.numel(); ++j) ASSERT_EQ(p.grad.at(j), 0.0) << p.name;
        ++skipped;
      } else {
        ASSERT_EQ(p.grad.numel(), want.numel());
        EXPECT_EQ(std::memcmp(p.grad.raw(), want.raw(), p.grad.nbytes()), 0) << p.name;
      }
    }
    EXPECT_GT(skipped, 4u);
    m.set_experts_only(false);
  }
}

TEST(Model, FiniteDifferencesOlmoeAndDbrxVariants) {
  ModelConfig c = tiny_config();
  c.qk_norm = QkNorm::full;  // OLMoE
  c.norm = NormKind::layer;  // DBRX
  c.clip_qkv = 0.6;          // clamps some of the projections' values
  check_model_gradients(c, 6);
}

// gpt-oss: attention sinks, a bias on the output projection, the sliding window on every other
// layer, q/k/v biases, a router bias, expert biases and the clamped SwiGLU (a limit low enough
// that some gate and up values are clamped, so both sides of each clamp are crossed).
TEST(Model, FiniteDifferencesGptOssVariants) {
  ModelConfig c = tiny_config();
  c.n_layers = 2;
  c.qkv_bias = true;
  c.attn_sinks = true;
  c.o_bias = true;
  c.sliding_window = 2;
  c.window_layers = {0};
  c.moe.router_bias = true;
  c.moe.expert_bias = true;
  c.moe.act = ExpertAct::swiglu_oai;
  c.moe.swiglu_limit = 0.05;
  check_model_gradients(c, 8);
  // The sinks take part: the loss moves with them.
  Model m = random_model(c, DType::F64, 3);
  const Tensor tok = tokens_for(c, 2, 6, 4);
  Arena arena;
  const double before = m.forward(tok, arena).loss;
  for (NamedParam& p : m.params())
    if (p.name.find("attn.sinks") != std::string::npos) p.value.data<double>()[0] += 1.0;
  arena.reset();
  EXPECT_GT(std::abs(m.forward(tok, arena).loss - before), 1e-6);
}

TEST(Model, FiniteDifferencesLatentAttention) {
  for (int64_t q_lora : {0, 12}) {
    SCOPED_TRACE(q_lora);
    ModelConfig c = tiny_config();
    c.n_heads = 2;
    c.n_kv_heads = 2;
    c.q_lora_rank = q_lora;
    c.kv_lora_rank = 10;
    c.qk_nope_dim = 6;
    c.qk_rope_dim = 4;
    c.v_head_dim = 5;
    c.rope_interleave = q_lora > 0;
    c.moe.n_shared = 1;
    c.moe.d_shared_ffn = 7;
    if (q_lora > 0) {  // DeepSeek-V3's routing
      c.moe.router = RouterKind::deepseek;
      c.moe.n_experts = 8;
      c.moe.n_group = 4;
      c.moe.topk_group = 2;
      c.moe.routed_scaling_factor = 2.5;
    }
    check_model_gradients(c, 7 + static_cast<uint64_t>(q_lora));
  }
}

}  // namespace moe
