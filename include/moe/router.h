// moe/router.h: the router interface. A router turns the router logits of N tokens into a
// routing plan (which experts each token goes to, with which differentiable weights) and its
// balancing losses, and back-propagates weight and loss gradients into the logits.
//
// The layer owns everything around it: logits = x W_r^T (one GEMM over all the router's rows),
// dispatch, capacity, experts, combine, and dW_r, dx from the logit gradient. A router is thus
// a small piece of per-token math; adding one means a file in src/moe/routers/, a line in
// registry.cpp, its section in docs/routing.md and its test cases.
#pragma once

#include <memory>
#include <vector>

#include "moe/arena.h"
#include "moe/dist.h"
#include "moe/moe_config.h"
#include "moe/rng.h"

namespace moe {

// What a router decided, in the arena. Pairs are grouped by token: token t's pairs are
// token_offsets[t] .. token_offsets[t + 1]; a token may have any number (expert choice), and
// each expert appears at most once per token.
template <class T>
struct RoutingPlan {
  int64_t n_pairs = 0;
  int64_t* token_offsets = nullptr;  // [N + 1]
  int32_t* expert = nullptr;         // [P]
  T* weight = nullptr;               // [P] combine weight
  T* score = nullptr;                // [P] priority for capacity dropping by score
};

// Where routing randomness comes from: the layer's Rng, or fixed values replayed in order
// (so that a test can hand the same draws to an outside reference).
class NoiseSource {
 public:
  NoiseSource() = default;
  explicit NoiseSource(Rng* rng) : rng_(rng) {}
  // Replays `normal` and `uniform` (each consumed in order) instead of drawing.
  NoiseSource(const std::vector<double>* normal, const std::vector<double>* uniform)
      : normal_(normal), uniform_(uniform) {}
  template <class T>
  void normal(T* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(next(true));
  }
  template <class T>
  void uniform(T* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(next(false));
  }
  // Under expert parallelism this rank holds tokens [offset, offset + n) of a batch of `total`
  // (the ranks' tokens in rank order). Per-token draws then take the whole batch's values in one
  // process's order and keep this rank's, so every rank's stream advances alike and the draws
  // are those of one process running the whole batch.
  void set_share(int64_t offset, int64_t n, int64_t total) { share_ = {offset, n, total}; }
  // per_token values for each of n_tokens tokens, token-major (normal or uniform).
  template <class T>
  void normal_tokens(T* out, int64_t n_tokens, int64_t per_token) {
    tokens(out, n_tokens, per_token, true);
  }
  template <class T>
  void uniform_tokens(T* out, int64_t n_tokens, int64_t per_token) {
    tokens(out, n_tokens, per_token, false);
  }

 private:
  double next(bool normal);
  template <class T>
  void tokens(T* out, int64_t n_tokens, int64_t per_token, bool normal) {
    if (share_.total < 0) {
      for (int64_t i = 0; i < n_tokens * per_token; ++i) out[i] = static_cast<T>(next(normal));
      return;
    }
    share_check(n_tokens);
    const int64_t lo = share_.offset * per_token, hi = lo + n_tokens * per_token;
    for (int64_t i = 0; i < share_.total * per_token; ++i) {
      const double v = next(normal);
      if (i >= lo && i < hi) out[i - lo] = static_cast<T>(v);
    }
  }
  void share_check(int64_t n_tokens) const;
  struct Share {
    int64_t offset = 0, n = 0, total = -1;  // total < 0: no share set
  } share_;
  Rng* rng_ = nullptr;
  const std::vector<double>* normal_ = nullptr;
  const std::vector<double>* uniform_ = nullptr;
  size_t normal_pos_ = 0, uniform_pos_ = 0;
};

template <class T>
struct RouterForward {
  // inputs
  int64_t n_tokens = 0;
  const T* logits = nullptr;  // [N, R], R = Router::logit_rows()
  bool training = false;
  NoiseSource* noise = nullptr;
  Arena* arena = nullptr;
  // Under expert parallelism the batch is spread over the ranks of `batch`: statistics of the
  // batch (expert counts, mean probabilities, token counts) are summed over it, so every rank
  // computes the losses of the whole batch. Null: this process holds the whole batch.
  const dist::Comm* batch = nullptr;
  // outputs
  RoutingPlan<T> plan;
  double aux_loss = 0;  // balancing losses, already scaled by their coefficients
  double z_loss = 0;
  double entropy = 0;  // mean router entropy (nats), for the statistics
};

class Router {
 public:
  explicit Router(const MoeConfig& cfg) : cfg_(cfg) {}
  virtual ~Router() = default;
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  const char* name() const;
  // Rows of the router weight: E for most routers.
  virtual int64_t logit_rows() const { return cfg_.n_experts; }
  // True when the method limits each expert's tokens itself (expert choice): the layer then
  // applies no capacity of its own.
  virtual bool applies_capacity() const { return false; }
  // True when the method's selection is per token and its batch statistics go through
  // RouterForward::batch: it then runs under expert parallelism with the result of one process.
  virtual bool supports_expert_parallel() const { return false; }

  virtual void forward(RouterForward<float>& f) = 0;
  virtual void forward(RouterForward<double>& f) = 0;
  // dweight [P] (gradient w.r.t. the plan's weights) -> dlogits [N, R] (written), including the
  // gradients of the losses times d_aux and d_z. Uses what the last forward saved.
  virtual void backward(const float* dweight, double d_aux, double d_z, float* dlogits) = 0;
  virtual void backward(const double* dweight, double d_aux, double d_z, double* dlogits) = 0;

  // Called once per optimizer step with the tokens each expert received (DeepSeek-V3's
  // auxiliary-loss-free bias update); most routers do nothing.
  virtual void after_step(const std::vector<int64_t>& /*routed*/) {}
  // Called at the end of every optimizer step, frozen router or not: routers that keep
  // statistics of the step's micro-batches (global_balance) clear them.
  virtual void end_step() {}

  // The per-expert selection bias [E] of routers that have one (DeepSeek-V3's
  // e_score_correction_bias): router state, saved with the model but not trained by gradient.
  // nullptr for the others.
  virtual std::vector<double>* selection_bias() { return nullptr; }

 protected:
  MoeConfig cfg_;
};

// Implements the float and double virtuals of Router with Derived's templates
// fwd<T>(RouterForward<T>&) and bwd<T>(const T*, double, double, T*).
template <class Derived>
class RouterImpl : public Router {
 public:
  using Router::Router;
  void forward(RouterForward<float>& f) override { self().template fwd<float>(f); }
  void forward(RouterForward<double>& f) override { self().template fwd<double>(f); }
  void backward(const float* dw, double a, double z, float* dl) override {
    self().template bwd<float>(dw, a, z, dl);
  }
  void backward(const double* dw, double a, double z, double* dl) override {
    self().template bwd<double>(dw, a, z, dl);
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
};

// The router the config asks for (cfg.router).
std::unique_ptr<Router> make_router(const MoeConfig& cfg);

}  // namespace moe
