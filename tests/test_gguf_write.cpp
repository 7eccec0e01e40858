// Writing GGUF files (moe/gguf_write.h) and ggml's quantizers (quantize_row):
// - the tensors `moe quantize` writes from qwen3moe-BF16.gguf, and from the HF folder it was
//   converted from, are byte for byte the tensors llama-quantize wrote from that file
//   (tests/fixtures/gguf/qwen3moe-BF16.llama-quantize-*.gguf, README there), of the same types;
// - each quantizer against a naive reference (each code the best of all codes for the block's
//   scales; MXFP4's exponent from frexp) and within stated round-trip error bounds;
// - written files load in this engine with the input model's logits, and a file written from
//   a HF folder carries the converter's tokenizer (same tokens, types, merges, special ids) and
//   tokenizes as the HF tokenizer and llama.cpp do;
// - bad requests are refused by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/gguf_model.h"
#include "moe/gguf_write.h"
#include "moe/rng.h"
#include "moe/safetensors.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"
#include "moe/weights.h"

namespace moe {

namespace {

namespace fs = std::filesystem;
const std::string kGguf = std::string(MOE_TEST_FIXTURES) + "/gguf/";
const std::string kHf = std::string(MOE_TEST_FIXTURES) + "/hf/";

std::string temp_path(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "moe_test_gguf_write";
  fs::create_directories(dir);
  return (dir / name).string();
}

// Metadata values, arrays element by element.
bool same_value(const GgufValue& a, const GgufValue& b) {
  if (a.type != b.type) return false;
  if (a.type != GgufValueType::ARRAY) {
    if (a.v.index() != b.v.index()) return false;
    return std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, std::vector<GgufValue>>) {
            return false;
          } else {
            return x == std::get<T>(b.v);
          }
        },
        a.v);
  }
  if (a.elem != b.elem || a.items().size() != b.items().size()) return false;
  for (size_t i = 0; i < a.items().size(); ++i)
    if (!same_value(a.items()[i], b.items()[i])) return false;
  return true;
}

// Every tensor of `want`: present in `got` with the same type, ne and bytes.
void expect_same_tensors(const GgufFile& got, const GgufFile& want) {
  EXPECT_EQ(got.tensors.size(), want.tensors.size());
  int64_t same = 0;
  for (const GgufTensor& w : want.tensors) {
    ASSERT_TRUE(got.has_tensor(w.name)) << w.name;
    const GgufTensor& g = got.tensor(w.name);
    EXPECT_EQ(ggml_type_name(g.type), std::string(ggml_type_name(w.type))) << w.name;
    EXPECT_EQ(g.n_dims, w.n_dims) << w.name;
    EXPECT_EQ(g.ne, w.ne) << w.name;
    if (g.type != w.type || g.bytes != w.bytes) continue;
    if (std::memcmp(g.data, w.data, w.bytes) == 0) {
      ++same;
    } else {
      size_t first = 0;
      while (g.data[first] == w.data[first]) ++first;
      ADD_FAILURE() << w.name << " (" << ggml_type_name(w.type) << "): bytes differ from byte "
                    << first << " (block " << first / ggml_type_info(w.type).block_size << ")";
    }
  }
  EXPECT_EQ(same, static_cast<int64_t>(want.tensors.size()));
}

class MatchesLlamaQuantize : public ::testing::TestWithParam<const char*> {};

