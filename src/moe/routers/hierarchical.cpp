// Hierarchical mixture of experts (Jordan and Jacobs 1994), two levels: rows 0..G-1 of the router
// score G groups, row G + i scores expert i inside its group (E / G experts per group). The leaf
// weight is the product of the gate probabilities along the path. Sparse variants keep the top
// hme_group_k groups and the top hme_expert_k experts in each, renormalized when `renormalize`.
// The z-loss covers every softmax of the tree.
#include "moe/routers/common.h"
#include "moe/routers/routers.h"

namespace moe::routing {

namespace {

class HierarchicalRouter : public RouterImpl<HierarchicalRouter> {
 public:
  explicit HierarchicalRouter(const MoeConfig& cfg)
      : RouterImpl(cfg),
        G_(cfg.hme_groups),
        B_(cfg.n_experts / cfg.hme_groups),
        k1_(cfg.hme_group_k > 0 ? cfg.hme_group_k : G_),
        k2_(cfg.hme_expert_k > 0 ? cfg.hme_expert_k : B_) {}
  int64_t logit_rows() const override { return G_ + cfg_.n_experts; }
  // Per token; the z-loss's and entropy's sums go through RouterForward::batch.
  bool supports_expert_parallel() const override { return true; }

  template <class T>
  void fwd(RouterForward<T>& f) {
    const int64_t N = f.n_tokens, E = cfg_.n_experts, R = G_ + E;
    Arena& arena = *f.arena;
    // probs [N, G + E]: the group softmax, then each group's expert softmax; lse [N, 1 + G].
    T* probs = arena.alloc<T>(N * R);
    T* lse = arena.alloc<T>(N * (1 + G_));
    for (int64_t t = 0; t < N; ++t) {
      cpu::softmax_rows<T>(probs + t * R, lse + t * (1 + G_), f.logits + t * R, 1, G_);
      cpu::softmax_rows<T>(probs + t * R + G_, lse + t * (1 + G_) + 1, f.logits + t * R + G_, G_,
                           B_);
    }
    // Kept groups and experts, with their (renormalized) level weights.
    int32_t* gsel = arena.alloc<int32_t>(N * k1_);
    T* gp = arena.alloc<T>(N * k1_);
    T* gw = arena.alloc<T>(N * k1_);
    int32_t* esel = arena.alloc<int32_t>(N * k1_ * k2_);  // index within the group
    T* ep = arena.alloc<T>(N * k1_ * k2_);
    T* ew = arena.alloc<T>(N * k1_ * k2_);
    RoutingPlan<T> plan = uniform_plan<T>(arena, N, k1_ * k2_);
    for (int64_t t = 0; t < N; ++t) {
      const T* q = probs + t * R;
      cpu::topk_rows<T>(gsel + t * k1_, gp + t * k1_, q, 1, G_, k1_);
      topk_weights(gw + t * k1_, gp + t * k1_, k1_, cfg_.renormalize);
      for (int64_t a = 0; a < k1_; ++a) {
        const int64_t g = gsel[t * k1_ + a], base = (t * k1_ + a) * k2_;
        cpu::topk_rows<T>(esel + base, ep + base, q + G_ + g * B_, 1, B_, k2_);
        topk_weights(ew + base, ep + base, k2_, cfg_.renormalize);
        for (int64_t b = 0; b < k2_; ++b) {
          const int64_t p = base + b;
          plan.expert[p] = static_cast<int32_t>(g * B_ + esel[p]);
          plan.weight[p] = gw[t * k1_ + a] * ew[p];
          plan.score[p] = plan.weight[p];
        }
      }
    }
    f.plan = plan;
    // The batch's [tokens, sum of every tree softmax's lse^2, entropy sum].
    double st[3] = {static_cast<double>(N), 0, tree_entropy_sum(probs, N)};
    for (int64_t i = 0; i < N * (1 + G_); ++i) st[1] += static_cast<double>(lse[i]) * lse[i];
    if (f.batch) f.batch->sum(st, 3);
    const double nl = st[0] * static_cast<double>(1 + G_);  // the softmaxes of the batch
    f.z_loss = st[0] > 0 ? cfg_.z_loss_coef * st[1] / nl * static_cast<double>(1 + G_) : 0;
    f.entropy = st[0] > 0 ? st[2] / st[0] : 0;
    s_ = {N, static_cast<int64_t>(st[0]), probs, lse, gsel, gp, gw, esel, ep, ew};
  }

