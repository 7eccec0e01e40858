// Building blocks shared by the routers: softmax over logits, the Switch load-balancing loss,
// the z-loss, top-k weights with optional renormalization, and their backward passes. All are
// per-token loops over E (tiny next to the expert GEMMs) in a fixed order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/kernels.h"
#include "moe/router.h"

namespace moe::routing {

// A router's reusable buffer for its backward's per-token values (which has no arena): grows to
// the largest size asked for, then allocates no more.
class Scratch {
 public:
  template <class T>
  T* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    if (buf_.size() * sizeof(double) < bytes)
      buf_.resize((bytes + sizeof(double) - 1) / sizeof(double));
    return reinterpret_cast<T*>(buf_.data());
  }

 private:
  std::vector<double> buf_;  // double-aligned storage for float or double values
};

// Arena-backed plan with K pairs for every token.
template <class T>
RoutingPlan<T> uniform_plan(Arena& arena, int64_t n_tokens, int64_t k) {
  RoutingPlan<T> plan;
  plan.n_pairs = n_tokens * k;
  plan.token_offsets = arena.alloc<int64_t>(n_tokens + 1);
  for (int64_t t = 0; t <= n_tokens; ++t) plan.token_offsets[t] = t * k;
  plan.expert = arena.alloc<int32_t>(plan.n_pairs);
  plan.weight = arena.alloc<T>(plan.n_pairs);
  plan.score = arena.alloc<T>(plan.n_pairs);
  return plan;
}

// The router's softmax over E logits per token, in the arena: probs [N, E] and lse [N].
template <class T>
struct Softmax {
  T* probs;
  T* lse;
};
template <class T>
Softmax<T> arena_softmax(Arena& arena, const T* logits, int64_t n, int64_t e) {
  Softmax<T> s{arena.alloc<T>(n * e), arena.alloc<T>(n)};
  cpu::softmax_rows<T>(s.probs, s.lse, logits, n, e);
  return s;
}

// Mean entropy (nats) of the rows of probs [N, E].
template <class T>
double mean_entropy(const T* probs, int64_t n, int64_t e) {
  double h = 0;
  for (int64_t i = 0; i < n * e; ++i) {
    const double p = static_cast<double>(probs[i]);
    if (p > 0) h -= p * std::log(p);
  }
  return h / static_cast<double>(n);
}

// ST-MoE z-loss (Zoph et al. 2022, eq. 5): coef * mean_t lse_t^2.
template <class T>
double z_loss(const T* lse, int64_t n, double coef) {
  double z = 0;
  for (int64_t t = 0; t < n; ++t) z += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
  return coef * z / static_cast<double>(n);
}

// Switch/GShard load-balancing loss (Fedus et al. 2021, eq. 4): coef * E * sum_i f_i P_i with
// f_i = counts_i / total (not differentiated) and P_i the mean of probs[:, i].
template <class T>
double balance_loss(const T* probs, const int64_t* counts, int64_t total, int64_t n, int64_t e,
                    double coef) {
  double loss = 0;
  for (int64_t i = 0; i < e; ++i) {
    double pm = 0;
    for (int64_t t = 0; t < n; ++t) pm += static_cast<double>(probs[t * e + i]);
    loss +=
        static_cast<double>(counts[i]) / static_cast<double>(total) * pm / static_cast<double>(n);
  }
  return coef * static_cast<double>(e) * loss;
}

// Its gradient w.r.t. probs[t, i] is the same for every t: scale * f_i, scale = d * coef * E / N.
template <class T>
void balance_loss_grad(T* dprobs_row, const int64_t* counts, int64_t total, int64_t n, int64_t e,
                       double coef, double d) {
  const double s = d * coef * static_cast<double>(e) / static_cast<double>(n);
  for (int64_t i = 0; i < e; ++i)
    dprobs_row[i] +=
        static_cast<T>(s * static_cast<double>(counts[i]) / static_cast<double>(total));
}

// Combine weights from the selected probabilities: w_j = p_j / sum_k p_k, or w_j = p_j.
// Added to the sum of the selected probabilities before renormalizing, as transformers does for
// DeepSeek-V3 (whose sigmoid scores can all be 0); below float64's resolution for softmax
// probabilities, whose top-k sum is at least k / E.
constexpr double kRenormEps = 1e-20;

template <class T>
void topk_weights(T* w, const T* p, int64_t k, bool renormalize) {
  T sum = T(kRenormEps);
  for (int64_t j = 0; j < k; ++j) sum += p[j];
  for (int64_t j = 0; j < k; ++j) w[j] = renormalize ? p[j] / sum : p[j];
}

// Backward of topk_weights: dp_j from dw_j (with w the forward's weights).
template <class T>
void topk_weights_backward(T* dp, const T* dw, const T* w, const T* p, int64_t k,
                           bool renormalize) {
  if (!renormalize) {
    for (int64_t j = 0; j < k; ++j) dp[j] = dw[j];
    return;
  }
  T sum = T(kRenormEps), dot = 0;
  for (int64_t j = 0; j < k; ++j) {
    sum += p[j];
    dot += dw[j] * w[j];
  }
  for (int64_t j = 0; j < k; ++j) dp[j] = (dw[j] - dot) / sum;
}

// Softmax backward in place on one row: g <- p * (g - <p, g>).
template <class T>
void softmax_backward_row(T* g, const T* p, int64_t e) {
  T pg = 0;
  for (int64_t i = 0; i < e; ++i) pg += p[i] * g[i];
  for (int64_t i = 0; i < e; ++i) g[i] = p[i] * (g[i] - pg);
}

// The same, plus the z-loss gradient zl * p (zl = d_z * beta * 2 lse / N for this row).
template <class T>
void softmax_backward_row(T* g, const T* p, int64_t e, T zl) {
  softmax_backward_row(g, p, e);
  for (int64_t i = 0; i < e; ++i) g[i] += zl * p[i];
}

}  // namespace moe::routing
