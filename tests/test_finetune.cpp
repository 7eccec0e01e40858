// Fine-tuning transformers' own checkpoints (tests/fixtures/hf/*, with transformers' training
// loss, gradients and AdamW trajectory in reference.json and grads.safetensors): the first loss
// equals transformers' train_loss, every gradient matches transformers' under the checkpoint's
// own tensor names, and ten AdamW steps reproduce its losses.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "hf_test_util.h"
#include "moe/hf.h"
#include "moe/kernels.h"
#include "moe/trainer.h"

namespace moe {

namespace {

class HfFinetune : public ::testing::TestWithParam<const char*> {};

nlohmann::json reference(const std::string& dir) {
  std::ifstream f(dir + "/reference.json");
  return nlohmann::json::parse(f);
}

}  // namespace

TEST_P(HfFinetune, LossAndGradientsMatchTransformers) {
  const std::string dir = hf_fixture(GetParam());
  std::unique_ptr<Model> model = load_model(dir);
  const CheckpointInfo info = read_checkpoint_info(dir);
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const SafetensorsFile grads = load_safetensors(dir + "/grads.safetensors");
  const nlohmann::json r = reference(dir);
  const Tensor ids = as_i32(ref.at("input_ids"));
  Arena arena;
  model->zero_grad();
  const ModelOutput out = model->forward_backward(ids, arena);
  const double want = r.at("train_loss").get<double>();
  std::printf("%s: loss %.7f, transformers %.7f (relative error %.2g)\n", GetParam(), out.loss,
              want, std::abs(out.loss / want - 1));
  EXPECT_LT(std::abs(out.loss / want - 1), 1e-5);
  size_t compared = 0;
  double worst = 0;
  std::string worst_name;
  const MoeConfig& m = model->config().moe;
  for (const auto& [name, g] : hf_tensors(*model, info.model_type, false, true)) {
    ASSERT_TRUE(grads.has(name)) << name << " has no gradient in grads.safetensors";
    const Tensor& theirs = grads.at(name);
    double norm = 0;
    for (int64_t i = 0; i < theirs.numel(); ++i) norm = std::max(norm, std::abs(theirs.at(i)));
    if (norm == 0) {  // an expert no token reached
      for (int64_t i = 0; i < g.numel(); ++i) ASSERT_EQ(g.at(i), 0.0) << name << "[" << i << "]";
      ++compared;
      continue;
    }
    const double e = relative_error(g, theirs);
    // With one renormalized expert per token its weight is p / p = 1: the cross-entropy's
    // gradient into the router is 0, which transformers' float32 autograd leaves as rounding
    // noise (dw / p - dw p / p^2) on top of the balancing loss's small gradient, about 5e-4 of
    // it. Computed here, that term is exactly 0; the comparison allows for the noise.
    const bool noise =
        m.top_k == 1 && m.renormalize && name.find(".gate.weight") != std::string::npos;
    EXPECT_LT(e, noise ? 2e-3 : 1e-4) << name;
    if (e > worst) {
      worst = e;
      worst_name = name;
    }
    ++compared;
  }
  EXPECT_EQ(compared, grads.stored.size());
  std::printf("%s: %zu gradients, worst relative error %.2g (%s)\n", GetParam(), compared, worst,
              worst_name.c_str());
}

// bf16 operands on every product (the narrow ones too), the weights and saved activations kept
// as the trainer keeps them and checked against their contents whenever a product reads them: no
// architecture's backward reads a kept range that changed, the gradients are bit for bit those of
// rounding every operand again, and the loss stays within bf16's rounding of transformers'.
// (The gradients themselves are not compared with transformers': on these small random models
// bf16 rounding flips a few top-k choices, and a flipped expert's gradient is another one.)
TEST_P(HfFinetune, Bf16OperandsKeptExactlyAndNeverStale) {
  const std::string dir = hf_fixture(GetParam());
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const double want = reference(dir).at("train_loss").get<double>();
  cpu::Bf16Store store;
  cpu::Bf16Store::set_verify(true);
  cpu::Bf16Operands::set_narrow(0);
  const auto run = [&](bool keep, double& loss) {
    std::unique_ptr<Model> model = load_model(dir);
    Arena arena;
    model->zero_grad();
    const cpu::Bf16Operands on(true, keep ? &store : nullptr);
    if (keep) {
      for (const NamedParam& p : model->params())
        cpu::bf16_keep(p.value.data<float>(), p.value.numel());
    }
    const int64_t weights = store.kept_values();
    loss = model->forward_backward(as_i32(ref.at("input_ids")), arena).loss;
    if (keep) {
      EXPECT_GT(store.kept_values(), weights);  // the forward kept its activations too
    }
    std::vector<float> all;
    for (const NamedParam& p : model->params())
      all.insert(all.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    return all;
  };
  double kept_loss = 0, plain_loss = 0;
  const std::vector<float> kept = run(true, kept_loss), plain = run(false, plain_loss);
  cpu::Bf16Operands::set_narrow(32);
  cpu::Bf16Store::set_verify(false);
  ASSERT_EQ(kept.size(), plain.size());
  EXPECT_EQ(std::memcmp(kept.data(), plain.data(), kept.size() * sizeof(float)), 0);
  EXPECT_EQ(kept_loss, plain_loss);
  const double rel = std::abs(kept_loss / want - 1);
  std::printf("%s: bf16 operands, loss relative error %.2g\n", GetParam(), rel);
  EXPECT_LT(rel, 1e-2);
  EXPECT_GT(rel, 1e-7);  // the products did take bf16 operands
}

// Ten full-batch AdamW steps with reference.json's hyperparameters (torch.optim.AdamW over
// every tensor, constant rate, no clipping), as `moe train --init-from DIR --tokens ...
// --decay-all --schedule constant --grad-clip 0` runs them: the loss before each step matches
// transformers'.
TEST_P(HfFinetune, AdamwTrajectoryMatchesTransformers) {
  const std::string dir = hf_fixture(GetParam());
  std::unique_ptr<Model> start = load_model(dir);
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const nlohmann::json traj = reference(dir).at("adamw_trajectory");
  const nlohmann::json& hp = traj.at("hyperparameters");
  ASSERT_EQ(hp.at("schedule"), "constant");
  ASSERT_TRUE(hp.at("grad_clip").is_null());
  const Tensor ids = as_i32(ref.at("input_ids"));
  std::vector<std::vector<int32_t>> batch;
  for (int64_t b = 0; b < ids.size(0); ++b)
    batch.emplace_back(ids.data<int32_t>() + b * ids.size(1),
                       ids.data<int32_t>() + (b + 1) * ids.size(1));
  TrainConfig tc;
  tc.steps = 10;
  tc.lr = hp.at("lr").get<double>();
  tc.beta1 = hp.at("betas")[0].get<double>();
  tc.beta2 = hp.at("betas")[1].get<double>();
  tc.eps = hp.at("eps").get<double>();
  tc.weight_decay = hp.at("weight_decay").get<double>();
  tc.decay_all = true;
  tc.schedule = "constant";
  tc.clip = 0;
  tc.eval_every = 0;
  Trainer trainer(start->config(), tc, batch);
  trainer.init_from(*start);
  const std::vector<double> want = traj.at("losses_before_each_step").get<std::vector<double>>();
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double loss = trainer.train_step().loss;
    const double e = std::abs(loss / want[i] - 1);
    EXPECT_LT(e, 1e-4) << "step " << i + 1 << ": " << loss << " against " << want[i];
    worst = std::max(worst, e);
  }
  std::printf("%s: %zu AdamW steps, losses within %.2g of transformers'\n", GetParam(), want.size(),
              worst);
}

// DeepSeek-V3's multi-token prediction module in its released layout (model.layers.{L}: enorm,
// hnorm, eh_proj, a decoder layer, shared_head.norm, with copies of the embedding and output
// head): a fine-tuned model with one saves it there, and the checkpoint loads back with it, the
// same bits, float32 and as stored; without the tensors (transformers' own checkpoints) the
// model has no module.
TEST(HfSave, DeepSeekV3MtpModuleRoundTrips) {
  const std::string dir = hf_fixture("deepseek_v3");
  std::unique_ptr<Model> base = load_model(dir);
  EXPECT_EQ(base->config().mtp_depth, 0);  // num_nextn_predict_layers 1, no tensors
  ModelConfig cfg = base->config();
  cfg.mtp_depth = 1;
  Model with(cfg);
  Rng rng(5);
  with.init(rng);
  for (NamedParam& p : with.params())
    for (NamedParam& q : base->params())
      if (p.name == q.name) std::memcpy(p.value.raw(), q.value.raw(), p.value.nbytes());
  const std::string out = (std::filesystem::temp_directory_path() / "moe_test_hf_mtp").string();
  std::filesystem::remove_all(out);
  save_hf_model(with, hf_origin(dir), out);
  const SafetensorsFile f = load_safetensors(out + "/model.safetensors");
  const int64_t L = cfg.n_layers;
  for (const char* rest :
       {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
        "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
        "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"})
    EXPECT_TRUE(f.has(fmt::format("model.layers.{}.{}", L, rest))) << rest;
  Tensor tok = Tensor::empty({1, 9}, DType::I32);
  for (int64_t i = 0; i < 9; ++i) tok.data<int32_t>()[i] = static_cast<int32_t>(i * 11 + 3);
  Arena arena;
  with.set_training(false);
  const ModelOutput want = with.forward(tok, arena);
  ASSERT_EQ(want.mtp_ce.size(), 1u);
  for (const WeightsAs as : {WeightsAs::float32, WeightsAs::stored}) {
    std::unique_ptr<Model> back = load_model(out, as);
    ASSERT_EQ(back->config().mtp_depth, 1);
    const ModelOutput got = back->forward(tok, arena);
    EXPECT_EQ(got.mtp_ce, want.mtp_ce);
    EXPECT_EQ(got.ce_loss, want.ce_loss);
  }
  std::filesystem::remove_all(out);
}

// A checkpoint loaded and saved again is the same checkpoint: config.json byte for byte, every
// tensor under its name with its dtype, shape and bytes; and in transformers' fused expert
// layout it loads back to the same logits.
TEST(HfSave, WritesTheCheckpointsOwnLayout) {
  for (const char* name :
       {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx"}) {
    SCOPED_TRACE(name);
    const std::string dir = hf_fixture(name);
    std::unique_ptr<Model> model = load_model(dir);
    HfOrigin origin = hf_origin(dir);
    EXPECT_FALSE(origin.fused_experts);
    const std::string out = (std::filesystem::temp_directory_path() / "moe_test_hf_save").string();
    std::filesystem::remove_all(out);
    save_hf_model(*model, origin, out);
    std::ifstream a(dir + "/config.json", std::ios::binary),
        b(out + "/config.json", std::ios::binary);
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(a), {}),
              std::string(std::istreambuf_iterator<char>(b), {}));
    const SafetensorsFile src = load_safetensors(dir + "/model.safetensors");
    const SafetensorsFile got = load_safetensors(out + "/model.safetensors");
    ASSERT_EQ(got.stored.size(), src.stored.size());
    for (const auto& [tensor, stored] : src.stored) {
      ASSERT_TRUE(got.has(tensor)) << tensor;
      const StoredTensor& g = got.stored.at(tensor);
      EXPECT_EQ(g.dtype, stored.dtype) << tensor;
      EXPECT_EQ(g.shape, stored.shape) << tensor;
      ASSERT_EQ(g.bytes, stored.bytes) << tensor;
      EXPECT_EQ(std::memcmp(g.data, stored.data, stored.bytes), 0) << tensor;
    }
    if (origin.model_type == "dbrx") continue;
    // transformers' fused layout: gate_up_proj [E, 2F, D] and down_proj [E, D, F].
    origin.fused_experts = true;
    std::filesystem::remove_all(out);
    save_hf_model(*model, origin, out);
    EXPECT_TRUE(hf_origin(out).fused_experts);
    std::unique_ptr<Model> back = load_model(out);
    const Tensor ids = as_i32(load_safetensors(dir + "/reference.safetensors").at("input_ids"));
    Arena arena;
    const Tensor want = model->logits(ids, arena).clone();
    const Tensor have = back->logits(ids, arena);
    EXPECT_EQ(std::memcmp(want.raw(), have.raw(), want.nbytes()), 0);
  }
}