TEST_P(MatchesLlamaQuantize, FromTheBf16File) {
  const std::string ft = GetParam();
  const std::string out = temp_path("from-bf16-" + ft + ".gguf");
  const GgufWriteReport r =
      write_gguf_model(kGguf + "qwen3moe-BF16.gguf", out, parse_gguf_file_type(ft));
  EXPECT_EQ(r.architecture, "qwen3moe");
  const GgufFile got = load_gguf(out);
  const GgufFile want = load_gguf(kGguf + "qwen3moe-BF16.llama-quantize-" + ft + ".gguf");
  expect_same_tensors(got, want);
  EXPECT_EQ(got.get_u32("general.file_type"), want.get_u32("general.file_type"));
  // The metadata as llama-quantize keeps it: the same keys in the same order, the same values.
  EXPECT_EQ(got.key_order, want.key_order);
  for (const std::string& k : want.key_order) EXPECT_TRUE(same_value(got.get(k), want.get(k))) << k;
  // And so the whole file is llama-quantize's, byte for byte (tensor order, alignment, padding).
  const auto bytes = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  EXPECT_TRUE(bytes(out) == bytes(kGguf + "qwen3moe-BF16.llama-quantize-" + ft + ".gguf"));
}

TEST_P(MatchesLlamaQuantize, FromTheHfFolder) {
  // The HF folder's bf16 weights are the BF16 file's: the same tensors from the other source.
  const std::string ft = GetParam();
  const std::string out = temp_path("from-hf-" + ft + ".gguf");
  write_gguf_model(kGguf + "qwen3moe-hf", out, parse_gguf_file_type(ft));
  expect_same_tensors(load_gguf(out),
                      load_gguf(kGguf + "qwen3moe-BF16.llama-quantize-" + ft + ".gguf"));
}

INSTANTIATE_TEST_SUITE_P(GgufWrite, MatchesLlamaQuantize,
                         ::testing::Values("Q8_0", "Q4_K_M", "MXFP4_MOE"));

TEST(GgufWrite, HfFolderAsTheConverterWritesIt) {
  const std::string out = temp_path("hf-bf16.gguf");
  write_gguf_model(kGguf + "qwen3moe-hf", out, GgufFileType::BF16);
  const GgufFile got = load_gguf(out);
  const GgufFile want = load_gguf(kGguf + "qwen3moe-BF16.gguf");
  expect_same_tensors(got, want);
  // Every metadata key of the converter's file but its name and size label, with its value.
  for (const std::string& k : want.key_order) {
    if (k == "general.name" || k == "general.size_label") continue;
    ASSERT_TRUE(got.has(k)) << k;
    EXPECT_EQ(got.get(k).type, want.get(k).type) << k;
    EXPECT_TRUE(same_value(got.get(k), want.get(k))) << k;
  }
  // It tokenizes as the HF tokenizer and as llama.cpp (the reference's ids).
  const auto from_gguf = gguf_tokenizer(got);
  const auto from_hf = load_tokenizer(kGguf + "qwen3moe-hf");
  std::ifstream in(kGguf + "qwen3moe-BF16.reference.json");
  const nlohmann::json ref = nlohmann::json::parse(in);
  for (const nlohmann::json& c : ref.at("tokenize")) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> ids = c.at("ids").get<std::vector<int32_t>>();
    EXPECT_EQ(from_gguf->encode(text), ids) << text;
    EXPECT_EQ(from_hf->encode(text), ids) << text;
  }
  EXPECT_EQ(from_gguf->bos_id(), std::optional<int32_t>(0));
  EXPECT_EQ(from_gguf->eos_id(), std::optional<int32_t>(2));
}

// ---------------------------------------------------------------------------------------------
// Written files as models: the logits of the input model.

double rel_l2(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = static_cast<double>(a.data<float>()[i]) - b.data<float>()[i];
    num += d * d;
    den += static_cast<double>(b.data<float>()[i]) * b.data<float>()[i];
  }
  return std::sqrt(num / den);
}

Tensor logits_of(Model& m, int64_t vocab) {
  Tensor tokens = Tensor::empty({1, 12}, DType::I32);
  for (int64_t i = 0; i < 12; ++i)
    tokens.data<int32_t>()[i] = static_cast<int32_t>((i * 37 + 5) % vocab);
  Arena arena;
  return m.logits(tokens, arena).to(DType::F32);
}

