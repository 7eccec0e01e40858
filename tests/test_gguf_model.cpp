// GGUF files as models, against llama.cpp's own outputs (tests/fixtures/gguf, README there): the
// logits of every position within 1e-5 of llama.cpp's on the file's exact weights in float32
// (`logits_dequantized_f32`), with the weights computed from the quantized blocks as stored and
// with float32 copies; greedy continuations; configs from the metadata; bad files refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/generate.h"
#include "moe/gguf_model.h"
#include "moe/hf.h"
#include "moe/safetensors.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"
#include "moe/weights.h"

namespace moe {

namespace {

const std::string kDir = std::string(MOE_TEST_FIXTURES) + "/gguf/";

nlohmann::json reference_json(const std::string& name) {
  std::ifstream in(kDir + name + ".reference.json");
  return nlohmann::json::parse(in);
}

// Per position, ||a - b|| / ||b|| over the vocabulary.
std::vector<double> rel_l2(const float* a, const float* b, int64_t rows, int64_t cols) {
  std::vector<double> out;
  for (int64_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double d = static_cast<double>(a[r * cols + c]) - b[r * cols + c];
      num += d * d;
      den += static_cast<double>(b[r * cols + c]) * b[r * cols + c];
    }
    out.push_back(std::sqrt(num / den));
  }
  return out;
}
double max_of(std::vector<double> v) { return *std::max_element(v.begin(), v.end()); }
double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
// The architectures of the fixtures in the repository (the others are in ../shared/fixtures).
const char* const kModels[] = {
    "qwen3moe-Q4_K_M", "qwen3moe-Q8_0",    "qwen3moe-BF16",      "mixtral-Q4_0",  "mixtral-Q6_K",
    "olmoe-Q4_K_M",    "deepseek_v3-Q8_0", "deepseek_v3-Q5_K_M", "gpt_oss-MXFP4", "gpt_oss-Q8_0"};

// Logits of the fixture's 16 ids, and the largest per-position relative L2 from llama.cpp's
// float32 run on the file's exact weights, beside llama.cpp's own (activations rounded as its
// products do).
struct Distance {
  double ours, theirs;                // the largest over the positions
  double ours_median, theirs_median;  // the median
};
Distance distance(const std::string& name, WeightsAs as) {
  const nlohmann::json ref = reference_json(name);
  const SafetensorsFile want = load_safetensors(kDir + name + ".reference.safetensors");
  const Tensor& expect = want.at("logits_dequantized_f32");
  const std::vector<int32_t> ids = ref.at("input_ids").get<std::vector<int32_t>>();
  std::unique_ptr<Model> model = load_model(kDir + name + ".gguf", as);
  EXPECT_EQ(model->weights_stored(), as == WeightsAs::stored) << name;
  Arena arena;
  // Position by position through the cache, as decoding runs (the one-row products), and the
  // whole text in one pass (panels): both must be as close.
  KvCache cache = model->make_cache(1, static_cast<int64_t>(ids.size()));
  Tensor one = Tensor::empty({1, 1}, DType::I32);
  std::vector<float> stepwise;
  for (int32_t id : ids) {
    one.data<int32_t>()[0] = id;
    const Tensor l = model->decode(one, cache, arena);
    stepwise.insert(stepwise.end(), l.data<float>(), l.data<float>() + l.numel());
  }
  Tensor tokens = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
  const Tensor whole = model->logits(tokens, arena);
  EXPECT_EQ(whole.numel(), expect.numel()) << name;
  const int64_t rows = expect.size(0), cols = expect.size(1);
  const auto steps = rel_l2(stepwise.data(), expect.data<float>(), rows, cols);
  const auto pass = rel_l2(whole.data<float>(), expect.data<float>(), rows, cols);
  const auto theirs = rel_l2(want.at("logits").data<float>(), expect.data<float>(), rows, cols);
  Distance d{std::max(max_of(steps), max_of(pass)), max_of(theirs),
             std::max(median_of(steps), median_of(pass)), median_of(theirs)};
  std::printf(
      "%s (%s, %s activations): relative L2 per position, largest %.2e, median %.2e "
      "(llama.cpp's own run: %.2e, %.2e)\n",
      name.c_str(), as == WeightsAs::stored ? "stored" : "float32",
      cpu::quant_activations_name(cpu::quant_activations()), d.ours, d.ours_median, d.theirs,
      d.theirs_median);
  return d;
}

}  // namespace