// The fine-tuning switches: a frozen router, frozen experts, or only the experts trained; frozen
// tensors (and frozen experts' rows) come out bit-identical, with weight decay on everything.
TEST(HfFinetuneSwitches, FrozenTensorsComeOutBitIdentical) {
  const std::string dir = hf_fixture("qwen2_moe");
  std::unique_ptr<Model> start = load_model(dir);
  const Tensor ids = as_i32(load_safetensors(dir + "/reference.safetensors").at("input_ids"));
  std::vector<std::vector<int32_t>> batch;
  for (int64_t b = 0; b < ids.size(0); ++b)
    batch.emplace_back(ids.data<int32_t>() + b * ids.size(1),
                       ids.data<int32_t>() + (b + 1) * ids.size(1));
  const auto same = [](const Tensor& a, const Tensor& b, int64_t row) {
    const size_t bytes = a.nbytes() / static_cast<size_t>(row < 0 ? 1 : a.size(0));
    const size_t at = row < 0 ? 0 : static_cast<size_t>(row) * bytes;
    return std::memcmp(static_cast<const char*>(a.raw()) + at,
                       static_cast<const char*>(b.raw()) + at, row < 0 ? a.nbytes() : bytes) == 0;
  };
  for (int mode = 0; mode < 2; ++mode) {
    SCOPED_TRACE(mode == 0 ? "frozen router and experts 0, 5" : "only the experts");
    ModelConfig mc = start->config();
    TrainConfig tc;
    tc.steps = 3;
    tc.lr = 1e-2;
    tc.decay_all = true;
    tc.schedule = "constant";
    tc.eval_every = 0;
    if (mode == 0) {
      mc.moe.freeze_router = true;
      mc.moe.frozen_experts = {0, 5};
    } else {
      tc.only_experts = true;
    }
    Trainer trainer(mc, tc, batch);
    trainer.init_from(*start);
    for (int i = 0; i < 3; ++i) trainer.train_step();
    std::vector<NamedParam>& before = start->params();
    std::vector<NamedParam>& after = trainer.model().params();
    int64_t kept = 0, changed = 0;
    for (size_t i = 0; i < after.size(); ++i) {
      const NamedParam& p = after[i];
      const bool router = p.name.find(".moe.router.") != std::string::npos;
      if (mode == 1 || router) {
        const bool frozen = mode == 1 ? !p.routed : true;
        EXPECT_EQ(same(p.value, before[i].value, -1), frozen) << p.name;
        (frozen ? kept : changed) += 1;
        continue;
      }
      if (p.routed) {
        for (int64_t e = 0; e < p.value.size(0); ++e) {
          const bool frozen = e == 0 || e == 5;
          const bool unchanged = same(p.value, before[i].value, e);
          if (frozen) {
            EXPECT_TRUE(unchanged) << p.name << " expert " << e;
            ++kept;
          } else if (!unchanged) {
            ++changed;
          }
        }
      } else {
        EXPECT_FALSE(same(p.value, before[i].value, -1)) << p.name;
      }
    }
    EXPECT_GT(kept, 0);
    EXPECT_GT(changed, 0);
  }
}