// (architecture of the file, HF fixture)
class WrittenFromHf : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

TEST_P(WrittenFromHf, LoadsWithTheModelsLogits) {
  const auto [arch, name] = GetParam();
  const std::unique_ptr<Model> hf = load_model(kHf + name);
  const Tensor want = logits_of(*hf, hf->config().vocab_size);
  // F32: the same weights (Mixtral's q/k rows permuted, rotated as pairs): within 1e-5 (measured
  // 0, Mixtral 2.2e-7). BF16 and Q8_0: the weights rounded, which moves these random float32
  // models' logits (measured BF16 4.5e-3 to 2.8e-2, Q8_0 1.5e-2 to 7.0e-2, Qwen3-MoE and
  // DeepSeek-V3 the most): bounds 5e-2 and 1e-1.
  for (const auto& [ft, bound] :
       {std::pair{GgufFileType::F32, 1e-5}, std::pair{GgufFileType::BF16, 5e-2},
        std::pair{GgufFileType::Q8_0, 1e-1}}) {
    const std::string out =
        temp_path(std::string(name) + "-" + gguf_file_type_info(ft).name + ".gguf");
    const GgufWriteReport r = write_gguf_model(kHf + name, out, ft);
    EXPECT_EQ(r.architecture, arch);
    const std::unique_ptr<Model> g = load_model(out);
    const double d = rel_l2(logits_of(*g, hf->config().vocab_size), want);
    EXPECT_LE(d, bound) << name << " " << gguf_file_type_info(ft).name;
    std::printf("%s %s: logits rel L2 %.3g\n", name, gguf_file_type_info(ft).name, d);
  }
}

INSTANTIATE_TEST_SUITE_P(GgufWrite, WrittenFromHf,
                         ::testing::Values(std::pair{"qwen3moe", "qwen3_moe"},
                                           std::pair{"qwen2moe", "qwen2_moe"},
                                           std::pair{"llama", "mixtral"},
                                           std::pair{"deepseek2", "deepseek_v3"},
                                           std::pair{"deepseek2", "deepseek_v2"}));

// This engine's own checkpoints: the architecture from what the model computes (OLMoE's norms
// over the whole q and k; a plain model as llama with Mixtral's permuted q/k rows); F32 files
// give the model's logits within 1e-5 (measured 0 and 2e-7).
TEST(GgufWrite, OwnCheckpoints) {
  for (const bool olmoe : {true, false}) {
    ModelConfig c = model_preset("tiny");
    c.n_kv_heads = olmoe ? c.n_heads : 2;
    c.qk_norm = olmoe ? QkNorm::full : QkNorm::none;
    c.moe.renormalize = !olmoe;
    c.validate();
    Model m(c);
    Rng rng(5);
    m.init(rng);
    const std::string dir = temp_path(olmoe ? "own-olmoe" : "own-llama");
    fs::remove_all(dir);
    save_model(m, dir);
    const std::string out = dir + ".gguf";
    const GgufWriteReport r = write_gguf_model(dir, out, GgufFileType::F32);
    EXPECT_EQ(r.architecture, olmoe ? "olmoe" : "llama");
    const std::unique_ptr<Model> back = load_model(out);
    const double d = rel_l2(logits_of(*back, c.vocab_size), logits_of(m, c.vocab_size));
    EXPECT_LE(d, 1e-5) << r.architecture;
    std::printf("own %s F32: logits rel L2 %.3g\n", r.architecture.c_str(), d);
  }
}

