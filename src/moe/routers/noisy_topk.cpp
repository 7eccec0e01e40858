// Noisy top-k gating (Shazeer et al. 2017, section 2.1 and appendix A). The router has 2E rows:
// clean logits c and noise logits n. H = c + eps * softplus(n) with eps ~ N(0, 1) in training;
// the gates are the softmax over the top K of H. Balancing: w (CV(Importance)^2 + CV(Load)^2),
// with Load the smooth estimate of the number of tokens each expert receives.
#include <algorithm>
#include <cmath>

#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

template <class T>
T softplus(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}

// The noise scale's floor: softplus(n) underflows to 0 for very negative noise logits, and the
// load estimator's (c - theta) / sigma would be 0 / 0. Below it (n < about -13.8) sigma is held
// at the floor, the estimate becomes a near step function, and n gets no gradient.
constexpr double kMinSigma = 1e-6;

// CV(v)^2 = var(v) / (mean(v)^2 + 1e-10) (population variance), and its gradient into g.
double cv_squared(const std::vector<double>& v, std::vector<double>* g) {
  const double n = static_cast<double>(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= n;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double den = mean * mean + 1e-10;
  if (g) {
    g->resize(v.size());
    for (size_t i = 0; i < v.size(); ++i)
      (*g)[i] = 2 * (v[i] - mean) / (n * den) - 2 * mean * var / (n * den * den);
  }
  return var / den;
}

class NoisyTopkRouter : public RouterImpl<NoisyTopkRouter> {
 public:
  using RouterImpl::RouterImpl;
  int64_t logit_rows() const override { return 2 * cfg_.n_experts; }
  // Per token (its noise drawn as one process draws it, NoiseSource::set_share); Importance and
  // Load are sums over the batch, through RouterForward::batch.
  bool supports_expert_parallel() const override { return true; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts, K = cfg_.top_k, R = 2 * E;
    Arena& arena = *f.arena;
    T* eps = arena.alloc<T>(N * E);
    if (f.training) {
      f.noise->normal_tokens(eps, N, E);
    } else {
      std::fill_n(eps, N * E, T(0));
    }
    T* sigma = arena.alloc<T>(N * E);
    T* h = arena.alloc<T>(N * E);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = t * E + e;
        sigma[i] = std::max(softplus(f.logits[t * R + E + e]), static_cast<T>(kMinSigma));
        h[i] = f.logits[t * R + e] + eps[i] * sigma[i];
      }
    // Top K + 1 of H: the kept experts and the two thresholds of the load estimator.
    int32_t* top = arena.alloc<int32_t>(N * (K + 1));
    T* top_h = arena.alloc<T>(N * (K + 1));
    cpu::topk_rows<T>(top, top_h, h, N, E, K + 1);
    top_ = top;
    RoutingPlan<T> plan = uniform_plan<T>(arena, N, K);
    std::vector<double>& importance = importance_;
    std::vector<double>& load = load_;
    importance.assign(static_cast<size_t>(E), 0.0);
    load.assign(static_cast<size_t>(E), 0.0);
    for (int64_t t = 0; t < N; ++t) {
      const T mx = top_h[t * (K + 1)];
      T sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += std::exp(top_h[t * (K + 1) + j] - mx);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t p = t * K + j;
        plan.expert[p] = top[t * (K + 1) + j];
        plan.weight[p] = std::exp(top_h[t * (K + 1) + j] - mx) / sum;
        plan.score[p] = plan.weight[p];
        importance[static_cast<size_t>(plan.expert[p])] += static_cast<double>(plan.weight[p]);
      }
      for (int64_t e = 0; e < E; ++e) {
        const double z =
            static_cast<double>((f.logits[t * R + e] - threshold(top_h, t, e)) / sigma[t * E + e]);
        load[static_cast<size_t>(e)] += 0.5 * std::erfc(-z / std::sqrt(2.0));
      }
    }
    f.plan = plan;
    // The gates' entropy (zero off the top K), summed with the token count over the batch.
    double ent[2] = {static_cast<double>(N), 0};
    for (int64_t i = 0; i < N * K; ++i) {
      const double p = static_cast<double>(plan.weight[i]);
      if (p > 0) ent[1] -= p * std::log(p);
    }
    if (f.batch) {
      f.batch->sum(importance.data(), E);
      f.batch->sum(load.data(), E);
      f.batch->sum(ent, 2);
    }
    f.entropy = ent[0] > 0 ? ent[1] / ent[0] : 0;
    f.aux_loss =
        cfg_.aux_loss_coef * (cv_squared(importance, &g_importance_) + cv_squared(load, &g_load_));
    n_ = N;
    eps_ = eps;
    sigma_ = sigma;
    top_h_ = top_h;
    logits_ = f.logits;
    weight_ = plan.weight;
  }

  template <class T>
  void bwd(const T* dweight, double d_aux, double /*d_z*/, T* dlogits) {
    const int64_t N = n_, E = cfg_.n_experts, K = cfg_.top_k, R = 2 * E;
    const T* eps = static_cast<const T*>(eps_);
    const T* sigma = static_cast<const T*>(sigma_);
    const T* top_h = static_cast<const T*>(top_h_);
    const T* logits = static_cast<const T*>(logits_);
    const T* weight = static_cast<const T*>(weight_);
    const double a = d_aux * cfg_.aux_loss_coef;
    T* dh = scratch_.get<T>(2 * E + K);
    T* dsigma = dh + E;
    T* dg = dsigma + E;
    for (int64_t t = 0; t < N; ++t) {
      T* dc = dlogits + t * R;
      T* dn = dlogits + t * R + E;
      std::fill_n(dc, E, T(0));
      std::fill_n(dh, E, T(0));
      std::fill_n(dsigma, E, T(0));
      // Gates: softmax over the kept H, with the importance loss on every gate.
      T dot = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int32_t e = top_[t * (K + 1) + j];
        dg[j] = dweight[t * K + j] + static_cast<T>(a * g_importance_[static_cast<size_t>(e)]);
        dot += dg[j] * weight[t * K + j];
      }
      for (int64_t j = 0; j < K; ++j)
        dh[top_[t * (K + 1) + j]] += weight[t * K + j] * (dg[j] - dot);
      // Load: P_te = Phi((c_te - theta_te) / sigma_te).
      for (int64_t e = 0; e < E; ++e) {
        const T theta = threshold(top_h, t, e);
        const T s = sigma[t * E + e];
        const T z = (logits[t * R + e] - theta) / s;
        const T dz = static_cast<T>(a * g_load_[static_cast<size_t>(e)]) *
                     std::exp(T(-0.5) * z * z) / std::sqrt(T(2 * M_PI));
        dc[e] += dz / s;
        dh[threshold_index(t, e)] -= dz / s;
        dsigma[e] -= dz * z / s;
      }
      // H = c + eps * sigma, sigma = softplus(n).
      for (int64_t e = 0; e < E; ++e) {
        dc[e] += dh[e];
        dsigma[e] += dh[e] * eps[t * E + e];
        const T nv = logits[t * R + E + e];
        dn[e] =
            softplus(nv) > static_cast<T>(kMinSigma) ? dsigma[e] / (T(1) + std::exp(-nv)) : T(0);
      }
    }
  }

 private:
  // theta_te: the (K+1)-th largest H_t if e is among the top K, else the K-th largest.
  bool in_top(int64_t t, int64_t e) const {
    for (int64_t j = 0; j < cfg_.top_k; ++j)
      if (top_[t * (cfg_.top_k + 1) + j] == e) return true;
    return false;
  }
  int32_t threshold_index(int64_t t, int64_t e) const {
    const int64_t K = cfg_.top_k;
    return top_[t * (K + 1) + (in_top(t, e) ? K : K - 1)];
  }
  template <class T>
  T threshold(const T* top_h, int64_t t, int64_t e) const {
    const int64_t K = cfg_.top_k;
    return top_h[t * (K + 1) + (in_top(t, e) ? K : K - 1)];
  }

  int64_t n_ = 0;
  const void* eps_ = nullptr;                  // [N, E]
  const void* sigma_ = nullptr;                // [N, E]
  const int32_t* top_ = nullptr;               // [N, K + 1]
  const void* top_h_ = nullptr;                // [N, K + 1]
  const void* logits_ = nullptr;               // [N, 2E]
  const void* weight_ = nullptr;               // [N, K]
  std::vector<double> g_importance_, g_load_;  // d loss / d Importance, d Load (per coef)
  std::vector<double> importance_, load_;      // [E], reused by every forward
  Scratch scratch_;                            // backward's per-token buffers
};

}  // namespace

std::unique_ptr<Router> make_noisy_topk(const MoeConfig& cfg) {
  return std::make_unique<NoisyTopkRouter>(cfg);
}

}  // namespace moe::routing
