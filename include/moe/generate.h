// moe/generate.h: text generation with a key/value cache: several sequences at once, prompts
// of any lengths, greedy or sampled (temperature, top-k, top-p) with a seed.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/model.h"
#include "moe/rng.h"

namespace moe {

struct SamplingConfig {
  double temperature = 1.0;  // 0: greedy (the highest logit, ties to the lowest id)
  int64_t top_k = 0;         // keep the k most likely tokens; 0: all
  double top_p = 1.0;        // keep the smallest set whose probability reaches p (nucleus)
  uint64_t seed = 0;
};

// One token from logits [V] (float). Temperature, then top-k, then top-p, as transformers
// orders its logits warpers; the draw is one uniform from rng.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingConfig& cfg, Rng& rng);

// Generates up to n tokens after each prompt and returns each sequence, prompt included. A
// sequence stops early at any token of `stop`. Prompts run through the cache one by one (each
// in one pass), then all sequences decode together, one token per step. on_token (when set) is
// called with (sequence, token) as tokens are chosen, for streaming.
std::vector<std::vector<int32_t>> generate(
    Model& model, const std::vector<std::vector<int32_t>>& prompts, int64_t n,
    const SamplingConfig& cfg, const std::vector<int32_t>& stop = {},
    const std::function<void(size_t, int32_t)>& on_token = nullptr);

}  // namespace moe