TEST(GgufWrite, RequantizedFileRuns) {
  // Q8_0 and Q4_K_M from the BF16 file: the engine runs them, their logits those of the BF16
  // model (llama.cpp's float32 run of it, `logits_dequantized_f32`) within the weight rounding,
  // the median over the 16 positions (these random weights are sensitive; the fixtures' README
  // measured medians of 3.5e-2 and 0.26 between llama.cpp's F32 and its Q8_0 / Q4_K_M files of
  // this model; here measured 2.6e-2 and 0.27): bounds 0.1 and 0.4.
  std::ifstream in(kGguf + "qwen3moe-BF16.reference.json");
  const nlohmann::json ref = nlohmann::json::parse(in);
  const std::vector<int32_t> ids = ref.at("input_ids").get<std::vector<int32_t>>();
  const SafetensorsFile want = load_safetensors(kGguf + "qwen3moe-BF16.reference.safetensors");
  const Tensor& expect = want.at("logits_dequantized_f32");
  Tensor tokens = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), tokens.data<int32_t>());
  for (const auto& [ft, bound] :
       {std::pair{GgufFileType::Q8_0, 0.1}, std::pair{GgufFileType::Q4_K_M, 0.4}}) {
    const std::string out =
        temp_path(std::string("requant-") + gguf_file_type_info(ft).name + ".gguf");
    write_gguf_model(kGguf + "qwen3moe-BF16.gguf", out, ft);
    const std::unique_ptr<Model> q = load_model(out, WeightsAs::stored);
    Arena arena;
    const Tensor got = q->logits(tokens, arena).to(DType::F32);
    ASSERT_EQ(got.numel(), expect.numel());
    std::vector<double> per;
    const int64_t V = 3000;
    for (size_t p = 0; p < ids.size(); ++p) {
      double num = 0, den = 0;
      for (int64_t v = 0; v < V; ++v) {
        const double a = got.data<float>()[static_cast<int64_t>(p) * V + v];
        const double b = expect.data<float>()[static_cast<int64_t>(p) * V + v];
        num += (a - b) * (a - b);
        den += b * b;
      }
      per.push_back(std::sqrt(num / den));
    }
    std::sort(per.begin(), per.end());
    const double median = per[per.size() / 2];
    EXPECT_LE(median, bound) << gguf_file_type_info(ft).name;
    std::printf("%s from BF16: median per-position logits rel L2 %.3g (max %.3g)\n",
                gguf_file_type_info(ft).name, median, per.back());
  }
}

// ---------------------------------------------------------------------------------------------
// The quantizers, type by type.

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = nd(rng);
  return x;
}

std::vector<float> round_trip(GgmlType t, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<char> q(ggml_row_bytes(t, n));
  quantize_row(t, x.data(), q.data(), n);
  std::vector<float> y(x.size());
  dequantize_row(t, q.data(), y.data(), n);
  return y;
}

double rel_rms(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Round trips of N(0, 1) values, relative RMS error (a scale does not change it), against bounds
// about 15 % above what each type gives (measured: BF16 1.65e-3, F16 2.07e-4, Q8_0 5.38e-3, Q6_K
// 1.78e-2, Q5_K 3.62e-2, Q5_1 3.80e-2, Q5_0 4.29e-2, Q4_K 7.15e-2, Q4_0 8.68e-2, MXFP4 0.115;
// for comparison, a uniform quantizer of step s has error s / sqrt(12): Q8_0's step, about
// 2.1 / 127 for blocks of 32 Gaussian values, gives 4.8e-3).
TEST(GgufQuantizeRow, RoundTripErrorBounds) {
  const std::vector<float> x = gaussian(256 * 512, 7);
  const std::pair<GgmlType, double> bounds[] = {
      {GgmlType::F32, 0.0},     {GgmlType::BF16, 1.9e-3},   {GgmlType::F16, 2.4e-4},
      {GgmlType::Q8_0, 6.2e-3}, {GgmlType::Q6_K, 2.05e-2},  {GgmlType::Q5_K, 4.2e-2},
      {GgmlType::Q5_1, 4.4e-2}, {GgmlType::Q5_0, 4.9e-2},   {GgmlType::Q4_K, 8.2e-2},
      {GgmlType::Q4_0, 1.0e-1}, {GgmlType::MXFP4, 1.32e-1},
  };
  for (const auto& [t, bound] : bounds) {
    const double e = rel_rms(round_trip(t, x), x);
    EXPECT_LE(e, bound) << ggml_type_name(t);
    std::printf("%-6s rel RMS %.3g\n", ggml_type_name(t), e);
  }
}

// Blocks of zeros come back as zeros, a constant block nearly so, and no value is NaN.
TEST(GgufQuantizeRow, ZeroAndConstantBlocks) {
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K,
                     GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::MXFP4}) {
    const std::vector<float> zeros(256, 0.0f), ones(256, 0.75f);
    for (float v : round_trip(t, zeros)) EXPECT_EQ(v, 0.0f) << ggml_type_name(t);
    for (float v : round_trip(t, ones)) EXPECT_NEAR(v, 0.75f, 0.05f) << ggml_type_name(t);
    std::vector<float> spike(256, 0.01f);
    spike[3] = -50.0f;
    for (float v : round_trip(t, spike)) EXPECT_TRUE(std::isfinite(v)) << ggml_type_name(t);
  }
}

