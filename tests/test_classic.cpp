// The classic demonstration: on a piecewise regression task, a mixture of four experts (1991) and
// a two-level hierarchical mixture (1994) reach an error well below that of a single expert of
// the same size, and the experts divide the input between them.
#include <gtest/gtest.h>

#include <set>

#include "moe/classic.h"
#include "moe/threading.h"

namespace moe {

namespace {
void expect_mixtures_win(const ClassicConfig& cfg, double factor) {
  const ClassicResult r = run_classic(cfg, nullptr);
  ASSERT_EQ(r.models.size(), 3u);
  const ClassicModel& single = r.models[0];
  for (size_t i = 1; i < 3; ++i) {
    const ClassicModel& m = r.models[i];
    SCOPED_TRACE(m.name);
    EXPECT_LT(m.test_mse, factor * single.test_mse)
        << "single " << single.test_mse << ", " << m.name << " " << m.test_mse;
    // The experts split the input: at least three of the four own some region.
    std::set<int> owners(m.region.begin(), m.region.end());
    EXPECT_GE(owners.size(), 3u);
    // Training went down.
    EXPECT_LT(m.losses.back(), 0.5 * m.losses.front());
  }
}
}  // namespace

TEST(Classic, MixturesBeatASingleExpertIn1D) {
  set_num_threads(1);
  expect_mixtures_win(ClassicConfig{}, 0.5);
  set_num_threads(0);
}

TEST(Classic, MixturesBeatASingleExpertIn2D) {
  set_num_threads(1);
  ClassicConfig cfg;
  cfg.dims = 2;
  cfg.steps = 1500;
  expect_mixtures_win(cfg, 0.3);
  set_num_threads(0);
}

TEST(Classic, SvgShowsEveryModel) {
  ClassicConfig cfg;
  cfg.steps = 20;
  cfg.n_train = 64;
  const std::string svg = classic_svg(run_classic(cfg, nullptr));
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("single expert"), std::string::npos);
  EXPECT_NE(svg.find("hierarchical (1994)"), std::string::npos);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
}

}  // namespace moe
