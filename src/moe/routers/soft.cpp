// Dense soft gating (Jacobs, Jordan, Nowlan and Hinton 1991): every expert processes every token,
// weighted by the softmax of the router logits. The z-loss applies; there is nothing to balance.
#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class SoftRouter : public RouterImpl<SoftRouter> {
 public:
  using RouterImpl::RouterImpl;

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
    f.z_loss = z_loss(lse, N, cfg_.z_loss_coef);
    f.entropy = mean_entropy(plan.weight, N, E);
    n_ = N;
    probs_ = plan.weight;
    lse_ = lse;
  }

  template <class T>
  void bwd(const T* dweight, double /*d_aux*/, double d_z, T* dlogits) {
    const int64_t E = cfg_.n_experts;
    const T* probs = static_cast<const T*>(probs_);
    const T* lse = static_cast<const T*>(lse_);
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(n_));
    for (int64_t t = 0; t < n_; ++t) {
      T* g = dlogits + t * E;
      std::copy_n(dweight + t * E, E, g);
      softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
    }
  }

 private:
  int64_t n_ = 0;
  const void* probs_ = nullptr;  // [N, E], also the plan's weights
  const void* lse_ = nullptr;    // [N]
};

}  // namespace

std::unique_ptr<Router> make_soft(const MoeConfig& cfg) {
  return std::make_unique<SoftRouter>(cfg);
}

}  // namespace moe::routing
