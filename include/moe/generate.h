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

// Self-speculative decoding with the model's multi-token prediction modules (DeepSeek-V3 section
// 5.4.3; Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").
// Each round, MTP module k (k = 1..depth) guesses the token k + 1 ahead of the last accepted
// one, chained as in training; one pass of the model over the last token and the guesses then
// checks them, keeping the longest prefix that greedy decoding would have chosen, plus the
// model's own next token. The output is plain greedy decoding's; the speed-up depends on how
// often the guesses are right.
struct SpeculativeStats {
  int64_t rounds = 0;    // passes of the full model after the prompt
  int64_t drafted = 0;   // tokens the modules guessed
  int64_t accepted = 0;  // of those, the ones kept
  int64_t tokens = 0;    // new tokens
  double acceptance() const {
    return drafted > 0 ? static_cast<double>(accepted) / static_cast<double>(drafted) : 0;
  }
};

// Greedy generation of up to n tokens after `prompt` (one sequence), drafting with the first
// `depth` MTP modules (0: all of them); returns the sequence, prompt included. stop and
// on_token as generate()'s.
std::vector<int32_t> generate_speculative(Model& model, const std::vector<int32_t>& prompt,
                                          int64_t n, int64_t depth,
                                          const std::vector<int32_t>& stop = {},
                                          const std::function<void(int32_t)>& on_token = nullptr,
                                          SpeculativeStats* stats = nullptr);

}  // namespace moe
