// The tokenizer.json files of four real model families (Qwen3, DeepSeek-V3, Llama 2, gpt-oss;
// fetched by fetch_tokenizers.sh into MOE_REAL_TOKENIZERS before these tests run) encode every
// case of tests/fixtures/tokenizers_real/cases.json to exactly the ids HuggingFace tokenizers
// gave, and decode them to its text. A missing file fails: the tests never skip. Also times the
// loading and the encoding.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>

#include "moe/gguf.h"
#include "moe/tokenizer.h"
#include "tokenizer_cases.h"

namespace moe {

namespace {

const std::string kFiles = MOE_REAL_TOKENIZERS;
const std::string kCases = std::string(MOE_TEST_FIXTURES) + "/tokenizers_real/cases.json";

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct RealFile {
  std::string key;
  int64_t vocab_size;
};
void PrintTo(const RealFile& f, std::ostream* os) { *os << f.key; }

class RealTokenizer : public ::testing::TestWithParam<RealFile> {};

}  // namespace

TEST_P(RealTokenizer, MatchesHuggingFaceTokenizers) {
  const RealFile& file = GetParam();
  const std::string path = kFiles + "/" + file.key + "/tokenizer.json";
  ASSERT_TRUE(std::filesystem::is_regular_file(path))
      << path << " is missing: the ctest fixture fetch_real_tokenizers fetches it (bash "
      << "tests/fetch_tokenizers.sh " << kFiles << ")";

  auto t0 = std::chrono::steady_clock::now();
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(path);
  const double load_s = seconds_since(t0);
  EXPECT_EQ(tok->vocab_size(), file.vocab_size);

  const auto cases = test::parse_cases(test::read_json(kCases).at(file.key));
  ASSERT_EQ(cases.size(), 24u);
  // Encoding time of the cases, the first time (no cached words) and after.
  t0 = std::chrono::steady_clock::now();
  for (const auto& c : cases) (void)tok->encode(c.text);
  const double cold_s = seconds_since(t0);
  const int passed = test::expect_cases(*tok, cases, file.key);
  EXPECT_EQ(passed, static_cast<int>(cases.size()));

  // Throughput on a longer text: every case's text, 200 times.
  std::string text;
  for (int rep = 0; rep < 200; ++rep)
    for (const auto& c : cases) text += c.text + "\n";
  t0 = std::chrono::steady_clock::now();
  const size_t n_ids = tok->encode(text).size();
  const double long_s = seconds_since(t0);
  std::printf(
      "[ timing   ] %s: %d of %zu cases match; load %.2f s; encode of the cases %.2f ms; "
      "%.1f MB in %.3f s (%.1f MB/s, %zu ids)\n",
      file.key.c_str(), passed, cases.size(), load_s, cold_s * 1e3, text.size() / 1e6, long_s,
      text.size() / 1e6 / long_s, n_ids);
}

INSTANTIATE_TEST_SUITE_P(Files, RealTokenizer,
                         ::testing::Values(RealFile{"qwen3", 151669},
                                           RealFile{"deepseek_v3", 128815},
                                           RealFile{"llama2", 32000}, RealFile{"gptoss", 200019}),
                         [](const auto& p) { return p.param.key; });

// The GGUF vocabulary llama.cpp's converter (convert_hf_to_gguf.py) writes for a tokenizer.json:
// the vocabulary and the added tokens by id, the added special tokens CONTROL (3), the other
// added tokens USER_DEFINED (4), the rest NORMAL (1); for "gpt2" the merges as "a b". For a
// SentencePiece-style vocabulary ("llama") the byte tokens BYTE (6), the unknown token UNKNOWN
// (2), and as scores the merges' ranks: the tokenizer.json's merges were made from the
// SentencePiece model's scores, ranked by the score of the token each makes, so minus the rank
// of a token's first merge orders the tokens as their scores did.
GgufFile gguf_vocabulary(const std::string& path, const std::string& model,
                         const std::string& pre) {
  const nlohmann::json j = test::read_json(path);
  std::vector<std::string> tokens;
  std::vector<int64_t> types;
  const auto put = [&](size_t id, const std::string& text, int64_t type) {
    if (id >= tokens.size()) {
      tokens.resize(id + 1);
      types.resize(id + 1, 1);
    }
    tokens[id] = text;
    types[id] = type;
  };
  const nlohmann::json& unk = j.at("model").at("unk_token");
  for (const auto& [text, id] : j.at("model").at("vocab").items()) {
    const bool byte = model == "llama" && text.size() == 6 && text.starts_with("<0x");
    put(id.get<size_t>(), text,
        byte                                                ? 6
        : unk.is_string() && text == unk.get<std::string>() ? 2
                                                            : 1);
  }
  std::vector<std::string> merges;
  for (const auto& m : j.at("model").at("merges"))
    merges.push_back(m.is_string() ? m.get<std::string>()
                                   : m[0].get<std::string>() + " " + m[1].get<std::string>());
  for (const auto& t : j.at("added_tokens"))
    if (types.size() <= t.at("id").get<size_t>() || types[t.at("id").get<size_t>()] != 2)
      put(t.at("id").get<size_t>(), t.at("content").get<std::string>(),
          t.at("special").get<bool>() ? 3 : 4);
  std::vector<std::pair<std::string, GgufValue>> meta = {
      {"general.architecture", GgufValue::str("test")},
      {"tokenizer.ggml.model", GgufValue::str(model)},
      {"tokenizer.ggml.tokens", GgufValue::strings(tokens)}};
  std::vector<GgufValue> type_values;
  for (int64_t t : types) type_values.push_back(GgufValue::i32(static_cast<int32_t>(t)));
  meta.emplace_back("tokenizer.ggml.token_type",
                    GgufValue::array(GgufValueType::I32, std::move(type_values)));
  if (model == "gpt2") {
    meta.emplace_back("tokenizer.ggml.pre", GgufValue::str(pre));
    meta.emplace_back("tokenizer.ggml.merges", GgufValue::strings(merges));
  } else {
    std::map<std::string, float> score_of;  // a token's first merge, -rank
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      std::string joined = merges[rank];
      joined.erase(joined.find(' '), 1);
      score_of.emplace(joined, -static_cast<float>(rank));
    }
    std::vector<GgufValue> scores;
    for (const std::string& t : tokens) {
      const auto it = score_of.find(t);
      scores.push_back(GgufValue::f32(it != score_of.end() ? it->second : -1e9f));
    }
    meta.emplace_back("tokenizer.ggml.scores",
                      GgufValue::array(GgufValueType::F32, std::move(scores)));
  }
  auto bytes = std::make_shared<std::string>(gguf_bytes(meta, {}));
  return parse_gguf(bytes->data(), bytes->size(), bytes, path + ".gguf");
}