// Float32 activations: within 1e-5 of llama.cpp's float32 result on the file's weights, with the
// weights computed from as stored and as float32 copies. bf16 weights as stored multiply a
// prompt's activations rounded to bf16, as llama.cpp does (moe/weights.h): no further from the
// float32 result than llama.cpp's own run.
TEST(GgufModel, LogitsMatchLlamaCppOnTheFilesWeightsInFloat32) {
  cpu::set_quant_activations(cpu::QuantActivations::f32);
  for (const char* name : kModels) {
    for (WeightsAs as : {WeightsAs::stored, WeightsAs::float32}) {
      const Distance d = distance(name, as);
      // BF16 matrices: the whole BF16 file, and gpt-oss's MXFP4 file (its other matrices).
      const bool bf16 = reference_json(name).at("tensor_types").contains("BF16");
      if (as == WeightsAs::stored && bf16) {
        EXPECT_LT(d.ours, 1.25 * d.theirs) << name;
      } else {
        EXPECT_LT(d.ours, 1e-5) << name;
        EXPECT_GT(d.theirs, 100 * d.ours) << name;
      }
    }
  }
  cpu::set_quant_activations(cpu::QuantActivations::int8);
}

// int8 activations (the default: decoding's products of Q4_K, Q5_K, Q6_K and Q8_0 weights round x
// per block as llama.cpp does): no further from the float32 result than llama.cpp's own run.
TEST(GgufModel, Int8ActivationsAreNoFurtherThanLlamaCppsOwnRun) {
  ASSERT_EQ(cpu::quant_activations(), cpu::QuantActivations::int8);
  for (const char* name : kModels) {
    // Where a rounding flips an expert choice, single positions move by up to 80% (the fixtures'
    // README): the medians are compared, as it advises.
    const Distance d = distance(name, WeightsAs::stored);
    EXPECT_LT(d.ours_median, 1.1 * d.theirs_median) << name;
  }
}

TEST(GgufModel, GreedyContinuationIsLlamaCppsInFloat32) {
  cpu::set_quant_activations(cpu::QuantActivations::f32);
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
  cpu::set_quant_activations(cpu::QuantActivations::int8);
}

// Older converters wrote DeepSeek's kv_b_proj whole (attn_kv_b [H * (nope + v), kv_lora]) where
// today's write its halves (attn_k_b, each head's key rows transposed, and attn_v_b): the fixture
// rewritten the old way gives the same logits.
TEST(GgufModel, DeepSeekKvDecompressionWholeOrInHalves) {
  const std::string name = "deepseek_v3-Q8_0";
  const GgufFile f = load_gguf(kDir + name + ".gguf");
  const ModelConfig c = config_from_gguf(f);
  const int64_t H = c.n_heads, R = c.kv_lora_rank, N = c.qk_nope_dim, V = c.v_head_dim;
  std::vector<std::pair<std::string, GgufValue>> meta;
  for (const std::string& key : f.key_order) meta.emplace_back(key, f.get(key));
  std::vector<GgufWriteTensor> tensors;
  std::vector<std::vector<float>> whole;  // kept alive until written
  for (const GgufTensor& t : f.tensors) {
    const std::string& n = t.name;
    if (n.find("attn_v_b") != std::string::npos) continue;
    if (n.find("attn_k_b") == std::string::npos) {
      tensors.push_back({n, t.type, {t.ne.begin(), t.ne.begin() + t.n_dims}, t.data});
      continue;
    }
    const std::string blk = n.substr(0, n.find("attn_k_b"));
    const Tensor kb = f.view(n).to(DType::F32);                        // [H, R, N]
    const Tensor vb = f.view(blk + "attn_v_b.weight").to(DType::F32);  // [H, V, R]
    std::vector<float>& w = whole.emplace_back(static_cast<size_t>(H * (N + V) * R));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t i = 0; i < N; ++i)
          w[static_cast<size_t>((h * (N + V) + i) * R + r)] = kb.data<float>()[(h * R + r) * N + i];
        for (int64_t j = 0; j < V; ++j)
          w[static_cast<size_t>((h * (N + V) + N + j) * R + r)] =
              vb.data<float>()[(h * V + j) * R + r];
      }
    tensors.push_back({blk + "attn_kv_b.weight", GgmlType::F32, {R, H * (N + V)}, w.data()});
  }
  const std::string path =
      (std::filesystem::temp_directory_path() / "moe_gguf_deepseek_kv_b.gguf").string();
  write_gguf(path, meta, tensors);
  Tensor tokens = Tensor::empty({1, 16}, DType::I32);
  const auto ids = reference_json(name).at("input_ids").get<std::vector<int32_t>>();
  std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
  Arena arena;
  cpu::set_quant_activations(cpu::QuantActivations::f32);
  const Tensor a = load_model(kDir + name + ".gguf", WeightsAs::stored)->logits(tokens, arena);
  const Tensor b = load_model(path, WeightsAs::stored)->logits(tokens, arena);
  cpu::set_quant_activations(cpu::QuantActivations::int8);
  ASSERT_EQ(a.numel(), b.numel());
  const double d = max_of(rel_l2(b.data<float>(), a.data<float>(), 16, c.vocab_size));
  std::printf("kv_b whole against its halves: relative L2 %.2e\n", d);
  EXPECT_LT(d, 1e-6);
  std::filesystem::remove(path);
}

