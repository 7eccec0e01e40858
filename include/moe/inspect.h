// moe/inspect.h: routing made visible. Runs a model over text with language tags and reports,
// per MoE layer, the tokens each expert received, load imbalance, dead experts, router entropy,
// the share of each language sent to each expert, and the normalized mutual information between
// a token's language and its top expert; and draws them.
#pragma once

#include <string>
#include <vector>

#include "moe/data.h"
#include "moe/model.h"

namespace moe {

struct LayerRouting {
  int64_t layer = 0;                       // index of the transformer layer
  std::vector<int64_t> tokens_per_expert;  // [E] (token, expert) pairs
  double load_imbalance = 0;               // max / mean of tokens_per_expert
  int64_t dead_experts = 0;                // experts that received no token
  double router_entropy = 0;               // mean over batches, nats
  double dropped = 0;   // pairs dropped by the capacity limit / pairs routed, over all batches
  double unrouted = 0;  // tokens that reached no expert (expert choice, drops) / tokens
  std::vector<std::vector<int64_t>> lang_expert;  // [languages][E] pairs
  double nmi = 0;                                 // NMI(language; top expert)
};

struct RoutingReport {
  std::vector<std::string> languages;
  int64_t tokens = 0;
  std::vector<LayerRouting> layers;
};

// Runs `batches` batches of B windows of T tokens, evenly spaced over the stream.
RoutingReport inspect_routing(Model& model, const TokenStream& stream,
                              const std::vector<std::string>& languages, int64_t batches,
                              int64_t batch, int64_t seq_len);

// Normalized mutual information 2 I(A; B) / (H(A) + H(B)) of a joint count table [A][B]
// (0 when either variable is constant).
double normalized_mutual_information(const std::vector<std::vector<int64_t>>& joint);

// SVG pictures: expert load per layer (bars), and language-by-expert shares (heat maps).
std::string load_svg(const RoutingReport& r);
std::string language_svg(const RoutingReport& r);

}  // namespace moe
