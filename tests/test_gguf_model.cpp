// GGUF files as models, against llama.cpp's own outputs (tests/fixtures/gguf, README there): the
// logits of every position within 1e-5 of llama.cpp's on the file's exact weights in float32
// (`logits_dequantized_f32`), with the weights computed from the quantized blocks as stored and
// with float32 copies; greedy continuations; configs from the metadata; bad files refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/generate.h"
#include "moe/gguf_model.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"

namespace moe {

namespace {

const std::string kDir = std::string(MOE_TEST_FIXTURES) + "/gguf/";

nlohmann::json reference_json(const std::string& name) {
  std::ifstream in(kDir + name + ".reference.json");
  return nlohmann::json::parse(in);
}

// Per position, ||a - b|| / ||b|| over the vocabulary; the largest.
double max_rel_l2(const float* a, const float* b, int64_t rows, int64_t cols) {
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double d = static_cast<double>(a[r * cols + c]) - b[r * cols + c];
      num += d * d;
      den += static_cast<double>(b[r * cols + c]) * b[r * cols + c];
    }
    worst = std::max(worst, std::sqrt(num / den));
  }
  return worst;
}

// The architectures of the fixtures in the repository (the others are in ../shared/fixtures).
const char* const kModels[] = {"qwen3moe-Q4_K_M", "qwen3moe-Q8_0", "qwen3moe-BF16",
                               "mixtral-Q4_0",    "mixtral-Q6_K",  "olmoe-Q4_K_M"};

}  // namespace

TEST(GgufModel, LogitsMatchLlamaCppOnTheFilesWeightsInFloat32) {
  for (const char* name : kModels) {
    const nlohmann::json ref = reference_json(name);
    const SafetensorsFile want = load_safetensors(kDir + name + ".reference.safetensors");
    const Tensor& expect = want.at("logits_dequantized_f32");
    const std::vector<int32_t> ids = ref.at("input_ids").get<std::vector<int32_t>>();
    for (WeightsAs as : {WeightsAs::stored, WeightsAs::float32}) {
      std::unique_ptr<Model> model = load_model(kDir + name + ".gguf", as);
      EXPECT_EQ(model->weights_stored(), as == WeightsAs::stored) << name;
      Arena arena;
      Tensor tokens = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
      std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
      const Tensor logits = model->logits(tokens, arena);
      ASSERT_EQ(logits.numel(), expect.numel()) << name;
      const double err =
          max_rel_l2(logits.data<float>(), expect.data<float>(), expect.size(0), expect.size(1));
      // llama.cpp's own run, its activations rounded to each weight type's dot-product type.
      const double theirs = max_rel_l2(want.at("logits").data<float>(), expect.data<float>(),
                                       expect.size(0), expect.size(1));
      std::printf("%s (%s): largest per-position relative L2 %.2e (llama.cpp's own run: %.2e)\n",
                  name, as == WeightsAs::stored ? "stored" : "float32", err, theirs);
      // bf16 weights as stored multiply a prompt's activations rounded to bf16, as llama.cpp
      // does (moe/weights.h): no further from the float32 result than llama.cpp's own run. Every
      // other product is float32 throughout.
      const bool rounded =
          as == WeightsAs::stored && std::string(name).find("BF16") != std::string::npos;
      if (rounded) {
        EXPECT_LT(err, 1.25 * theirs) << name;
      } else {
        EXPECT_LT(err, 1e-5) << name << (as == WeightsAs::stored ? " stored" : " float32");
        EXPECT_GT(theirs, 100 * err) << name;
      }
    }
  }
}