// gpt-oss from its HuggingFace folder (MXFP4 experts as _blocks and _scales, the rest bf16) and
// from the GGUF file llama.cpp's converter made of it: the same weights, so the same logits as
// llama.cpp's float32 run on the file's, and the same as the GGUF file's, bit for bit.
TEST(GgufModel, GptOssFromItsHuggingFaceFolder) {
  const std::string hf = kDir + "gpt_oss_hf";
  const std::string name = "gpt_oss-MXFP4";
  const nlohmann::json ref = reference_json(name);
  const SafetensorsFile want = load_safetensors(kDir + name + ".reference.safetensors");
  const Tensor& expect = want.at("logits_dequantized_f32");
  const auto ids = ref.at("input_ids").get<std::vector<int32_t>>();
  Tensor tokens = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
  const int64_t rows = expect.size(0), cols = expect.size(1);
  cpu::set_quant_activations(cpu::QuantActivations::f32);
  Arena arena;
  const Tensor f32 = load_model(hf, WeightsAs::float32)->logits(tokens, arena).clone();
  const double d = max_of(rel_l2(f32.data<float>(), expect.data<float>(), rows, cols));
  std::printf("gpt-oss HF folder, float32 weights: relative L2 %.2e from llama.cpp's float32\n", d);
  EXPECT_LT(d, 1e-5);
  const Tensor a = load_model(hf, WeightsAs::stored)->logits(tokens, arena).clone();
  const Tensor b = load_model(kDir + name + ".gguf", WeightsAs::stored)->logits(tokens, arena);
  cpu::set_quant_activations(cpu::QuantActivations::int8);
  ASSERT_EQ(a.numel(), b.numel());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "HF and GGUF logits differ";
  // Its tokenizer (tokenizer.json) gives llama.cpp's ids.
  const auto tok = load_tokenizer(hf);
  for (const auto& c : ref.at("tokenize"))
    EXPECT_EQ(tok->encode(c.at("text").get<std::string>()), c.at("ids").get<std::vector<int32_t>>())
        << c.at("text");
}