// Each family's tokenizer.json written as the GGUF vocabulary llama.cpp's converter makes of it,
// with the pre-tokenizer name it gives that family: every case encodes to the ids of
// HuggingFace tokenizers, and decodes to its text.
TEST_P(RealTokenizer, AsGgufVocabularyMatchesHuggingFaceTokenizers) {
  const RealFile& file = GetParam();
  const std::string path = kFiles + "/" + file.key + "/tokenizer.json";
  ASSERT_TRUE(std::filesystem::is_regular_file(path)) << path << " is missing";
  const std::map<std::string, std::pair<std::string, std::string>> kinds = {
      {"qwen3", {"gpt2", "qwen2"}},
      {"deepseek_v3", {"gpt2", "deepseek-v3"}},
      {"gptoss", {"gpt2", "gpt-4o"}},
      {"llama2", {"llama", ""}}};
  const auto& [model, pre] = kinds.at(file.key);
  const GgufFile gguf = gguf_vocabulary(path, model, pre);
  const auto t0 = std::chrono::steady_clock::now();
  const std::unique_ptr<Tokenizer> tok = gguf_tokenizer(gguf);
  const double load_s = seconds_since(t0);
  EXPECT_EQ(tok->vocab_size(), file.vocab_size);
  const auto cases = test::parse_cases(test::read_json(kCases).at(file.key));
  const int passed = test::expect_cases(*tok, cases, file.key + " (GGUF)");
  EXPECT_EQ(passed, static_cast<int>(cases.size()));
  std::printf(
      "[ timing   ] %s as GGUF (%s%s%s): %d of %zu cases match; tokenizer built in %.2f s\n",
      file.key.c_str(), model.c_str(), pre.empty() ? "" : ", ", pre.c_str(), passed, cases.size(),
      load_s);
}

// Special ids of the families (none of the files has a tokenizer_config.json beside it here, so
// these come from the added tokens' usual names).
// Qwen3's normalizer is NFC: a letter followed by a combining accent encodes as the composed
// letter does.
TEST(RealTokenizer, NfcComposesDecomposedText) {
  const auto tok = load_tokenizer(std::string(MOE_REAL_TOKENIZERS) + "/qwen3");
  EXPECT_EQ(tok->encode("Cafe\u0301 cre\u0300me"), tok->encode("Caf\u00e9 cr\u00e8me"));
  EXPECT_NE(tok->encode("Cafe\u0301"), tok->encode("Cafe"));
}

TEST(RealTokenizer, SpecialIds) {
  const auto llama = load_tokenizer(kFiles + "/llama2/tokenizer.json");
  EXPECT_EQ(llama->bos_id(), 1);
  EXPECT_EQ(llama->eos_id(), 2);
  const auto deepseek = load_tokenizer(kFiles + "/deepseek_v3/tokenizer.json");
  EXPECT_EQ(deepseek->bos_id(), 0);
  EXPECT_EQ(deepseek->eos_id(), 1);
  const auto qwen = load_tokenizer(kFiles + "/qwen3/tokenizer.json");
  EXPECT_EQ(qwen->eos_id(), 151643);  // <|endoftext|>
}

}  // namespace moe
