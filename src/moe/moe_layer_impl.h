// What the MoE layer's forward (moe_layer.cpp) keeps for its backward (moe_backward.cpp), and
// the helpers both use.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "expert_parallel.h"
#include "moe/moe_layer.h"
#include "moe/threading.h"

namespace moe {

struct MoeLayer::Saved {
  int64_t n = 0;                           // tokens
  int64_t p = 0;                           // pairs in the routing plan
  int64_t m = 0;                           // kept pairs = rows of the sorted block
  Tensor x;                                // [N, D], the caller's input
  const void* xr = nullptr;                // [N, D] the router's input (x, or x times the jitter)
  const void* jitter = nullptr;            // [N, D] the jitter factors, when jittering
  int64_t r = 0;                           // router rows
  const int64_t* token_offsets = nullptr;  // [N + 1] from the plan
  const void* weight = nullptr;            // [P] from the plan
  const int32_t* expert = nullptr;         // [P] from the plan
  int64_t* offsets = nullptr;              // [E + 1] row offsets of each expert's kept block
  int32_t* row_pair = nullptr;             // [M] the pair of each sorted row
  int32_t* pair_row = nullptr;             // [P] the sorted row of each pair, -1 when dropped
  void* ys = nullptr;                      // [M, D] expert outputs (unweighted)
  // The rows this process's experts ran: its own M rows, or under expert parallelism the Me
  // rows that arrived from the group, with offsets [El + 1] per local expert.
  int64_t me = 0;
  const int64_t* e_offsets = nullptr;
  ExpertExchange exchange;    // expert parallelism only
  void* xe = nullptr;         // [Me, D] inputs
  void* a_gate = nullptr;     // [Me, F]
  void* a_up = nullptr;       // [Me, F]
  void* h = nullptr;          // [Me, F]
  void* sh_y = nullptr;       // [N, D] sum of the shared experts' outputs (ungated)
  void* sh_a_gate = nullptr;  // [S, N, Fs]
  void* sh_a_up = nullptr;    // [S, N, Fs]
  void* sh_h = nullptr;       // [S, N, Fs]
  void* sh_g = nullptr;       // [N] shared gate sigmoid
  bool valid = false;
};

namespace moe_detail {

// Runs fn(e) for every expert: across experts on all threads when there are many (each GEMM then
// runs on its own thread), else one expert after another with multi-threaded GEMMs.
template <class Fn>
void for_each_expert(int64_t n_experts, Fn&& fn) {
  if (n_experts >= 2 * num_threads() && num_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < n_experts; ++e) fn(e);
  } else {
    for (int64_t e = 0; e < n_experts; ++e) fn(e);
  }
}

template <class T>
void check_finite(const char* where, const char* what, const T* p, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows * cols; ++i)
    MOE_CHECK(std::isfinite(p[i]), where, "{} has a non-finite value ({}) at row {}, column {}",
              what, static_cast<double>(p[i]), i / cols, i % cols);
}

template <class T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

inline bool is_frozen(const MoeConfig& cfg, int64_t e) {
  return std::find(cfg.frozen_experts.begin(), cfg.frozen_experts.end(), e) !=
         cfg.frozen_experts.end();
}

}  // namespace moe_detail

}  // namespace moe
