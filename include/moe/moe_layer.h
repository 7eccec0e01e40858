// moe/moe_layer.h: the Mixture-of-Experts layer, forward and backward.
//
// x [N, D] -> y [N, D]. A router scores every token against every expert, keeps the top K, and
// the token's output is the weighted sum of those experts' FFN outputs, plus the shared experts.
// The forward also returns the balancing losses (Switch aux loss, router z-loss) and routing
// statistics; the backward differentiates the output and both losses.
//
// Dispatch (DESIGN.md section 6): a counting sort of (token, slot) pairs by expert gives
// contiguous per-expert row blocks; each expert runs as GEMMs on its block; the combine writes
// each token's weighted sum directly, with no atomics. src/moe/moe_ref.h holds the per-token
// loop that serves as its reference.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "moe/arena.h"
#include "moe/dist.h"
#include "moe/moe_config.h"
#include "moe/rng.h"
#include "moe/router.h"
#include "moe/tensor.h"

namespace moe {

// The weights of X experts of one kind (routed: X = E, shared: X = S), width F.
struct ExpertWeights {
  Tensor w_gate;  // [X, F, D], SwiGLU only
  Tensor w_up;    // [X, F, D]
  Tensor w_down;  // [X, D, F]
  Tensor b_gate;  // [X, F], SwiGLU with biases only
  Tensor b_up;    // [X, F], with biases only
  Tensor b_down;  // [X, D], with biases only
};

// One expert's weights, as views of the layer's tensors: w_gate and w_up [F, D], w_down [D, F],
// biases [F] / [D] when the layer has them (undefined otherwise). Code that reads or writes a
// single expert (checkpoint loading, and later offloading) goes through this.
struct ExpertView {
  Tensor w_gate, w_up, w_down, b_gate, b_up, b_down;
  // int8 weights (moe quantize): each matrix's float32 scale per stored row ([F], [F], [D], or
  // [F] for a w_down stored [F, D]).
  Tensor s_gate, s_up, s_down;
  // w_down stored [F, D] (input rows: DBRX's w2), so that y = h w_down; else [D, F], y = h
  // w_down^T.
  bool down_in_rows = false;
};

// Where an MoE layer's routed experts come from when they are not held in memory (expert
// offloading: src/infer/expert_cache.cpp). The layer asks for each expert its tokens need, one
// at a time, and runs it before asking for the next.
class ExpertSource {
 public:
  virtual ~ExpertSource() = default;
  // The routing of MoE layer `layer` (its index among the model's MoE layers) for n_tokens
  // tokens: the (token, expert) pairs each expert received. Called before its experts are asked
  // for.
  virtual void observe(int64_t layer, const std::vector<int64_t>& routed, int64_t n_tokens) = 0;
  // Expert e's weights (float32), valid until release(layer, e).
  virtual ExpertView acquire(int64_t layer, int64_t e) = 0;
  virtual void release(int64_t layer, int64_t e) = 0;
  // Read-ahead: whether the source can read experts in the background, and a guess that MoE
  // layer `layer` will soon ask for `experts`.
  virtual bool wants_prefetch() const { return false; }
  // Whether any number of experts may be acquired at once (views of mapped files, say), which
  // lets a token's experts run together; a bounded cache says no.
  virtual bool all_at_once() const { return false; }
  virtual void prefetch(int64_t /*layer*/, const std::vector<int64_t>& /*experts*/) {}
};

struct MoeParams {
  Tensor w_router;  // [E, D]
  Tensor b_router;  // [E], router_bias only
  ExpertWeights experts;
  ExpertWeights shared;  // S > 0 only
  Tensor w_shared_gate;  // [1, D], shared_gate only

  // Allocates every tensor the config (and its router) needs, zero-filled; without `routed`,
  // the routed experts' tensors hold no expert ([0, ...]).
  static MoeParams zeros(const MoeConfig& cfg, DType dtype, bool routed = true);
  // With n_routed routed experts ([n_routed, ...]: a rank's share under expert parallelism).
  static MoeParams zeros(const MoeConfig& cfg, DType dtype, int64_t n_routed);
  // Calls f(name, tensor) for every defined tensor, in a fixed order.
  void for_each(const std::function<void(const std::string&, Tensor&)>& f);
  void for_each(const std::function<void(const std::string&, const Tensor&)>& f) const;
  int64_t numel() const;
};

// Routing statistics of one forward call.
struct RoutingStats {
  std::vector<int64_t> routed;  // [E] (token, slot) pairs the router sent to each expert
  std::vector<int64_t> kept;    // [E] of those, kept within capacity
  int64_t n_tokens = 0;
  int64_t capacity = 0;         // per expert; 0 when dropless
  double dropped_fraction = 0;  // dropped pairs / (N * K)
  double load_imbalance = 0;    // max(routed) / mean(routed)
  double router_entropy = 0;    // mean over tokens of -sum_e p log p (nats)
  double aux_loss = 0;
  double z_loss = 0;
  // Expert parallelism, this rank's tokens: rows sent to experts on other ranks, and the
  // distinct (token, rank) pairs among them (what a dispatch sending a token once per rank
  // would send).
  int64_t remote_rows = 0, remote_tokens = 0;
  std::string str() const;  // a human-readable table
};

struct MoeOutput {
  Tensor y;              // [N, D], in the arena
  Tensor router_logits;  // [N, R], in the arena: the router's scores before the routing method
  Tensor top_expert;     // i32[N], in the arena: each token's highest-weight expert, -1 if none
  Tensor plan_offsets;   // i64[N + 1], in the arena: token t's pairs are [offsets[t], offsets[t+1])
  Tensor plan_experts;   // i32[P], in the arena: the expert of every pair the router chose
  Tensor plan_weights;   // [P], in the arena: each pair's combine weight
  double aux_loss = 0;
  double z_loss = 0;
  RoutingStats stats;
};

class MoeLayer {
 public:
  // routed_experts false: no memory for the routed experts' weights (and gradients), which then
  // come from set_expert_source.
  MoeLayer(const MoeConfig& cfg, DType dtype = DType::F32, bool routed_experts = true);
  // A layer split over expert-parallel ranks from the start (set_expert_parallel): only this
  // rank's experts are allocated.
  MoeLayer(const MoeConfig& cfg, DType dtype, const dist::ExpertGroups& groups);
  // A layer owns its weights: moving is fine, copying (which would share them) is not allowed.
  MoeLayer(MoeLayer&&) = default;
  MoeLayer& operator=(MoeLayer&&) = default;
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;

