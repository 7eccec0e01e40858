// The tokenizer.json files of four real model families (Qwen3, DeepSeek-V3, Llama 2, gpt-oss;
// fetched by fetch_tokenizers.sh into MOE_REAL_TOKENIZERS before these tests run) encode every
// case of tests/fixtures/tokenizers_real/cases.json to exactly the ids HuggingFace tokenizers
// gave, and decode them to its text. A missing file fails: the tests never skip. Also times the
// loading and the encoding.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

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