// Q8_0 against the definition: d = amax / 127 rounded to f16, q = round(x * (1 / d)) (half away
// from zero), the naive reference in double where the rounding allows.
TEST(GgufQuantizeRow, Q8_0NaiveReference) {
  const std::vector<float> x = gaussian(32 * 200, 11, 0.1f);
  std::vector<uint8_t> q(ggml_row_bytes(GgmlType::Q8_0, 32 * 200));
  quantize_row(GgmlType::Q8_0, x.data(), q.data(), 32 * 200);
  for (int b = 0; b < 200; ++b) {
    const float* xb = x.data() + 32 * b;
    const uint8_t* qb = q.data() + 34 * b;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127;
    EXPECT_EQ(qb[0] | (qb[1] << 8), f32_to_f16(d));
    for (int j = 0; j < 32; ++j) {
      const double exact = static_cast<double>(xb[j]) / d;
      const int8_t got = static_cast<int8_t>(qb[2 + j]);
      EXPECT_LE(std::fabs(got - exact), 0.5 + 1e-5) << b << " " << j;
      EXPECT_LE(std::abs(got), 127);
    }
  }
}

// MXFP4: the exponent is floor(log2(amax)) - 2 (frexp, exactly), and each code is one of the
// nearest E2M1 values (brute force over the 16).
TEST(GgufQuantizeRow, Mxfp4NaiveReference) {
  const int64_t n = 32 * 300;
  const std::vector<float> x = gaussian(n, 13, 0.08f);
  std::vector<uint8_t> q(ggml_row_bytes(GgmlType::MXFP4, n));
  quantize_row(GgmlType::MXFP4, x.data(), q.data(), n);
  const double kE2m1[16] = {0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6};
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x.data() + 32 * b;
    const uint8_t* qb = q.data() + 17 * b;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    int exp2;
    std::frexp(amax, &exp2);  // amax = m 2^exp2, m in [0.5, 1): floor(log2 amax) = exp2 - 1
    ASSERT_EQ(qb[0], exp2 - 1 - 2 + 127) << b;
    const double scale = std::ldexp(1.0, qb[0] - 127);
    for (int j = 0; j < 32; ++j) {
      const int code = j < 16 ? qb[1 + j] & 0xF : qb[1 + j - 16] >> 4;
      double best = 1e30;
      for (double v : kE2m1) best = std::min(best, std::fabs(v * scale - xb[j]));
      EXPECT_LE(std::fabs(kE2m1[code] * scale - xb[j]), best * (1 + 1e-6) + 1e-12) << b << " " << j;
    }
  }
}