  const MoeConfig& config() const { return cfg_; }
  DType dtype() const { return dtype_; }
  Router& router() { return *router_; }

  // Dense routing (router warm-up, TrainConfig::router_warmup): while on, every token goes to
  // every expert weighted by the softmax of the router logits (the soft router, on the same
  // router weights), whatever the configured router, with no capacity limit; then the configured
  // sparse routing takes over. Refused for routers whose logits are not one per expert
  // (hierarchical).
  void set_dense_routing(bool on);
  bool dense_routing() const { return dense_; }

  // Training mode (the default) enables the routers' noise, jitter and exploration.
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  // Replays these draws (each list in order, from the start at every forward) instead of the
  // layer's random stream; nullptr for both returns to drawing. For tests against references.
  void set_noise(const std::vector<double>* normal, const std::vector<double>* uniform);
  // Once per optimizer step: router state updates (DeepSeek-V3's bias), from the routing of
  // the training forwards since the previous call (every micro-batch of the step). Does
  // nothing for a frozen router.
  void after_step();
  MoeParams& params() { return params_; }
  const MoeParams& params() const { return params_; }
  // Routed expert e's weights (views).
  ExpertView expert(int64_t e);
  MoeParams& grads() { return grads_; }

  // Expert parallelism (docs/distributed.md): this process keeps the routed experts
  // [first_expert(), first_expert() + local_experts()) — block groups.ep.rank() of E / EP — and
  // drops the others' weights; each forward sends the dispatched rows to the ranks holding their
  // experts by all-to-all within groups.ep and brings the outputs back, and the routing
  // statistics (balancing losses, counts) are summed over groups.world, every rank holding part
  // of the batch, so that they are those of the whole batch. Call after init() or loading: the
  // kept experts keep their values (or construct the layer split). A rank may pass zero tokens;
  // it still takes part.
  void set_expert_parallel(const dist::ExpertGroups& groups);
  const dist::ExpertGroups* expert_parallel() const { return ep_.get(); }
  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return params_.experts.w_up.size(0); }

  // Expert offloading (inference only, float32): the routed experts' weights come from
  // `source` (as MoE layer `index` of the model) instead of the layer's tensors, which are
  // dropped. Only the experts the tokens need are asked for.
  void set_expert_source(std::shared_ptr<ExpertSource> source, int64_t index);

  // Router and expert inputs N(0, 1/fan_in), output projections N(0, 1/F), biases zero; the
  // layer's routing noise stream is seeded from rng too.
  void init(Rng& rng);
  // Seeds the routing noise stream alone (weights untouched).
  void reseed_noise(uint64_t seed) { rng_ = Rng(seed); }
  Rng& noise_rng() { return rng_; }
  void zero_grad();

  // x [N, D] -> y [N, D]. Activations the backward needs go to `arena`, which must not be
  // reset before backward(). x must stay alive until then too.
  MoeOutput forward(const Tensor& x, Arena& arena);
  // The same, filling `out` in place (its vectors keep their capacity between calls).
  void forward(const Tensor& x, Arena& arena, MoeOutput& out);

  // dy [N, D] -> dx [N, D] (written); parameter gradients accumulate into grads(). d_aux and
  // d_z are the gradients of the objective with respect to the two losses (1 when they are
  // added to the training loss). dlogits_extra [N, R], when given: the gradient of a loss
  // computed outside the layer from its router logits (the model's joint balancing loss),
  // added to the router's own.
  void backward(const Tensor& dy, Tensor& dx, Arena& arena, double d_aux = 1.0, double d_z = 1.0,
                const Tensor* dlogits_extra = nullptr);

  struct Saved;  // what forward keeps for backward (moe_layer.cpp)

 private:
  MoeConfig cfg_;
  DType dtype_;
  MoeParams params_;
  MoeParams grads_;
  std::unique_ptr<Router> router_;
  // set_dense_routing: the soft router and its config, and whether the last forward used them.
  MoeConfig dense_cfg_;
  std::unique_ptr<Router> dense_router_;
  bool dense_ = false, dense_forward_ = false;
  Rng rng_;
  bool training_ = true;
  const std::vector<double>* noise_normal_ = nullptr;
  const std::vector<double>* noise_uniform_ = nullptr;
  std::shared_ptr<Saved> saved_;
  std::shared_ptr<const dist::ExpertGroups> ep_;
  int64_t first_expert_ = 0;
  std::shared_ptr<ExpertSource> source_;
  int64_t source_index_ = 0;
  // Keeps the routed experts [first, first + count) (weights and gradients) and drops the rest.
  void keep_experts(int64_t first, int64_t count);
  // This rank's share of the experts under `groups` (checked: they split evenly, the router
  // supports it).
  int64_t expert_share(const dist::ExpertGroups& groups) const;
  std::vector<int64_t> step_routed_;  // tokens per expert over this step's training forwards
};

}  // namespace moe
