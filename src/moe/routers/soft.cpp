// Dense soft gating (Jacobs, Jordan, Nowlan and Hinton 1991): every expert processes every token,
// weighted by the softmax of the router logits. The z-loss applies; there is nothing to balance.
#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class SoftRouter : public RouterImpl<SoftRouter> {
 public:
  using RouterImpl::RouterImpl;
  // Per token; the z-loss's statistics go through RouterForward::batch.
  bool supports_expert_parallel() const override { return true; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts;
    RoutingPlan<T> plan = uniform_plan<T>(*f.arena, N, E);
    Arena& arena = *f.arena;
    T* lse = arena.alloc<T>(N);
    cpu::softmax_rows<T>(plan.weight, lse, f.logits, N, E);
    for (int64_t p = 0; p < N * E; ++p) {
      plan.expert[p] = static_cast<int32_t>(p % E);
      plan.score[p] = plan.weight[p];
    }
    f.plan = plan;
    // The batch's [tokens, sum of lse^2, entropy sum], over the ranks sharing it.
    double st[3] = {static_cast<double>(N), 0, 0};
    for (int64_t t = 0; t < N; ++t) st[1] += static_cast<double>(lse[t]) * lse[t];
    for (int64_t i = 0; i < N * E; ++i) {
      const double p = static_cast<double>(plan.weight[i]);
      if (p > 0) st[2] -= p * std::log(p);
    }
    if (f.batch) f.batch->sum(st, 3);
    f.z_loss = st[0] > 0 ? cfg_.z_loss_coef * st[1] / st[0] : 0;
    f.entropy = st[0] > 0 ? st[2] / st[0] : 0;
    n_ = N;
    n_batch_ = static_cast<int64_t>(st[0]);
    probs_ = plan.weight;
    lse_ = lse;
  }

  template <class T>
  void bwd(const T* dweight, double /*d_aux*/, double d_z, T* dlogits) {
    const int64_t E = cfg_.n_experts;
    const T* probs = static_cast<const T*>(probs_);
    const T* lse = static_cast<const T*>(lse_);
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(n_batch_));
    for (int64_t t = 0; t < n_; ++t) {
      T* g = dlogits + t * E;
      std::copy_n(dweight + t * E, E, g);
      softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
    }
  }

 private:
  int64_t n_ = 0, n_batch_ = 0;  // tokens here, and in the whole batch
  const void* probs_ = nullptr;  // [N, E], also the plan's weights
  const void* lse_ = nullptr;    // [N]
};

}  // namespace

std::unique_ptr<Router> make_soft(const MoeConfig& cfg) {
  return std::make_unique<SoftRouter>(cfg);
}

}  // namespace moe::routing
