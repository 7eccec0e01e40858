// Expert-choice routing (Zhou et al. 2022): the softmax over experts scores every (token, expert)
// pair and each expert takes its C best tokens, C = min(N, ceil(N * CF / E)); a token gets the
// weight S_te from every expert that chose it, possibly none. Balanced by construction.
#include <cmath>

#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class ExpertChoiceRouter : public RouterImpl<ExpertChoiceRouter> {
 public:
  using RouterImpl::RouterImpl;
  bool applies_capacity() const override { return true; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts;
    Arena& arena = *f.arena;
    const auto [probs, lse] = arena_softmax<T>(arena, f.logits, N, E);
    const int64_t C = std::min<int64_t>(
        N, static_cast<int64_t>(
               std::ceil(static_cast<double>(N) * cfg_.capacity_factor / static_cast<double>(E))));
    // Each expert's top C tokens (ties to the lower token index), from its column of S.
    T* column = arena.alloc<T>(N);
    T* val = arena.alloc<T>(C);
    int32_t* chosen = arena.alloc<int32_t>(E * C);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t = 0; t < N; ++t) column[t] = probs[t * E + e];
      cpu::topk_rows<T>(chosen + e * C, val, column, 1, N, C);
    }
    // Regroup by token: token t's pairs in expert order.
    RoutingPlan<T> plan;
    plan.n_pairs = E * C;
    plan.token_offsets = arena.alloc<int64_t>(N + 1);
    std::fill_n(plan.token_offsets, N + 1, 0);
    for (int64_t i = 0; i < E * C; ++i) ++plan.token_offsets[chosen[i] + 1];
    for (int64_t t = 0; t < N; ++t) plan.token_offsets[t + 1] += plan.token_offsets[t];
    plan.expert = arena.alloc<int32_t>(plan.n_pairs);
    plan.weight = arena.alloc<T>(plan.n_pairs);
    plan.score = plan.weight;
    int64_t* fill = arena.alloc<int64_t>(N);
    std::copy_n(plan.token_offsets, N, fill);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t c = 0; c < C; ++c) {
        const int32_t t = chosen[e * C + c];
        const int64_t p = fill[t]++;
        plan.expert[p] = static_cast<int32_t>(e);
        plan.weight[p] = probs[t * E + e];
      }
    f.plan = plan;
    f.z_loss = z_loss(lse, N, cfg_.z_loss_coef);
    f.entropy = mean_entropy(probs, N, E);
    n_ = N;
    probs_ = probs;
    lse_ = lse;
    plan_offsets_ = plan.token_offsets;
    plan_expert_ = plan.expert;
  }

  template <class T>
  void bwd(const T* dweight, double /*d_aux*/, double d_z, T* dlogits) {
    const int64_t E = cfg_.n_experts;
    const T* probs = static_cast<const T*>(probs_);
    const T* lse = static_cast<const T*>(lse_);
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(n_));
    for (int64_t t = 0; t < n_; ++t) {
      T* g = dlogits + t * E;
      std::fill_n(g, E, T(0));
      for (int64_t p = plan_offsets_[t]; p < plan_offsets_[t + 1]; ++p)
        g[plan_expert_[p]] += dweight[p];
      softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
    }
  }

 private:
  int64_t n_ = 0;
  const void* probs_ = nullptr;  // [N, E]
  const void* lse_ = nullptr;    // [N]
  const int64_t* plan_offsets_ = nullptr;
  const int32_t* plan_expert_ = nullptr;
};

}  // namespace

std::unique_ptr<Router> make_expert_choice(const MoeConfig& cfg) {
  return std::make_unique<ExpertChoiceRouter>(cfg);
}

}  // namespace moe::routing
