// Shared by the tokenizer tests: reference cases ({text, ids, decoded}) and the check that a
// tokenizer reproduces every one of them.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/tokenizer.h"

namespace moe::test {

struct TokenizerCase {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

inline std::vector<TokenizerCase> parse_cases(const nlohmann::json& list) {
  std::vector<TokenizerCase> cases;
  for (const auto& c : list)
    cases.push_back({c.at("text").get<std::string>(), c.at("ids").get<std::vector<int32_t>>(),
                     c.at("decoded").get<std::string>()});
  return cases;
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  return nlohmann::json::parse(f);
}

// Every case: encode gives exactly the ids, decode of the ids gives the decoded text. Returns
// how many cases passed both.
inline int expect_cases(const Tokenizer& tok, const std::vector<TokenizerCase>& cases,
                        const std::string& name) {
  int passed = 0;
  for (const TokenizerCase& c : cases) {
    const std::vector<int32_t> ids = tok.encode(c.text);
    const std::string decoded = tok.decode(c.ids);
    EXPECT_EQ(ids, c.ids) << name << ": encode(" << nlohmann::json(c.text).dump() << ")";
    EXPECT_EQ(decoded, c.decoded) << name << ": decode of the ids of "
                                  << nlohmann::json(c.text).dump();
    passed += ids == c.ids && decoded == c.decoded;
  }
  return passed;
}

}  // namespace moe::test
