// Helpers of the tests on HuggingFace checkpoints (tests/fixtures/hf).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "moe/safetensors.h"

namespace moe {

// The fixture folder tests/fixtures/hf/<name>.
inline std::string hf_fixture(const std::string& name) {
  return std::string(MOE_TEST_FIXTURES) + "/hf/" + name;
}

// int64 token ids (as transformers saves them) to int32.
inline Tensor as_i32(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), DType::I32);
  for (int64_t i = 0; i < t.numel(); ++i)
    out.data<int32_t>()[i] = static_cast<int32_t>(t.data<int64_t>()[i]);
  return out;
}

// ||a - b|| / ||b||.
inline double relative_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = a.at(i) - b.at(i);
    diff += d * d;
    norm += b.at(i) * b.at(i);
  }
  return std::sqrt(diff / norm);
}

// Writes the tensors of `src`/model.safetensors into `dir` (created) as two shards, layer 1 in
// the second; returns the weight map of their index (not written). config.json is copied.
inline nlohmann::json write_two_shards(const std::string& src, const std::filesystem::path& dir,
                                       const std::string& first_shard,
                                       const std::string& second_shard) {
  namespace fs = std::filesystem;
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src + "/config.json", dir / "config.json");
  const SafetensorsFile all = load_safetensors(src + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> a, b;
  nlohmann::json map = nlohmann::json::object();
  for (const auto& [name, stored] : all.stored) {
    const bool first = name.find("layers.1.") == std::string::npos;
    (first ? a : b).emplace_back(name, all.at(name));
    map[name] = first ? first_shard : second_shard;
  }
  save_safetensors((dir / first_shard).string(), a);
  save_safetensors((dir / second_shard).string(), b);
  return map;
}

}  // namespace moe
