// moe/classic.h: the classic demonstration of mixtures of experts: a piecewise regression task
// on which a 1991 mixture of four small MLP experts (soft gating, Jacobs et al.) and a 1994
// two-level hierarchical mixture (Jordan and Jacobs) beat a single expert of the same size,
// because each expert takes one region of the input.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace moe {

struct ClassicConfig {
  int dims = 1;           // input dimension: 1 (four intervals) or 2 (four quadrants)
  int64_t n_train = 512;  // training points, drawn uniformly from [-1, 1]^dims
  int64_t hidden = 4;     // hidden width of every expert MLP (GELU, with biases)
  int64_t steps = 3000;   // full-batch AdamW steps
  double lr = 0.05;
  uint64_t seed = 0;
};

struct ClassicModel {
  std::string name;  // "single expert", "mixture (1991)", "hierarchical (1994)"
  int64_t n_experts = 0;
  int64_t params = 0;
  double train_mse = 0;
  double test_mse = 0;         // on a regular grid over the input space
  std::vector<double> fit;     // [grid points] the model's prediction
  std::vector<int> region;     // [grid points] the expert with the largest gate weight
  std::vector<double> losses;  // training loss every 100 steps
};

struct ClassicResult {
  int dims = 1;
  int64_t grid = 0;            // points per axis of the evaluation grid
  std::vector<double> target;  // [grid points]
  std::vector<ClassicModel> models;
};

// The target function: f(x) on [-1, 1] or f(x1, x2) on [-1, 1]^2, one piece per region.
double classic_target(int dims, const double* x);

// Trains the three models; progress(model, step, loss) is called every 100 steps (may be null).
ClassicResult run_classic(const ClassicConfig& cfg,
                          const std::function<void(const std::string&, int64_t, double)>& progress);

// An SVG picture of the fits and of the region each expert took.
std::string classic_svg(const ClassicResult& r);

}  // namespace moe