// The K-quants: given the scales the block holds (its dequantization of each code), every code
// is the best one (up to rounding at an exact tie): no other code of the sub-block's range
// comes closer to the input.
TEST(GgufQuantizeRow, KQuantCodesAreNearest) {
  const int64_t n = 256 * 64;
  const std::vector<float> x = gaussian(n, 17, 0.05f);
  for (const auto& [t, levels] : {std::pair{GgmlType::Q4_K, 16}, std::pair{GgmlType::Q5_K, 32},
                                  std::pair{GgmlType::Q6_K, 64}}) {
    const GgmlTypeInfo& info = ggml_type_info(t);
    std::vector<uint8_t> q(ggml_row_bytes(t, n));
    quantize_row(t, x.data(), q.data(), n);
    int64_t checked = 0;
    for (int64_t b = 0; b < n / 256; ++b) {
      uint8_t* qb = q.data() + info.block_size * b;
      std::vector<float> got(256), alt(256);
      dequantize_row(t, qb, got.data(), 256);
      // Each element's value for every code: rewrite the code in a copy of the block, decode.
      // (Brute force: levels decodes per element.)
      for (int e = 0; e < 256; e += 5) {
        const double err = std::fabs(static_cast<double>(got[e]) - x[b * 256 + e]);
        double best = err;
        std::vector<uint8_t> copy(qb, qb + info.block_size);
        for (int c = 0; c < levels; ++c) {
          // Where element e's code lives.
          if (t == GgmlType::Q4_K) {
            uint8_t& byte = copy[16 + (e / 64) * 32 + e % 32];
            byte =
                static_cast<uint8_t>((e % 64) < 32 ? (byte & 0xF0) | c : (byte & 0x0F) | (c << 4));
          } else if (t == GgmlType::Q5_K) {
            uint8_t& lo = copy[48 + (e / 64) * 32 + e % 32];
            uint8_t& hi = copy[16 + e % 32];
            const int bit = 2 * (e / 64) + ((e % 64) < 32 ? 0 : 1);
            lo = static_cast<uint8_t>((e % 64) < 32 ? (lo & 0xF0) | (c & 0xF)
                                                    : (lo & 0x0F) | ((c & 0xF) << 4));
            hi = static_cast<uint8_t>((hi & ~(1 << bit)) | (((c >> 4) & 1) << bit));
          } else {
            const int half = e / 128, l = e % 128, k = l / 32, j = l % 32;
            uint8_t& lo = copy[half * 64 + j + 32 * (k % 2)];
            uint8_t& hi = copy[128 + half * 32 + j];
            lo = static_cast<uint8_t>(k < 2 ? (lo & 0xF0) | (c & 0xF)
                                            : (lo & 0x0F) | ((c & 0xF) << 4));
            hi = static_cast<uint8_t>((hi & ~(3 << (2 * k))) | (((c >> 4) & 3) << (2 * k)));
          }
          dequantize_row(t, copy.data(), alt.data(), 256);
          best = std::min(best, std::fabs(static_cast<double>(alt[e]) - x[b * 256 + e]));
        }
        // A tie decided by one rounding of (x + m) / d: within a millionth of the step.
        EXPECT_LE(err, best + 1e-6 * std::fabs(x[b * 256 + e]) + 1e-9)
            << ggml_type_name(t) << " block " << b << " element " << e;
        ++checked;
      }
    }
    EXPECT_GT(checked, 3000);
  }
}

TEST(GgufQuantizeRow, RefusesWhatItCannotWrite) {
  std::vector<float> x(100, 1.0f);
  std::vector<char> q(1024);
  EXPECT_THROW(quantize_row(GgmlType::Q4_K, x.data(), q.data(), 100), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q2_K, x.data(), q.data(), 256), Error);
  EXPECT_FALSE(ggml_can_quantize(GgmlType::Q3_K));
  EXPECT_TRUE(ggml_can_quantize(GgmlType::MXFP4));
}

// ---------------------------------------------------------------------------------------------
// The recipe and the errors.