  template <class T>
  void bwd(const T* dweight, double /*d_aux*/, double d_z, T* dlogits) {
    const int64_t N = s_.n, R = G_ + cfg_.n_experts;
    const T* probs = static_cast<const T*>(s_.probs);
    const T* lse = static_cast<const T*>(s_.lse);
    const T* gp = static_cast<const T*>(s_.gp);
    const T* gw = static_cast<const T*>(s_.gw);
    const T* ep = static_cast<const T*>(s_.ep);
    const T* ew = static_cast<const T*>(s_.ew);
    const T zs = static_cast<T>(d_z * cfg_.z_loss_coef * 2.0 / static_cast<double>(s_.n_batch));
    T* dgw = scratch_.get<T>(2 * k1_ + 2 * k2_);
    T* dgp = dgw + k1_;
    T* dew = dgp + k1_;
    T* dep = dew + k2_;
    for (int64_t t = 0; t < N; ++t) {
      T* g = dlogits + t * R;
      std::fill_n(g, R, T(0));
      for (int64_t a = 0; a < k1_; ++a) {
        const int64_t grp = s_.gsel[t * k1_ + a], base = (t * k1_ + a) * k2_;
        dgw[a] = 0;
        for (int64_t b = 0; b < k2_; ++b) {
          dgw[a] += dweight[base + b] * ew[base + b];
          dew[b] = dweight[base + b] * gw[t * k1_ + a];
        }
        topk_weights_backward(dep, dew, ew + base, ep + base, k2_, cfg_.renormalize);
        for (int64_t b = 0; b < k2_; ++b) g[G_ + grp * B_ + s_.esel[base + b]] += dep[b];
      }
      topk_weights_backward(dgp, dgw, gw + t * k1_, gp + t * k1_, k1_, cfg_.renormalize);
      for (int64_t a = 0; a < k1_; ++a) g[s_.gsel[t * k1_ + a]] += dgp[a];
      // Softmax backward and z-loss for the group softmax and each group's expert softmax.
      for (int64_t level = 0; level <= G_; ++level) {
        const int64_t off = level == 0 ? 0 : G_ + (level - 1) * B_, n = level == 0 ? G_ : B_;
        softmax_backward_row(g + off, probs + t * R + off, n, zs * lse[t * (1 + G_) + level]);
      }
    }
  }

 private:
  // Mean entropy of the leaf distribution q_g * r_i (nats).
  template <class T>
  double tree_entropy_sum(const T* probs, int64_t n) const {
    const int64_t R = G_ + cfg_.n_experts;
    double h = 0;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < cfg_.n_experts; ++i) {
        const double p = static_cast<double>(probs[t * R + i / B_] * probs[t * R + G_ + i]);
        if (p > 0) h -= p * std::log(p);
      }
    return h;
  }

  int64_t G_, B_, k1_, k2_;
  struct Saved {
    int64_t n = 0, n_batch = 0;     // tokens here, and in the whole batch (all ranks)
    const void* probs = nullptr;    // [N, G + E]
    const void* lse = nullptr;      // [N, 1 + G]
    const int32_t* gsel = nullptr;  // [N, k1]
    const void* gp = nullptr;       // [N, k1]
    const void* gw = nullptr;       // [N, k1]
    const int32_t* esel = nullptr;  // [N, k1, k2]
    const void* ep = nullptr;       // [N, k1, k2]
    const void* ew = nullptr;       // [N, k1, k2]
  } s_;
  Scratch scratch_;  // backward's per-token buffers
};

}  // namespace

std::unique_ptr<Router> make_hierarchical(const MoeConfig& cfg) {
  return std::make_unique<HierarchicalRouter>(cfg);
}

}  // namespace moe::routing
