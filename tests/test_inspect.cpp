// Routing made visible: the normalized mutual information, and a report whose counts add up.
#include <gtest/gtest.h>

#include "moe/inspect.h"
#include "moe/trainer.h"

namespace moe {

TEST(Inspect, NormalizedMutualInformation) {
  EXPECT_NEAR(normalized_mutual_information({{10, 0}, {0, 10}}), 1.0, 1e-12);
  EXPECT_NEAR(normalized_mutual_information({{5, 5}, {5, 5}}), 0.0, 1e-12);
  EXPECT_EQ(normalized_mutual_information({{7, 3}}), 0.0);  // one language: nothing to share
  EXPECT_EQ(normalized_mutual_information({}), 0.0);
  // A partial association lies strictly between.
  const double v = normalized_mutual_information({{8, 2}, {3, 7}});
  EXPECT_GT(v, 0.05);
  EXPECT_LT(v, 0.5);
  // Symmetric in its two variables.
  EXPECT_NEAR(v, normalized_mutual_information({{8, 3}, {2, 7}}), 1e-12);
}

TEST(Inspect, ReportCountsAddUp) {
  ModelConfig c = model_preset("tiny");
  c.max_seq_len = 32;
  Model model(c);
  Rng rng(1);
  model.init(rng);
  Corpus corpus;
  corpus.languages = {"en", "de"};
  for (int i = 0; i < 40; ++i)
    corpus.docs.push_back(
        {i % 2 ? "Guten Tag, wie geht es dir?" : "Good day, how are you?", i % 2});
  TokenStream stream;
  for (const Document& d : corpus.docs) stream.append(d);
  const RoutingReport r = inspect_routing(model, stream, corpus.languages, 3, 4, 16);
  EXPECT_EQ(r.tokens, 3 * 4 * 16);
  ASSERT_EQ(r.layers.size(), 2u);
  for (const LayerRouting& l : r.layers) {
    int64_t total = 0, by_lang = 0;
    for (int64_t v : l.tokens_per_expert) total += v;
    for (const auto& row : l.lang_expert)
      for (int64_t v : row) by_lang += v;
    EXPECT_EQ(total, r.tokens * c.moe.top_k);
    EXPECT_EQ(by_lang, total);
    EXPECT_GE(l.load_imbalance, 1.0);
    EXPECT_GE(l.nmi, 0.0);
    EXPECT_LE(l.nmi, 1.0);
    EXPECT_GT(l.router_entropy, 0.0);
  }
  EXPECT_NE(load_svg(r).find("layer 1"), std::string::npos);
  EXPECT_NE(language_svg(r).find("de to expert"), std::string::npos);
}

}  // namespace moe
