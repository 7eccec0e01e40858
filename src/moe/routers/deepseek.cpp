// DeepSeek-V3 routing (DeepSeek-AI 2024, section 2.1.2): sigmoid affinities s; a per-expert
// selection bias b (auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i) after
// each step) steers which experts are chosen but not their weights; group-limited selection
// (keep topk_group of n_group groups by the sum of each group's two best s + b, excluded groups
// masked with -inf); weights s over the selected, normalized when `renormalize`
// (norm_topk_prob), times routed_scaling_factor; the sequence-wise balance loss (eq. 17-20).
#include <cmath>
#include <limits>

#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class DeepseekRouter : public RouterImpl<DeepseekRouter> {
 public:
  explicit DeepseekRouter(const MoeConfig& cfg)
      : RouterImpl(cfg), bias_(static_cast<size_t>(cfg.n_experts), 0.0) {}
  std::vector<double>* selection_bias() override { return &bias_; }
  // With sequences of seq_len tokens, which then lie within a rank: the loss's sum over
  // sequences and their count go through RouterForward::batch (the bias update reads the
  // layer's counts, which are the whole batch's).
  bool supports_expert_parallel() const override { return cfg_.seq_len > 0; }

  void after_step(const std::vector<int64_t>& routed) override {
    double mean = 0;
    for (int64_t c : routed) mean += static_cast<double>(c);
    mean /= static_cast<double>(routed.size());
    for (size_t i = 0; i < bias_.size(); ++i) {
      const double d = mean - static_cast<double>(routed[i]);
      bias_[i] += cfg_.bias_update_rate * static_cast<double>((d > 0) - (d < 0));
    }
  }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts, K = cfg_.top_k;
    const int64_t NG = cfg_.n_group, GS = E / NG;
    Arena& arena = *f.arena;
    T* s = arena.alloc<T>(N * E);
    for (int64_t i = 0; i < N * E; ++i) s[i] = T(1) / (T(1) + std::exp(-f.logits[i]));
    RoutingPlan<T> plan = uniform_plan<T>(arena, N, K);
    T* sel_s = arena.alloc<T>(N * K);
    const int64_t TG = cfg_.topk_group;
    T* choice = arena.alloc<T>(E);
    T* gscore = arena.alloc<T>(NG);
    T* v = arena.alloc<T>(2);
    T* gval = arena.alloc<T>(TG);
    T* top_v = arena.alloc<T>(K);
    int32_t* vi = arena.alloc<int32_t>(2);
    int32_t* gkeep = arena.alloc<int32_t>(TG);
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t e = 0; e < E; ++e)
        choice[e] = s[t * E + e] + static_cast<T>(bias_[static_cast<size_t>(e)]);
      if (NG > 1) {
        for (int64_t g = 0; g < NG; ++g) {
          cpu::topk_rows<T>(vi, v, choice + g * GS, 1, GS, 2);
          gscore[g] = v[0] + v[1];
        }
        cpu::topk_rows<T>(gkeep, gval, gscore, 1, NG, TG);
        for (int64_t g = 0; g < NG; ++g) {
          if (std::find(gkeep, gkeep + TG, g) != gkeep + TG) continue;
          std::fill_n(choice + g * GS, GS, -std::numeric_limits<T>::infinity());
        }
      }
      cpu::topk_rows<T>(plan.expert + t * K, top_v, choice, 1, E, K);
      for (int64_t j = 0; j < K; ++j) sel_s[t * K + j] = s[t * E + plan.expert[t * K + j]];
      topk_weights(plan.weight + t * K, sel_s + t * K, K, cfg_.renormalize);
      for (int64_t j = 0; j < K; ++j) {
        plan.weight[t * K + j] *= static_cast<T>(cfg_.routed_scaling_factor);
        plan.score[t * K + j] = sel_s[t * K + j];
      }
    }
    // Sequence-wise balance loss, averaged over the sequences of the batch.
    const int64_t L = cfg_.seq_len > 0 ? cfg_.seq_len : N;
    MOE_CHECK(!f.batch || N % L == 0, "moe.deepseek",
              "under expert parallelism each rank's {} tokens must be whole sequences of {}", N, L);
    const int64_t n_seq = L > 0 ? (N + L - 1) / L : 0;
    int64_t* counts = arena.alloc<int64_t>(n_seq * E);
    std::fill_n(counts, n_seq * E, 0);
    for (int64_t p = 0; p < N * K; ++p) ++counts[(p / K / L) * E + plan.expert[p]];
    T* ssum = arena.alloc<T>(N);
    double loss = 0;
    for (int64_t q = 0; q < n_seq; ++q) {
      const int64_t t0 = q * L, t1 = std::min(N, t0 + L), T_ = t1 - t0;
      for (int64_t e = 0; e < E; ++e) {
        double pm = 0;
        for (int64_t t = t0; t < t1; ++t) {
          if (e == 0) {
            ssum[t] = T(kRenormEps);  // all E sigmoids can be 0 (logits of -1e30)
            for (int64_t i = 0; i < E; ++i) ssum[t] += s[t * E + i];
          }
          pm += static_cast<double>(s[t * E + e] / ssum[t]);
        }
        const double fi = static_cast<double>(E) / static_cast<double>(K * T_) *
                          static_cast<double>(counts[q * E + e]);
        loss += fi * pm / static_cast<double>(T_);
      }
    }
    f.plan = plan;
    // The batch's [sum of the sequences' losses, sequences, tokens, entropy sum].
    double st[4] = {loss, static_cast<double>(n_seq), static_cast<double>(N), 0};
    for (int64_t t = 0; t < N; ++t)
      for (int64_t e = 0; e < E; ++e) {
        const double p = static_cast<double>(s[t * E + e] / ssum[t]);
        if (p > 0) st[3] -= p * std::log(p);
      }
    if (f.batch) f.batch->sum(st, 4);
    f.aux_loss = st[1] > 0 ? cfg_.aux_loss_coef * st[0] / st[1] : 0;
    f.entropy = st[2] > 0 ? st[3] / st[2] : 0;
    sv_ = {N, L, static_cast<int64_t>(st[1]), s, sel_s, plan.expert, plan.weight, counts, ssum};
  }

  template <class T>
  void bwd(const T* dweight, double d_aux, double /*d_z*/, T* dlogits) {
    const int64_t N = sv_.n, E = cfg_.n_experts, K = cfg_.top_k;
    const T* s = static_cast<const T*>(sv_.s);
    const T* sel_s = static_cast<const T*>(sv_.sel_s);
    const T* weight = static_cast<const T*>(sv_.weight);
    const T* ssum = static_cast<const T*>(sv_.ssum);
    const T rsf = static_cast<T>(cfg_.routed_scaling_factor);
    T* du = scratch_.get<T>(3 * K + E);
    T* u = du + K;
    T* ds = u + K;
    T* dsn = ds + K;
    for (int64_t t = 0; t < N; ++t) {
      T* g = dlogits + t * E;
      std::fill_n(g, E, T(0));
      // w = rsf * u, u = s_sel (/ sum s_sel).
      for (int64_t j = 0; j < K; ++j) {
        du[j] = rsf * dweight[t * K + j];
        u[j] = weight[t * K + j] / rsf;
      }
      topk_weights_backward(ds, du, u, sel_s + t * K, K, cfg_.renormalize);
      for (int64_t j = 0; j < K; ++j) g[sv_.expert[t * K + j]] += ds[j];
      // Balance loss: P_i = mean_t s_ti / sum_j s_tj, weighted by f_i.
      const int64_t q = t / sv_.seq, t0 = q * sv_.seq, T_ = std::min(N, t0 + sv_.seq) - t0;
      const double scale =
          d_aux * cfg_.aux_loss_coef / static_cast<double>(sv_.n_seq) / static_cast<double>(T_);
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) {
        const double fi = static_cast<double>(E) / static_cast<double>(K * T_) *
                          static_cast<double>(sv_.counts[q * E + e]);
        dsn[e] = static_cast<T>(scale * fi);
        dot += dsn[e] * s[t * E + e] / ssum[t];
      }
      for (int64_t e = 0; e < E; ++e) g[e] += (dsn[e] - dot) / ssum[t];
      // s = sigmoid(l).
      for (int64_t e = 0; e < E; ++e) g[e] *= s[t * E + e] * (T(1) - s[t * E + e]);
    }
  }

 private:
  std::vector<double> bias_;  // [E] selection bias (e_score_correction_bias)
  Scratch scratch_;           // backward's per-token buffers
  struct Saved {
    int64_t n = 0, seq = 0, n_seq = 0;  // n_seq: the sequences of the whole batch (all ranks)
    const void* s = nullptr;            // [N, E] sigmoid affinities
    const void* sel_s = nullptr;        // [N, K] affinities of the selected experts
    const int32_t* expert = nullptr;    // [N, K]
    const void* weight = nullptr;       // [N, K]
    const int64_t* counts = nullptr;    // [sequences, E] selections per expert
    const void* ssum = nullptr;         // [N] sum of s over all experts
  } sv_;
};

}  // namespace

std::unique_ptr<Router> make_deepseek(const MoeConfig& cfg) {
  return std::make_unique<DeepseekRouter>(cfg);
}

}  // namespace moe::routing