// YaRN from the metadata (rope.scaling.*): the fixtures given the keys of
// yarn/make_references.py, run with float32 weights, against llama.cpp's float32 logits of the
// same (yarn/*.logits.f32); and the scaling changes them (against the unscaled reference).
TEST(GgufModel, YarnRopeScalingAsLlamaCpp) {
  struct Case {
    const char *name, *fixture;
    double factor;
    uint32_t original;
    double log_mul;  // DeepSeek's yarn_log_multiplier; 0: none
  };
  const Case cases[] = {{"gpt_oss", "gpt_oss-Q8_0", 32, 256, 0},
                        {"qwen3moe", "qwen3moe-Q8_0", 4, 1024, 0},
                        {"deepseek_v3", "deepseek_v3-Q8_0", 40, 256, 0.1}};
  cpu::set_quant_activations(cpu::QuantActivations::f32);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const GgufFile f = load_gguf(kDir + c.fixture + ".gguf");
    const std::string arch = f.get_string("general.architecture");
    std::vector<std::pair<std::string, GgufValue>> meta;
    for (const std::string& key : f.key_order) meta.emplace_back(key, f.get(key));
    meta.emplace_back(arch + ".rope.scaling.type", GgufValue::str("yarn"));
    meta.emplace_back(arch + ".rope.scaling.factor", GgufValue::f32(static_cast<float>(c.factor)));
    meta.emplace_back(arch + ".rope.scaling.original_context_length", GgufValue::u32(c.original));
    if (c.log_mul != 0)
      meta.emplace_back(arch + ".rope.scaling.yarn_log_multiplier",
                        GgufValue::f32(static_cast<float>(c.log_mul)));
    std::vector<GgufWriteTensor> tensors;
    for (const GgufTensor& t : f.tensors)
      tensors.push_back({t.name, t.type, {t.ne.begin(), t.ne.begin() + t.n_dims}, t.data});
    const std::string path =
        (std::filesystem::temp_directory_path() / (std::string("moe_yarn_") + c.name + ".gguf"))
            .string();
    write_gguf(path, meta, tensors);
    std::unique_ptr<Model> model = load_model(path, WeightsAs::float32);
    EXPECT_TRUE(model->config().rope_scaling.yarn());
    const auto ids = reference_json(c.fixture).at("input_ids").get<std::vector<int32_t>>();
    Tensor tokens = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
    Arena arena;
    const Tensor got = model->logits(tokens, arena);
    const int64_t rows = static_cast<int64_t>(ids.size()), cols = model->config().vocab_size;
    std::vector<float> want(static_cast<size_t>(rows * cols));
    std::ifstream in(kDir + "yarn/" + c.name + ".logits.f32", std::ios::binary);
    in.read(reinterpret_cast<char*>(want.data()),
            static_cast<std::streamsize>(want.size() * sizeof(float)));
    ASSERT_TRUE(in.good());
    const double d = max_of(rel_l2(got.data<float>(), want.data(), rows, cols));
    const Tensor plain = load_safetensors(kDir + c.fixture + ".reference.safetensors")
                             .at("logits_dequantized_f32")
                             .clone();
    const double moved = max_of(rel_l2(plain.data<float>(), want.data(), rows, cols));
    std::printf("%s with YaRN: relative L2 %.2e from llama.cpp's float32 (unscaled: %.2e)\n",
                c.name, d, moved);
    EXPECT_LT(d, 1e-5);
    EXPECT_GT(moved, 100 * d);
    std::filesystem::remove(path);
  }
  cpu::set_quant_activations(cpu::QuantActivations::int8);
}

