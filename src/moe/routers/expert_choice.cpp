// Expert-choice routing (Zhou et al. 2022): the softmax over experts scores every (token, expert)
// pair and each expert takes its C best tokens, C = min(N, ceil(N * CF / E)); a token gets the
// weight S_te from every expert that chose it, possibly none. Balanced by construction.
#include <cmath>
#include <vector>

#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class ExpertChoiceRouter : public RouterImpl<ExpertChoiceRouter> {
 public:
  using RouterImpl::RouterImpl;
  bool applies_capacity() const override { return true; }
  // Each expert chooses among the whole batch: the ranks' scores are gathered first (the same
  // selection on every rank), and each rank keeps the pairs of its own tokens.
  bool supports_expert_parallel() const override { return true; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts;
    Arena& arena = *f.arena;
    const auto [probs, lse] = arena_softmax<T>(arena, f.logits, N, E);
    // The whole batch's scores [Ng, E] (the ranks' tokens in rank order); this rank's tokens are
    // [first, first + N).
    const T* all = probs;
    int64_t Ng = N, first = 0;
    if (f.batch) {
      std::vector<int64_t> n(static_cast<size_t>(f.batch->size()));
      f.batch->allgather(&N, n.data(), sizeof(int64_t));
      Ng = 0;
      for (int q = 0; q < f.batch->size(); ++q) {
        if (q < f.batch->rank()) first += n[static_cast<size_t>(q)];
        Ng += n[static_cast<size_t>(q)];
      }
      T* gathered = arena.alloc<T>(Ng * E);  // zeros but for this rank's rows, then summed
      std::fill_n(gathered, Ng * E, T(0));
      std::copy_n(probs, N * E, gathered + first * E);
      f.batch->sum(gathered, Ng * E);
      all = gathered;
    }
    const int64_t C = std::min<int64_t>(
        Ng, static_cast<int64_t>(std::ceil(static_cast<double>(Ng) * cfg_.capacity_factor /
                                           static_cast<double>(E))));
    // Each expert's top C tokens (ties to the lower token index), from its column of S.
    T* column = arena.alloc<T>(Ng);
    T* val = arena.alloc<T>(C);
    int32_t* chosen = arena.alloc<int32_t>(E * C);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t = 0; t < Ng; ++t) column[t] = all[t * E + e];
      cpu::topk_rows<T>(chosen + e * C, val, column, 1, Ng, C);
    }
    // Regroup this rank's tokens' pairs by token: token t's pairs in expert order.
    auto mine = [&](int32_t t) { return t >= first && t < first + N; };
    RoutingPlan<T> plan;
    plan.token_offsets = arena.alloc<int64_t>(N + 1);
    std::fill_n(plan.token_offsets, N + 1, 0);
    for (int64_t i = 0; i < E * C; ++i)
      if (mine(chosen[i])) ++plan.token_offsets[chosen[i] - first + 1];
    for (int64_t t = 0; t < N; ++t) plan.token_offsets[t + 1] += plan.token_offsets[t];
    plan.n_pairs = plan.token_offsets[N];
    plan.expert = arena.alloc<int32_t>(plan.n_pairs);
    plan.weight = arena.alloc<T>(plan.n_pairs);
    plan.score = plan.weight;
    int64_t* fill = arena.alloc<int64_t>(N);
    std::copy_n(plan.token_offsets, N, fill);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t c = 0; c < C; ++c) {
        const int32_t tg = chosen[e * C + c];
        if (!mine(tg)) continue;
        const int64_t t = tg - first, p = fill[t]++;
        plan.expert[p] = static_cast<int32_t>(e);
        plan.weight[p] = probs[t * E + e];
      }
    f.plan = plan;
    // The batch's [tokens, sum of lse^2, entropy sum].
    double st[3] = {static_cast<double>(N), 0, 0};
    for (int64_t t = 0; t < N; ++t) st[1] += static_cast<double>(lse[t]) * lse[t];
    for (int64_t i = 0; i < N * E; ++i) {
      const double q = static_cast<double>(probs[i]);
      if (q > 0) st[2] -= q * std::log(q);
    }
    if (f.batch) f.batch->sum(st, 3);
    f.z_loss = st[0] > 0 ? cfg_.z_loss_coef * st[1] / st[0] : 0;
    f.entropy = st[0] > 0 ? st[2] / st[0] : 0;
    n_ = N;
    n_batch_ = Ng;
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
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(n_batch_));
    for (int64_t t = 0; t < n_; ++t) {
      T* g = dlogits + t * E;
      std::fill_n(g, E, T(0));
      for (int64_t p = plan_offsets_[t]; p < plan_offsets_[t + 1]; ++p)
        g[plan_expert_[p]] += dweight[p];
      softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
    }
  }

 private:
  int64_t n_ = 0, n_batch_ = 0;  // tokens here, and in the whole batch
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
