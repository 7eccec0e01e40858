// Softmax top-k routing (Shazeer et al. 2017 without the noise; Switch Transformer with K = 1;
// Mixtral with renormalization), with optional exploration: in training, each slot's expert is
// replaced with probability explore_prob by a uniformly drawn expert the token does not use yet.
#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class TopkRouter : public RouterImpl<TopkRouter> {
 public:
  using RouterImpl::RouterImpl;
  bool supports_expert_parallel() const override { return true; }
  void end_step() override { window_.clear(); }
  template <class T>
  void fwd(RouterForward<T>& f);
  template <class T>
  void bwd(const T* dweight, double d_aux, double d_z, T* dlogits);

 private:
  template <class T>
  void explore(RoutingPlan<T>& plan, const T* probs, int64_t n, NoiseSource& noise, Arena& arena);

  struct Saved {
    int64_t n = 0;                    // tokens here
    int64_t n_batch = 0;              // tokens of the whole batch (all ranks)
    const void* probs = nullptr;      // [N, E]
    const void* lse = nullptr;        // [N]
    const int32_t* expert = nullptr;  // [N, K]
    const void* top_p = nullptr;      // [N, K]
    const void* weight = nullptr;     // [N, K]
    const int64_t* counts = nullptr;  // [E] the counts f is made of (global_balance: the window's)
    int64_t n_f = 0;                  // the tokens f is made of
  } saved_;
  // global_balance: the step's training micro-batches so far, [counts E | tokens] (end_step
  // clears it).
  std::vector<double> window_;
  // The device-level loss's f'_d of the last forward, one per device.
  std::vector<double> device_f_;
  Scratch scratch_;  // backward's per-token buffers
};

template <class T>
void TopkRouter::fwd(RouterForward<T>& f) {
  const int64_t N = f.n_tokens, E = cfg_.n_experts, K = cfg_.top_k;
  Arena& arena = *f.arena;
  const auto [probs, lse] = arena_softmax<T>(arena, f.logits, N, E);
  RoutingPlan<T> plan = uniform_plan<T>(arena, N, K);
  cpu::topk_rows<T>(plan.expert, plan.score, probs, N, E, K);
  if (f.training && cfg_.explore_prob > 0 && K < E) explore(plan, probs, N, *f.noise, arena);
  // The batch's statistics [counts E | probability sums E | tokens, sum of lse^2, entropy sum],
  // summed over the ranks sharing the batch under expert parallelism.
  double* st = arena.alloc<double>(2 * E + 3);
  std::fill_n(st, 2 * E + 3, 0.0);
  for (int64_t p = 0; p < N * K; ++p) st[plan.expert[p]] += 1;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < N; ++t) st[E + e] += static_cast<double>(probs[t * E + e]);
  st[2 * E] = static_cast<double>(N);
  for (int64_t t = 0; t < N; ++t) st[2 * E + 1] += static_cast<double>(lse[t]) * lse[t];
  for (int64_t i = 0; i < N * E; ++i) {
    const double p = static_cast<double>(probs[i]);
    if (p > 0) st[2 * E + 2] -= p * std::log(p);
  }
  if (f.batch) f.batch->sum(st, 2 * E + 3);
  const double n = st[2 * E];
  // f's counts: this batch's, or with global_balance those of the step's micro-batches so far.
  const double* cf = st;
  double nf = n;
  if (cfg_.global_balance && f.training) {
    if (window_.empty()) window_.assign(static_cast<size_t>(E) + 1, 0.0);
    for (int64_t e = 0; e < E; ++e) window_[static_cast<size_t>(e)] += st[e];
    window_[static_cast<size_t>(E)] += n;
    cf = window_.data();
    nf = window_[static_cast<size_t>(E)];
  }
  int64_t* counts = arena.alloc<int64_t>(E);
  for (int64_t e = 0; e < E; ++e) counts[e] = static_cast<int64_t>(cf[e]);
  const T rsf = static_cast<T>(cfg_.routed_scaling_factor);
  for (int64_t t = 0; t < N; ++t) {
    topk_weights(plan.weight + t * K, plan.score + t * K, K, cfg_.renormalize);
    for (int64_t j = 0; j < K; ++j) plan.weight[t * K + j] *= rsf;
  }
  f.plan = plan;
  // Switch loss coef * E * sum_i f_i P_i, z-loss coef * mean lse^2 (common.h), over the batch.
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) aux += cf[e] / (nf * static_cast<double>(K)) * st[E + e] / n;
  f.aux_loss = n > 0 ? cfg_.aux_loss_coef * static_cast<double>(E) * aux : 0;
  if (cfg_.device_aux_loss_coef > 0 && n > 0) {
    // DeepSeek-V2's device-level loss: sum_d f'_d P'_d over groups of E / n_devices experts.
    const int64_t G = E / cfg_.n_devices;
    device_f_.assign(static_cast<size_t>(cfg_.n_devices), 0.0);
    double dev = 0;
    for (int64_t d = 0; d < cfg_.n_devices; ++d) {
      double fd = 0, pd = 0;
      for (int64_t e = d * G; e < (d + 1) * G; ++e) {
        fd += cf[e] * static_cast<double>(E) / (nf * static_cast<double>(K));
        pd += st[E + e] / n;
      }
      device_f_[static_cast<size_t>(d)] = fd;
      dev += fd / static_cast<double>(G) * pd;
    }
    f.aux_loss += cfg_.device_aux_loss_coef * dev;
  }
  f.z_loss = n > 0 ? cfg_.z_loss_coef * st[2 * E + 1] / n : 0;
  f.entropy = n > 0 ? st[2 * E + 2] / n : 0;
  saved_ = {N,      static_cast<int64_t>(n), probs, lse, plan.expert, plan.score, plan.weight,
            counts, static_cast<int64_t>(nf)};
}

