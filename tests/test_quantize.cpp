// Quantized experts (`moe quantize`): the files it writes (every other tensor byte for byte, the
// experts as bf16 or int8 with their scales, shards and index), and what quantizing costs: the
// change in transformers' logits on every HuggingFace fixture, and in the validation loss of a
// model trained on the default corpus, each bounded.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf_test_util.h"
#include "moe/data.h"
#include "moe/quantize.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

std::string fixture(const std::string& name) { return std::string(MOE_TEST_FIXTURES) + "/" + name; }

std::string quantized(const std::string& dir, const std::string& tag, ExpertFormat f) {
  const fs::path out = fs::temp_directory_path() / ("moe_quant_" + tag + "_" + to_string(f));
  fs::remove_all(out);
  quantize_checkpoint(dir, out.string(), f);
  return out.string();
}

Tensor logits_of(const std::string& dir, const Tensor& ids) {
  std::unique_ptr<Model> model = load_model(dir);
  Arena arena;
  return model->logits(ids, arena).clone();
}

Tensor reference_ids(const SafetensorsFile& ref) { return as_i32(ref.at("input_ids")); }

class QuantizedHf : public ::testing::TestWithParam<const char*> {};

}  // namespace

// Every architecture and layout (one tensor per expert, DBRX's fused ones): the quantized
// checkpoint keeps every other tensor, and its logits stay near transformers' float32 ones.
TEST_P(QuantizedHf, KeepsEverythingElseAndStaysNearTransformersLogits) {
  const std::string dir = hf_fixture(GetParam());
  const SafetensorsFile ref = load_safetensors(dir + "/reference.safetensors");
  const Tensor ids = reference_ids(ref);
  const Tensor& want = ref.at("logits");
  const double f32_error = relative_error(logits_of(dir, ids), want);
  const SafetensorsFile src = load_safetensors(dir + "/model.safetensors");
  for (ExpertFormat f : {ExpertFormat::bf16, ExpertFormat::int8}) {
    SCOPED_TRACE(to_string(f));
    const std::string q = quantized(dir, GetParam(), f);
    EXPECT_TRUE(fs::exists(q + "/config.json"));
    EXPECT_FALSE(fs::exists(q + "/reference.safetensors")) << "only the weights are rewritten";
    const SafetensorsFile got = load_safetensors(q + "/model.safetensors");
    int64_t experts = 0;
    for (const auto& [name, t] : src.stored) {
      ASSERT_TRUE(got.has(name)) << name;
      const StoredTensor& g = got.stored.at(name);
      EXPECT_EQ(g.shape, t.shape) << name;
      if (is_routed_expert_weight(name, static_cast<int64_t>(t.shape.size()))) {
        ++experts;
        EXPECT_EQ(g.dtype, f == ExpertFormat::bf16 ? "BF16" : "I8") << name;
        EXPECT_EQ(got.has(name + "_scale"), f == ExpertFormat::int8) << name;
      } else {
        EXPECT_EQ(g.dtype, t.dtype) << name;
        EXPECT_EQ(std::memcmp(g.data, t.data, t.bytes), 0) << name << " changed";
      }
    }
    EXPECT_GE(experts, 2) << "no expert was quantized";
    EXPECT_EQ(got.stored.size(), src.stored.size() + (f == ExpertFormat::int8 ? experts : 0));
    const double err = relative_error(logits_of(q, ids), want);
    std::printf("%s %s experts: logits relative error against transformers %.3g (float32: %.3g)\n",
                GetParam(), to_string(f), err, f32_error);
    // Random tiny models, so the error is set by the formats' resolution (bf16: 8 bits of
    // mantissa; int8: 1/254 of a row's range), and larger where a token's choice of experts in a
    // later layer changes with it (int8: 1e-3 to 8e-3, and 4.4e-2 for deepseek_v3).
    EXPECT_LT(err, f == ExpertFormat::bf16 ? 5e-3 : 6e-2);
    EXPECT_GT(err, f32_error) << "the quantized experts changed nothing: were they read?";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantizedHf,
                         ::testing::Values("mixtral", "mixtral_top1_e4", "qwen2_moe", "qwen3_moe",
                                           "olmoe", "deepseek_v2", "deepseek_v3", "dbrx"));

// A model trained on the default corpus (tests/fixtures/trained_tiny, see its README): the
// validation loss with quantized experts stays within a small bound of the float32 one.
TEST(Quantize, ValidationLossOfATrainedModelBarelyMoves) {
  const std::string dir = fixture("trained_tiny");
  TokenStream train, val;
  split_corpus(load_fortunes(), 20, train, val, nullptr);
  auto loss_of = [&](const std::string& d) {
    std::unique_ptr<Model> model = load_model(d);
    return window_loss(*model, val, 128, 16, 48).loss;
  };
  const double base = loss_of(dir);
  EXPECT_LT(base, 2.6) << "the fixture is not a trained model";
  for (ExpertFormat f : {ExpertFormat::bf16, ExpertFormat::int8}) {
    const double loss = loss_of(quantized(dir, "trained", f));
    std::printf("%s experts: validation loss %.6f against %.6f (%+.2e; perplexity %+.4f%%)\n",
                to_string(f), loss, base, loss - base, 100 * (std::exp(loss - base) - 1));
    EXPECT_LT(std::abs(loss - base), 1e-3) << to_string(f);  // measured: 1e-4 and 3e-5
    EXPECT_NE(loss, base) << to_string(f) << ": the quantized experts changed nothing";
  }
}

// A sharded checkpoint: scales go into the index next to their matrices, and the result loads
// to the same logits as the single-file one quantized the same way.
TEST(Quantize, ShardedCheckpointsKeepTheirIndex) {
  const std::string src = hf_fixture("mixtral");
  const fs::path dir = fs::temp_directory_path() / "moe_quant_sharded";
  const nlohmann::json map = write_two_shards(src, dir, "part-1.safetensors", "part-2.safetensors");
  std::ofstream(dir / "model.safetensors.index.json")
      << nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump();
  const std::string q = quantized(dir.string(), "sharded", ExpertFormat::int8);
  std::ifstream f(q + "/model.safetensors.index.json");
  const nlohmann::json index = nlohmann::json::parse(f);
  EXPECT_EQ(index["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w3.weight_scale"],
            "part-2.safetensors");
  EXPECT_GT(index["metadata"]["total_size"].get<int64_t>(), 0);
  const Tensor ids = reference_ids(load_safetensors(src + "/reference.safetensors"));
  const Tensor single = logits_of(quantized(src, "single", ExpertFormat::int8), ids);
  const Tensor sharded = logits_of(q, ids);
  EXPECT_EQ(std::memcmp(single.raw(), sharded.raw(), single.nbytes()), 0);
}

TEST(Quantize, RefusesWhatItCannotDo) {
  const std::string src = hf_fixture("mixtral");
  auto expect_error = [](const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "accepted; expected: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string q = quantized(src, "twice", ExpertFormat::int8);
  expect_error([&] { quantized(q, "again", ExpertFormat::bf16); }, "already int8");
  expect_error([&] { quantize_checkpoint(q, q, ExpertFormat::int8); }, "is the input checkpoint");
  expect_error([&] { parse_expert_format("int4"); }, "unknown expert format 'int4'");
  expect_error([&] { quantize_checkpoint("/nonexistent", "/tmp/x", ExpertFormat::int8); },
               "is not a checkpoint");
  // A dense model has no experts to quantize.
  const fs::path dense = fs::temp_directory_path() / "moe_quant_dense";
  fs::remove_all(dense);
  Model model(model_preset("small-dense"), DType::F32);
  save_model(model, dense.string());
  expect_error([&] { quantized(dense.string(), "dense", ExpertFormat::int8); },
               "no routed expert matrices");
}

}  // namespace moe
