// GShard top-2 gating (Lepikhin et al. 2021, Algorithm 1): the best two experts, weights
// normalized over the pair; in training the second expert is dispatched only with probability
// 2 * w2 (one uniform per token). The auxiliary loss uses the top-1 choices, per group of
// capacity_group tokens, averaged over the groups. Group capacity and the slot-major drop order
// are the layer's (capacity_group, drop_policy = slot).
#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class GshardRouter : public RouterImpl<GshardRouter> {
 public:
  using RouterImpl::RouterImpl;
  // With capacity groups, which then lie within a rank: the draws are one process's
  // (NoiseSource::set_share) and the losses' sums and counts go through RouterForward::batch.
  bool supports_expert_parallel() const override { return cfg_.capacity_group > 0; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts;
    Arena& arena = *f.arena;
    const auto [probs, lse] = arena_softmax<T>(arena, f.logits, N, E);
    int32_t* top = arena.alloc<int32_t>(N * 2);
    T* top_p = arena.alloc<T>(N * 2);
    T* w = arena.alloc<T>(N * 2);
    cpu::topk_rows<T>(top, top_p, probs, N, E, 2);
    for (int64_t t = 0; t < N; ++t) topk_weights(w + t * 2, top_p + t * 2, 2, true);
    T* u = arena.alloc<T>(N);
    std::fill_n(u, N, T(0));
    if (f.training) f.noise->uniform_tokens(u, N, 1);

    RoutingPlan<T> plan;
    plan.token_offsets = arena.alloc<int64_t>(N + 1);
    plan.expert = arena.alloc<int32_t>(2 * N);
    plan.weight = arena.alloc<T>(2 * N);
    plan.score = arena.alloc<T>(2 * N);
    int64_t p = 0;
    for (int64_t t = 0; t < N; ++t) {
      plan.token_offsets[t] = p;
      const bool second = !f.training || u[t] < 2 * w[t * 2 + 1];
      for (int64_t j = 0; j < (second ? 2 : 1); ++j, ++p) {
        plan.expert[p] = top[t * 2 + j];
        plan.weight[p] = w[t * 2 + j];
        plan.score[p] = top_p[t * 2 + j];
      }
    }
    plan.token_offsets[N] = p;
    plan.n_pairs = p;

    // Group-level auxiliary loss over the top-1 choices.
    const int64_t G = cfg_.capacity_group > 0 ? cfg_.capacity_group : N;
    MOE_CHECK(!f.batch || N % G == 0, "moe.gshard",
              "under expert parallelism each rank's {} tokens must be whole capacity groups of {}",
              N, G);
    const int64_t n_groups = G > 0 ? (N + G - 1) / G : 0;
    int64_t* top1 = arena.alloc<int64_t>(n_groups * E);
    std::fill_n(top1, n_groups * E, 0);
    for (int64_t t = 0; t < N; ++t) ++top1[(t / G) * E + top[t * 2]];
    double aux = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t t0 = g * G, size = std::min(N, t0 + G) - t0;
      aux += balance_loss(probs + t0 * E, top1 + g * E, size, size, E, cfg_.aux_loss_coef);
    }
    f.plan = plan;
    // The batch's [sum of the groups' losses, groups, sum of lse^2, tokens, entropy sum].
    double st[5] = {aux, static_cast<double>(n_groups), 0, static_cast<double>(N), 0};
    for (int64_t t = 0; t < N; ++t) st[2] += static_cast<double>(lse[t]) * lse[t];
    for (int64_t i = 0; i < N * E; ++i) {
      const double q = static_cast<double>(probs[i]);
      if (q > 0) st[4] -= q * std::log(q);
    }
    if (f.batch) f.batch->sum(st, 5);
    f.aux_loss = st[1] > 0 ? st[0] / st[1] : 0;
    f.z_loss = st[3] > 0 ? cfg_.z_loss_coef * st[2] / st[3] : 0;
    f.entropy = st[3] > 0 ? st[4] / st[3] : 0;
    s_ = {N,
          G,
          n_groups,
          static_cast<int64_t>(st[1]),
          static_cast<int64_t>(st[3]),
          probs,
          lse,
          top,
          top_p,
          w,
          top1,
          plan.token_offsets};
  }

  template <class T>
  void bwd(const T* dweight, double d_aux, double d_z, T* dlogits) {
    const int64_t N = s_.n, E = cfg_.n_experts;
    const T* probs = static_cast<const T*>(s_.probs);
    const T* lse = static_cast<const T*>(s_.lse);
    const T* top_p = static_cast<const T*>(s_.top_p);
    const T* w = static_cast<const T*>(s_.w);
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(s_.n_batch));
    for (int64_t t = 0; t < N; ++t) {
      T* g = dlogits + t * E;
      std::fill_n(g, E, T(0));
      const int64_t group = t / s_.group, t0 = group * s_.group;
      const int64_t size = std::min(N, t0 + s_.group) - t0;
      balance_loss_grad(g, s_.top1 + group * E, size, size, E, cfg_.aux_loss_coef,
                        d_aux / static_cast<double>(s_.groups_batch));
      // The weights depend on both probabilities even when the second expert is not dispatched.
      T dw[2] = {T(0), T(0)}, dp[2];
      for (int64_t p = s_.offsets[t]; p < s_.offsets[t + 1]; ++p)
        dw[p - s_.offsets[t]] = dweight[p];
      topk_weights_backward(dp, dw, w + t * 2, top_p + t * 2, 2, true);
      g[s_.top[t * 2]] += dp[0];
      g[s_.top[t * 2 + 1]] += dp[1];
      softmax_backward_row(g, probs + t * E, E, zs * lse[t]);
    }
  }

 private:
  struct Saved {
    int64_t n = 0, group = 0, n_groups = 0;
    int64_t groups_batch = 0, n_batch = 0;  // groups and tokens of the whole batch (all ranks)
    const void* probs = nullptr;            // [N, E]
    const void* lse = nullptr;              // [N]
    const int32_t* top = nullptr;           // [N, 2]
    const void* top_p = nullptr;            // [N, 2]
    const void* w = nullptr;                // [N, 2] normalized over the pair
    const int64_t* top1 = nullptr;          // [groups, E] top-1 counts
    const int64_t* offsets = nullptr;       // [N + 1] the plan's
  } s_;
};

}  // namespace

std::unique_ptr<Router> make_gshard(const MoeConfig& cfg) {
  return std::make_unique<GshardRouter>(cfg);
}

}  // namespace moe::routing