TEST(GgufModel, GreedyContinuationIsLlamaCppsInFloat32) {
  for (const char* name : kModels) {
    const nlohmann::json ref = reference_json(name);
    std::unique_ptr<Model> model = load_model(kDir + name + ".gguf", WeightsAs::stored);
    const auto prompt = ref.at("greedy_prompt").get<std::vector<int32_t>>();
    const auto want = ref.at("greedy_ids_dequantized_f32").get<std::vector<int32_t>>();
    const auto gaps = ref.at("greedy_top2_gap_dequantized_f32").get<std::vector<double>>();
    SamplingConfig greedy;
    greedy.temperature = 0;
    const auto got =
        generate(*model, {prompt}, static_cast<int64_t>(want.size() - prompt.size()), greedy)[0];
    ASSERT_EQ(got.size(), want.size()) << name;
    // Token for token, up to a step whose two best logits are within float32's reach of a tie.
    for (size_t i = prompt.size(); i < want.size(); ++i) {
      if (gaps[i - prompt.size()] < 1e-3) break;
      ASSERT_EQ(got[i], want[i]) << name << " step " << i - prompt.size();
    }
  }
}

TEST(GgufModel, ConfigComesFromTheMetadata) {
  const GgufFile q = load_gguf(kDir + "qwen3moe-Q4_K_M.gguf");
  const ModelConfig c = config_from_gguf(q);
  EXPECT_EQ(c.vocab_size, 3000);
  EXPECT_EQ(c.d_model, 256);
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_size(), 64);
  EXPECT_EQ(c.moe.n_experts, 8);
  EXPECT_EQ(c.moe.top_k, 2);
  EXPECT_EQ(c.moe.d_ffn, 256);
  EXPECT_TRUE(c.moe.renormalize);
  EXPECT_EQ(c.qk_norm, QkNorm::head);
  EXPECT_FALSE(c.rope_interleave);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  const ModelConfig m = config_from_gguf(load_gguf(kDir + "mixtral-Q4_0.gguf"));
  EXPECT_TRUE(m.rope_interleave);  // the converter's permuted q/k rows
  EXPECT_TRUE(m.moe.renormalize);
  EXPECT_EQ(m.qk_norm, QkNorm::none);
}

TEST(GgufModel, UnsupportedFilesAreRefusedByName) {
  const GgufFile q = load_gguf(kDir + "qwen3moe-Q4_K_M.gguf");
  // The same file under another architecture's name, and without its experts.
  const auto rewritten = [&](const std::string& arch, bool experts) {
    std::vector<std::pair<std::string, GgufValue>> meta;
    for (const std::string& key : q.key_order) {
      if (key == "qwen3moe.expert_count" && !experts) continue;
      std::string k = key;
      if (key.rfind("qwen3moe.", 0) == 0) k = arch + key.substr(8);
      meta.emplace_back(k, key == "general.architecture" ? GgufValue::str(arch) : q.get(key));
    }
    std::vector<GgufWriteTensor> tensors;
    for (const GgufTensor& t : q.tensors)
      tensors.push_back({t.name, t.type, {t.ne.begin(), t.ne.begin() + t.n_dims}, t.data});
    const std::string path =
        (std::filesystem::temp_directory_path() / ("moe_gguf_model_" + arch + ".gguf")).string();
    write_gguf(path, meta, tensors);
    return path;
  };
  const auto message = [](const std::string& path) {
    try {
      load_model(path, WeightsAs::stored);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(rewritten("rwkv6", true)).find("architecture 'rwkv6' is not supported"),
            std::string::npos);
  EXPECT_NE(message(rewritten("qwen3moe", false)).find("dense model"), std::string::npos);
  // A tensor of the wrong shape names the tensor.
  std::vector<std::pair<std::string, GgufValue>> meta;
  for (const std::string& key : q.key_order) meta.emplace_back(key, q.get(key));
  std::vector<GgufWriteTensor> tensors;
  for (const GgufTensor& t : q.tensors) {
    std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
    if (t.name == "blk.1.attn_q_norm.weight") ne = {32};
    tensors.push_back({t.name, t.type, ne, t.data});
  }
  const std::string path =
      (std::filesystem::temp_directory_path() / "moe_gguf_model_shape.gguf").string();
  write_gguf(path, meta, tensors);
  EXPECT_NE(message(path).find("'blk.1.attn_q_norm.weight' must be [64]"), std::string::npos)
      << message(path);
}

}  // namespace moe