// Fine-tuning reads the text through the checkpoint's own tokenizer: a folder with
// tokenizer.json yields it, the training stream holds its ids (between <bos> and <eos> where it
// has them), a tokenizer with ids beyond the model's vocabulary is refused, and the sample is
// decoded through it.
TEST(HfFinetuneText, ReadsTheTextThroughTheCheckpointsTokenizer) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / "moe_finetune_tokenizer";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(hf_fixture("qwen3_moe") + "/" + f, dir / f);
  EXPECT_EQ(checkpoint_tokenizer(dir.string()), nullptr);  // bytes
  fs::copy_file(std::string(MOE_TEST_FIXTURES) + "/tokenizers/bytelevel_bpe/tokenizer.json",
                dir / "tokenizer.json");
  const std::unique_ptr<Tokenizer> tok = checkpoint_tokenizer(dir.string());
  ASSERT_NE(tok, nullptr);

  Corpus corpus;
  corpus.languages = {"text"};
  const char* const words[] = {"the", "router",  "sends", "each",     "token", "to",  "a",
                               "few", "experts", "and",   "balances", "their", "load"};
  for (int d = 0; d < 60; ++d) {
    std::string text;
    for (int w = 0; w < 12 + d % 7; ++w)
      text += std::string(w ? " " : "") + words[(d * 5 + w * 3) % 13];
    corpus.docs.push_back({text, 0});
  }
  TrainConfig tc;
  tc.batch = 2;
  tc.seq_len = 16;
  tc.steps = 2;
  tc.eval_every = 0;
  tc.eval_batches = 1;
  // The fixture's vocabulary (320) is smaller than the tokenizer's (3000).
  const std::unique_ptr<Model> qwen = load_model(dir.string());
  try {
    Trainer t(qwen->config(), tc, corpus, tok.get());
    ADD_FAILURE() << "a tokenizer beyond the vocabulary was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the model's vocabulary [0, 320)"),
              std::string::npos)
        << e.what();
  }

  ModelConfig mc = model_preset("tiny");
  mc.vocab_size = tok->vocab_size();
  Trainer trainer(mc, tc, corpus, tok.get());
  size_t want = 0;
  for (size_t i = 0; i < corpus.docs.size(); ++i)
    if (i % static_cast<size_t>(tc.val_every) != static_cast<size_t>(tc.val_every) - 1)
      want += tok->encode(corpus.docs[i].text).size() + (tok->bos_id() ? 1 : 0) +
              (tok->eos_id() ? 1 : 0);
  EXPECT_EQ(static_cast<size_t>(trainer.train_tokens()), want);
  for (int s = 0; s < 2; ++s) EXPECT_TRUE(std::isfinite(trainer.train_step().loss));
  // The sample starts from the tokenizer's <bos> (or <eos>) and is decoded through it.
  EXPECT_NO_THROW((void)trainer.sample("the router", 8, 1e-9, 1));
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFinetune,
                         ::testing::Values("mixtral", "mixtral_top1_e4", "qwen2_moe", "qwen3_moe",
                                           "olmoe", "deepseek_v2", "deepseek_v3"));

}  // namespace moe