template <class T>
void TopkRouter::explore(RoutingPlan<T>& plan, const T* probs, int64_t n, NoiseSource& noise,
                         Arena& arena) {
  // Two uniforms per slot, all drawn up front: u decides whether to replace, r which expert.
  const int64_t E = cfg_.n_experts, K = cfg_.top_k;
  T* u = arena.alloc<T>(2 * n * K);
  noise.uniform_tokens(u, n, K);
  noise.uniform_tokens(u + n * K, n, K);
  uint8_t* used = arena.alloc<uint8_t>(E);
  for (int64_t t = 0; t < n; ++t) {
    std::fill_n(used, E, uint8_t{0});
    for (int64_t j = 0; j < K; ++j) used[plan.expert[t * K + j]] = 1;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = t * K + j;
      if (!(u[p] < static_cast<T>(cfg_.explore_prob))) continue;
      // The r-th unused expert in index order, r uniform over the E - K unused ones.
      const T r = u[n * K + p];
      int64_t pick = std::min<int64_t>(static_cast<int64_t>(r * static_cast<T>(E - K)), E - K - 1);
      int64_t e = 0;
      for (;; ++e)
        if (!used[e] && pick-- == 0) break;
      used[plan.expert[p]] = 0;
      used[e] = 1;
      plan.expert[p] = static_cast<int32_t>(e);
      plan.score[p] = probs[t * E + e];
    }
  }
}

template <class T>
void TopkRouter::bwd(const T* dweight, double d_aux, double d_z, T* dlogits) {
  const int64_t N = saved_.n, E = cfg_.n_experts, K = cfg_.top_k;
  const T* probs = static_cast<const T*>(saved_.probs);
  const T* lse = static_cast<const T*>(saved_.lse);
  const T* top_p = static_cast<const T*>(saved_.top_p);
  const T* weight = static_cast<const T*>(saved_.weight);
  const int64_t Nb = saved_.n_batch;
  const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(Nb));
  // w = rsf * u with u the (renormalized) top-k probabilities.
  const T rsf = static_cast<T>(cfg_.routed_scaling_factor);
  T* dp = scratch_.get<T>(3 * K + E);
  T* du = dp + K;
  T* u = du + K;
  // The device-level loss's gradient w.r.t. a token's probabilities, the same for every token:
  // d_aux * coef * f'_d / N for each expert of device d.
  T* dev = u + K;
  const bool device_loss = cfg_.device_aux_loss_coef > 0 && N > 0;
  if (device_loss) {
    const int64_t G = E / cfg_.n_devices;
    for (int64_t e = 0; e < E; ++e)
      dev[e] =
          static_cast<T>(d_aux * cfg_.device_aux_loss_coef * device_f_[static_cast<size_t>(e / G)] /
                         static_cast<double>(G) / static_cast<double>(Nb));
  }
  for (int64_t t = 0; t < N; ++t) {
    T* g = dlogits + t * E;
    std::fill_n(g, E, T(0));
    balance_loss_grad(g, saved_.counts, saved_.n_f * K, Nb, E, cfg_.aux_loss_coef, d_aux);
    if (device_loss)
      for (int64_t e = 0; e < E; ++e) g[e] += dev[e];
    for (int64_t j = 0; j < K; ++j) {
      du[j] = rsf * dweight[t * K + j];
      u[j] = weight[t * K + j] / rsf;
    }
    topk_weights_backward(dp, du, u, top_p + t * K, K, cfg_.renormalize);
    for (int64_t j = 0; j < K; ++j) g[saved_.expert[t * K + j]] += dp[j];
    softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
  }
}

}  // namespace

std::unique_ptr<Router> make_topk(const MoeConfig& cfg) {
  return std::make_unique<TopkRouter>(cfg);
}

}  // namespace moe::routing
