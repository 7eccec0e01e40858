// moe/rng.h: a seeded random number generator (xoshiro256**, seeded through splitmix64).
//
// A run is a function of its seed: every random draw in the engine comes from an Rng, drawn in
// a fixed order on one thread, so results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "moe/tensor.h"

namespace moe {

// The complete state of an Rng, for checkpoints.
struct RngState {
  uint64_t s[4];
  bool has_spare;
  double spare;
};

class Rng {
 public:
  explicit Rng(uint64_t seed = 0);
  uint64_t next_u64();
  double uniform();                         // [0, 1)
  double uniform(double lo, double hi);     // [lo, hi)
  double normal();                          // N(0, 1), Box-Muller
  int64_t randint(int64_t lo, int64_t hi);  // [lo, hi)

  // Fills a float tensor with N(mean, std) or U(lo, hi).
  void fill_normal(Tensor& t, double mean, double std);
  void fill_uniform(Tensor& t, double lo, double hi);
  // fill_normal of the middle part of a longer tensor (before + t.numel() + after values): t
  // gets the values, and the generator the state, that filling the whole would give them.
  void fill_normal_part(Tensor& t, double mean, double std, int64_t before, int64_t after);

  RngState state() const;
  void set_state(const RngState& st);

 private:
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0;
};

}  // namespace moe