// Fine-tuning gpt-oss: its float32 model trains (a step's gradients reach the sinks, the biases
// and the experts) and is saved in transformers' unquantized layout (gate_up_proj [E, D, 2F] with
// gate and up interleaved, down_proj [E, F, D], their biases), config.json without the MXFP4
// quantization_config; the saved folder loads back to the same logits, bit for bit.
TEST(GgufModel, GptOssTrainsAndSavesInTransformersLayout) {
  const std::string hf = kDir + "gpt_oss_hf";
  std::unique_ptr<Model> model = load_model(hf, WeightsAs::float32);
  const ModelConfig& c = model->config();
  Tensor batch = Tensor::empty({1, 9}, DType::I32);
  for (int64_t i = 0; i < 9; ++i) batch.data<int32_t>()[i] = static_cast<int32_t>(17 + 300 * i);
  Arena arena;
  model->zero_grad();
  const double loss = model->forward_backward(batch, arena).loss;
  EXPECT_TRUE(std::isfinite(loss));
  for (NamedParam& p : model->params()) {
    if (p.name.find("sinks") == std::string::npos && p.name.find("bias") == std::string::npos &&
        p.name.find("b_o") == std::string::npos && p.name.find("experts.w_up") == std::string::npos)
      continue;
    double norm = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i) norm += p.grad.at(i) * p.grad.at(i);
    EXPECT_GT(norm, 0) << p.name;
  }
  const std::string out = (std::filesystem::temp_directory_path() / "moe_gpt_oss_saved").string();
  std::filesystem::remove_all(out);
  save_hf_model(*model, hf_origin(hf), out);
  const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(out + "/config.json"));
  EXPECT_FALSE(cfg.contains("quantization_config"));
  const SafetensorsFile saved = load_safetensors(out + "/model.safetensors");
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  EXPECT_EQ(saved.stored.at("model.layers.1.mlp.experts.gate_up_proj").shape, Shape({E, D, 2 * F}));
  EXPECT_EQ(saved.stored.at("model.layers.1.mlp.experts.gate_up_proj_bias").shape,
            Shape({E, 2 * F}));
  EXPECT_EQ(saved.stored.at("model.layers.1.mlp.experts.down_proj").shape, Shape({E, F, D}));
  EXPECT_TRUE(saved.stored.count("model.layers.0.self_attn.sinks"));
  const Tensor tokens = batch.view_at(0, {1, 8});
  arena.reset();
  const Tensor a = model->logits(tokens, arena).clone();
  const Tensor b = load_model(out, WeightsAs::float32)->logits(tokens, arena);
  ASSERT_EQ(a.numel(), b.numel());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "the saved model's logits differ";
  std::filesystem::remove_all(out);
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
  // DeepSeek-V3 (deepseek2, sigmoid gating): latent attention with the decompressed heads'
  // sizes, a leading dense layer, a shared expert, group-limited routing.
  const ModelConfig d = config_from_gguf(load_gguf(kDir + "deepseek_v3-Q8_0.gguf"));
  EXPECT_TRUE(d.mla());
  EXPECT_EQ(d.n_heads, 2);
  EXPECT_EQ(d.q_lora_rank, 256);
  EXPECT_EQ(d.kv_lora_rank, 256);
  EXPECT_EQ(d.qk_nope_dim, 256);
  EXPECT_EQ(d.qk_rope_dim, 64);
  EXPECT_EQ(d.v_head_dim, 128);
  EXPECT_TRUE(d.rope_interleave);
  EXPECT_EQ(d.first_dense, 1);
  EXPECT_EQ(d.d_ffn, 512);
  EXPECT_EQ(d.moe.router, RouterKind::deepseek);
  EXPECT_EQ(d.moe.n_group, 2);
  EXPECT_EQ(d.moe.topk_group, 1);
  EXPECT_EQ(d.moe.n_shared, 1);
  EXPECT_EQ(d.moe.shared_width(), 256);
  EXPECT_DOUBLE_EQ(d.moe.routed_scaling_factor, 2.5);
  EXPECT_TRUE(d.moe.renormalize);
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
  // Sizes the tensors do not back are refused before a model of those sizes is made.
  const auto with_value = [&](const std::string& changed, const GgufValue& v) {
    std::vector<std::pair<std::string, GgufValue>> meta;
    for (const std::string& key : q.key_order)
      meta.emplace_back(key, key == changed ? v : q.get(key));
    std::vector<GgufWriteTensor> tensors;
    for (const GgufTensor& t : q.tensors)
      tensors.push_back({t.name, t.type, {t.ne.begin(), t.ne.begin() + t.n_dims}, t.data});
    const std::string path =
        (std::filesystem::temp_directory_path() / "moe_gguf_model_sizes.gguf").string();
    write_gguf(path, meta, tensors);
    return message(path);
  };
  EXPECT_NE(with_value("qwen3moe.block_count", GgufValue::u32(1000000)).find("1000000 layers"),
            std::string::npos);
  EXPECT_NE(with_value("qwen3moe.embedding_length", GgufValue::u32(1 << 20))
                .find("'token_embd.weight' has ne [256, 3000]; the metadata's sizes make it "
                      "[1048576, 3000]"),
            std::string::npos);
  EXPECT_NE(with_value("qwen3moe.expert_count", GgufValue::u32(4096)).find("ffn_gate_exps"),
            std::string::npos);
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
