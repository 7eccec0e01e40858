// moe/optimizer.h: AdamW (Loshchilov and Hutter 2019), decoupled weight decay, computed in the
// same order as torch.optim.AdamW so that trajectories can be compared step for step.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moe/tensor.h"

namespace moe {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class AdamW {
 public:
  explicit AdamW(const AdamWConfig& cfg);

  // Registers a parameter and its gradient buffer (same shape and float dtype). Moments start
  // at zero. `decay` false exempts it from weight decay. The slices param[r] of the rows r in
  // `frozen_rows` (indices along the first dimension: frozen experts) are never changed.
  void add(const std::string& name, Tensor param, Tensor grad, bool decay = true,
           std::vector<int64_t> frozen_rows = {});

  // One update of every registered parameter at learning rate lr:
  //   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  //   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  void step(double lr);
  void step() { step(cfg_.lr); }
  int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return cfg_; }

  // For checkpoints of a run split over ranks: the whole of a parameter's tensor from this
  // rank's part (when saving), or this rank's part from the whole (when loading).
  using Reshard = std::function<Tensor(const std::string& param, const Tensor&)>;
  // The moments as ("m.<name>", f64 tensor), ("v.<name>", ...), each through `whole` if given.
  std::vector<std::pair<std::string, Tensor>> state(const Reshard& whole = {}) const;
  // The moments and the step count, for checkpoints.
  void save(const std::string& path) const;
  // save() for a run split over ranks: every rank calls it, each moment going through `whole`
  // (a collective for a routed parameter's), whose result's shape whole_shape gives beforehand;
  // the writer alone writes, one tensor at a time (no rank holds every moment at once).
  void save_streamed(
      const std::string& path, const Reshard& whole,
      const std::function<Shape(const std::string& param, const Shape&)>& whole_shape,
      bool writer) const;
  // Restores what save() wrote; every registered parameter must be present with its shape
  // (after `part`, if given).
  void load(const std::string& path, const Reshard& part = {});

 private:
  struct Slot {
    std::string name;
    Tensor param, grad, m, v;
    bool decay;
    std::vector<int64_t> frozen_rows;
  };
  // A piece of one parameter's update: n elements from element `at` (a block of a run of rows
  // between frozen ones); made once, after the last add().
  struct Piece {
    size_t slot;
    int64_t at, n;
  };
  AdamWConfig cfg_;
  std::vector<Slot> slots_;
  std::vector<Piece> pieces_;
  int64_t t_ = 0;
};

}  // namespace moe