TEST(GgufWrite, RecipeFallsBackAsLlamaCpp) {
  const std::vector<GgufTensorDesc> t = {
      {"token_embd.weight", {256, 100}, GgmlType::F32},
      {"blk.0.attn_q.weight", {96, 96}, GgmlType::F32},       // Q4_K -> Q5_0
      {"blk.0.attn_output.weight", {40, 96}, GgmlType::F32},  // -> F16
      {"blk.0.attn_norm.weight", {96}, GgmlType::F32},
      {"blk.0.ffn_gate_inp.weight", {96, 4}, GgmlType::BF16},
      {"blk.0.ffn_down_exps.weight", {64, 96, 4}, GgmlType::F32},   // Q6_K -> Q8_0
      {"output.weight", {96, 100}, GgmlType::F32},                  // not by 256: Q8_0
      {"blk.0.ffn_gate_inp_shexp.weight", {96, 1}, GgmlType::F32},  // 1-D for ggml_n_dims
  };
  std::vector<std::string> notes;
  const std::vector<GgmlType> got = gguf_recipe(t, GgufFileType::Q4_K_M, 4, 1, &notes);
  const std::vector<GgmlType> want = {GgmlType::Q4_K, GgmlType::Q5_0, GgmlType::F16,
                                      GgmlType::F32,  GgmlType::BF16, GgmlType::Q8_0,
                                      GgmlType::Q8_0, GgmlType::F32};
  EXPECT_EQ(got, want);
  ASSERT_EQ(notes.size(), 3u);
  EXPECT_NE(notes[0].find("blk.0.attn_q.weight"), std::string::npos);
  // MXFP4_MOE: experts MXFP4, the rest Q8_0.
  const std::vector<GgmlType> mx = gguf_recipe(t, GgufFileType::MXFP4_MOE, 4, 1);
  EXPECT_EQ(mx[5], GgmlType::MXFP4);
  EXPECT_EQ(mx[0], GgmlType::Q8_0);
  EXPECT_EQ(mx[2], GgmlType::F16);
}

TEST(GgufWrite, RefusesBadRequestsByName) {
  const auto expect_error = [](const std::function<void()>& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "no error (" << part << ")";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_error([] { parse_gguf_file_type("Q9_X"); }, "Q4_K_M");
  EXPECT_EQ(parse_gguf_file_type("mxfp4"), GgufFileType::MXFP4_MOE);
  const std::string in = kGguf + "qwen3moe-BF16.gguf";
  expect_error([&] { write_gguf_model(in, in, GgufFileType::Q8_0); }, "input model");
  expect_error(
      [&] { write_gguf_model(in, fs::temp_directory_path().string(), GgufFileType::Q8_0); },
      "folder");
  // An architecture llama.cpp's files of this engine do not cover: refused, naming it.
  expect_error([&] { write_gguf_model(kHf + "dbrx", temp_path("dbrx.gguf"), GgufFileType::F32); },
               "dbrx");
  EXPECT_FALSE(fs::exists(temp_path("dbrx.gguf")));
  // A SentencePiece-style tokenizer.json (metaspace BPE) cannot be written yet.
  const std::string sp = temp_path("mixtral-metaspace");
  fs::remove_all(sp);
  fs::copy(kHf + "mixtral", sp);
  fs::copy_file(std::string(MOE_TEST_FIXTURES) + "/tokenizers/metaspace_bpe/tokenizer.json",
                sp + "/tokenizer.json");
  expect_error([&] { write_gguf_model(sp, sp + ".gguf", GgufFileType::F32); },
               "SentencePiece-style");
  EXPECT_FALSE(fs::exists(sp + ".gguf"));
  // llama.cpp's olmoe takes as many key heads as query heads; this OLMoE fixture has 2 of 4.
  expect_error([&] { write_gguf_model(kHf + "olmoe", temp_path("olmoe.gguf"), GgufFileType::F32); },
               "as many key/value heads as query heads");
}

}  // namespace

}  // namespace moe
