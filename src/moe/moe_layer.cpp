// The MoE layer: parameters, router, sort-based dispatch with capacity, expert GEMMs, combine and
// losses (its backward is moe_backward.cpp). The math is in docs/routing.md; the reference is
// moe_ref.cpp.
#include "moe/moe_layer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "expert_parallel.h"
#include "moe/expert_ffn.h"
#include "moe/kernels.h"
#include "moe/threading.h"
#include "moe/weights.h"
#include "moe_layer_impl.h"

namespace moe {

// ---------------------------------------------------------------------------------------------
// Parameters

MoeParams MoeParams::zeros(const MoeConfig& cfg, DType dtype, bool routed) {
  return zeros(cfg, dtype, routed ? cfg.n_experts : int64_t{0});
}

MoeParams MoeParams::zeros(const MoeConfig& cfg, DType dtype, int64_t n_routed) {
  cfg.validate();
  const int64_t D = cfg.d_model, E = cfg.n_experts, F = cfg.d_ffn;
  const bool swiglu = gated(cfg.act);
  auto experts = [&](int64_t X, int64_t W) {
    ExpertWeights w;
    if (swiglu) w.w_gate = Tensor::zeros({X, W, D}, dtype);
    w.w_up = Tensor::zeros({X, W, D}, dtype);
    w.w_down = Tensor::zeros({X, D, W}, dtype);
    if (cfg.expert_bias) {
      if (swiglu) w.b_gate = Tensor::zeros({X, W}, dtype);
      w.b_up = Tensor::zeros({X, W}, dtype);
      w.b_down = Tensor::zeros({X, D}, dtype);
    }
    return w;
  };
  MoeParams p;
  p.w_router = Tensor::zeros({make_router(cfg)->logit_rows(), D}, dtype);
  if (cfg.router_bias) p.b_router = Tensor::zeros({make_router(cfg)->logit_rows()}, dtype);
  MOE_CHECK(n_routed >= 0 && n_routed <= E, "moe.layer", "{} routed experts of {}", n_routed, E);
  p.experts = experts(n_routed, F);
  if (cfg.n_shared > 0) p.shared = experts(cfg.n_shared, cfg.shared_width());
  if (cfg.shared_gate) p.w_shared_gate = Tensor::zeros({1, D}, dtype);
  return p;
}

namespace {
template <class P, class F>
void visit_params(P& p, F&& f) {
  auto visit = [&](const char* name, auto& t) {
    if (t.raw()) f(std::string(name), t);
  };
  visit("router.weight", p.w_router);
  visit("router.bias", p.b_router);
  visit("experts.w_gate", p.experts.w_gate);
  visit("experts.w_up", p.experts.w_up);
  visit("experts.w_down", p.experts.w_down);
  visit("experts.b_gate", p.experts.b_gate);
  visit("experts.b_up", p.experts.b_up);
  visit("experts.b_down", p.experts.b_down);
  visit("shared.w_gate", p.shared.w_gate);
  visit("shared.w_up", p.shared.w_up);
  visit("shared.w_down", p.shared.w_down);
  visit("shared.b_gate", p.shared.b_gate);
  visit("shared.b_up", p.shared.b_up);
  visit("shared.b_down", p.shared.b_down);
  visit("shared.gate", p.w_shared_gate);
}
}  // namespace

void MoeParams::for_each(const std::function<void(const std::string&, Tensor&)>& f) {
  visit_params(*this, f);
}
void MoeParams::for_each(const std::function<void(const std::string&, const Tensor&)>& f) const {
  visit_params(*this, f);
}
int64_t MoeParams::numel() const {
  int64_t n = 0;
  for_each([&](const std::string&, const Tensor& t) { n += t.numel(); });
  return n;
}

// ---------------------------------------------------------------------------------------------
// Layer

MoeLayer::MoeLayer(const MoeConfig& cfg, DType dtype, bool routed_experts)
    : cfg_(cfg), dtype_(dtype), saved_(std::make_shared<Saved>()) {
  cfg_.validate();
  MOE_CHECK(dtype == DType::F32 || dtype == DType::F64, "moe.layer",
            "dtype must be f32 or f64, got {}", dtype_name(dtype));
  router_ = make_router(cfg_);
  params_ = MoeParams::zeros(cfg_, dtype, routed_experts);
  grads_ = MoeParams::zeros(cfg_, dtype, routed_experts);
}

MoeLayer::MoeLayer(const MoeConfig& cfg, DType dtype, const dist::ExpertGroups& groups)
    : MoeLayer(cfg, dtype, false) {
  const int64_t El = expert_share(groups);
  first_expert_ = groups.ep.rank() * El;
  params_.experts = MoeParams::zeros(cfg_, dtype_, El).experts;
  grads_.experts = MoeParams::zeros(cfg_, dtype_, El).experts;
  ep_ = std::make_shared<const dist::ExpertGroups>(groups);
}

void MoeLayer::set_expert_source(std::shared_ptr<ExpertSource> source, int64_t index) {
  MOE_CHECK(dtype_ == DType::F32 && !ep_, "moe.offload",
            "expert offloading runs float32 layers in one process");
  source_ = std::move(source);
  source_index_ = index;
  keep_experts(0, 0);
}

void MoeLayer::keep_experts(int64_t first, int64_t count) {
  first_expert_ = first;
  for (MoeParams* p : {&params_, &grads_}) {
    ExpertWeights& x = p->experts;
    for (Tensor* t : {&x.w_gate, &x.w_up, &x.w_down, &x.b_gate, &x.b_up, &x.b_down}) {
      if (!t->defined()) continue;
      Shape shape = t->shape();
      shape[0] = 1;  // the bytes of one expert (the tensor may hold none already)
      const auto row = static_cast<size_t>(shape_numel(shape)) * dtype_size(t->dtype());
      shape[0] = count;
      Tensor kept = Tensor::empty(shape, t->dtype());
      if (count > 0)
        std::memcpy(kept.raw(),
                    static_cast<const char*>(t->raw()) + static_cast<size_t>(first) * row,
                    kept.nbytes());
      *t = kept;
    }
  }
}

void MoeLayer::init(Rng& rng) {
  const double sd = 1.0 / std::sqrt(static_cast<double>(cfg_.d_model));
  params_.for_each([&](const std::string& name, Tensor& t) {
    if (name.find(".b_") != std::string::npos) {
      t.fill(0);
    } else if (name.find("w_down") != std::string::npos) {
      rng.fill_normal(t, 0, 1.0 / std::sqrt(static_cast<double>(t.size(2))));
    } else {
      rng.fill_normal(t, 0, sd);
    }
  });
  rng_ = Rng(rng.next_u64());
}

int64_t MoeLayer::expert_share(const dist::ExpertGroups& groups) const {
  const char* w = "moe.expert_parallel";
  const int64_t E = cfg_.n_experts, P = groups.ep_size();
  MOE_CHECK(!ep_, w, "the layer's experts are already split over ranks");
  MOE_CHECK(E % P == 0, w, "{} experts do not split evenly over {} expert-parallel ranks", E, P);
  MOE_CHECK(router_->supports_expert_parallel(), w,
            "the {} router needs its groups within a rank under expert parallelism: set "
            "capacity_group (gshard) or seq_len (deepseek) to a size that divides every rank's "
            "tokens",
            router_->name());
  return E / P;
}

void MoeLayer::set_expert_parallel(const dist::ExpertGroups& groups) {
  const int64_t El = expert_share(groups);
  keep_experts(groups.ep.rank() * El, El);
  ep_ = std::make_shared<const dist::ExpertGroups>(groups);
}

ExpertView MoeLayer::expert(int64_t e) {
  MOE_CHECK(e >= 0 && e < cfg_.n_experts, "moe_layer", "expert {} is not in [0, {})", e,
            cfg_.n_experts);
  MOE_CHECK(e >= first_expert_ && e < first_expert_ + local_experts(), "moe_layer",
            "expert {} is held by another expert-parallel rank (this one holds [{}, {}))", e,
            first_expert_, first_expert_ + local_experts());
  return expert_rows(params_.experts, e - first_expert_);
}

void MoeLayer::zero_grad() {
  grads_.for_each([](const std::string&, Tensor& t) { t.fill(0); });
}

void MoeLayer::set_noise(const std::vector<double>* normal, const std::vector<double>* uniform) {
  noise_normal_ = normal;
  noise_uniform_ = uniform;
}

void MoeLayer::set_dense_routing(bool on) {
  if (on && !dense_router_) {
    MOE_CHECK(router_->logit_rows() == cfg_.n_experts, "moe.router_warmup",
              "dense warm-up routes with one logit per expert; the {} router has {} logit rows "
              "for {} experts",
              router_->name(), router_->logit_rows(), cfg_.n_experts);
    dense_cfg_ = cfg_;
    dense_cfg_.router = RouterKind::soft;
    dense_cfg_.capacity_factor = 0;  // every expert takes every token
    dense_cfg_.explore_prob = 0;
    dense_cfg_.device_aux_loss_coef = 0;
    dense_cfg_.global_balance = false;
    dense_router_ = make_router(dense_cfg_);
  }
  dense_ = on;
}

void MoeLayer::after_step() {
  if (!cfg_.freeze_router && !step_routed_.empty()) router_->after_step(step_routed_);
  router_->end_step();
  step_routed_.clear();
}

namespace {

using namespace moe_detail;

// Where the routed experts are: the layer's tensors (all of them, or under expert parallelism
// this rank's block), or a source that hands out one at a time (offloading).
struct Placement {
  const dist::ExpertGroups* ep = nullptr;
  ExpertSource* source = nullptr;
  int64_t source_index = 0;
};

// Counting sort of the plan's pairs by expert (stable: token order within an expert), then
// capacity: tokens are split into groups of cfg.capacity_group (0: one group), and in each group
// an expert keeps at most C_g = ceil(CF * P_g / E) of its pairs (P_g: the group's pairs), chosen
// by the drop policy. Fills offsets [E + 1], row_pair [M] and pair_row [P]; returns M.
template <class T>
int64_t dispatch(const MoeConfig& cfg, bool capped, const RoutingPlan<T>& plan,
                 const int32_t* pair_token, int64_t n_tokens, Arena& arena, int64_t* routed,
                 int64_t* offsets, int32_t*& row_pair, int32_t* pair_row, int64_t& capacity) {
  const int64_t E = cfg.n_experts, P = plan.n_pairs;
  std::fill_n(routed, E, 0);
  for (int64_t p = 0; p < P; ++p) ++routed[plan.expert[p]];
  int64_t* cursor = arena.alloc<int64_t>(E + 1);
  cursor[0] = 0;
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] = cursor[e] + routed[e];
  int32_t* sorted = arena.alloc<int32_t>(P);
  for (int64_t p = 0; p < P; ++p) sorted[cursor[plan.expert[p]]++] = static_cast<int32_t>(p);

  const int64_t G = cfg.capacity_group > 0 ? cfg.capacity_group : n_tokens;
  auto group_capacity = [&](int64_t g) {
    const int64_t t0 = g * G, t1 = std::min(n_tokens, t0 + G);
    const double pairs = static_cast<double>(plan.token_offsets[t1] - plan.token_offsets[t0]);
    return static_cast<int64_t>(std::ceil(cfg.capacity_factor * pairs / static_cast<double>(E)));
  };
  capacity = capped ? group_capacity(0) : 0;
  std::fill_n(pair_row, P, -1);
  offsets[0] = 0;
  int64_t out = 0;  // compaction cursor: kept pairs move left, never past unread ones
  int64_t begin = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = begin + routed[e];
    for (int64_t lo = begin; lo < end;) {
      // The pairs of this expert from one group are contiguous (token order).
      const int64_t g = pair_token[sorted[lo]] / G;
      int64_t hi = lo;
      while (hi < end && pair_token[sorted[hi]] / G == g) ++hi;
      int64_t keep = hi - lo;
      if (capped && keep > group_capacity(g)) {
        int32_t* block = sorted + lo;
        if (cfg.drop_policy == DropPolicy::score) {
          // Highest score first, ties to the earlier pair (the block is in pair order): a total
          // order, so std::sort gives the stable result without a temporary buffer.
          std::sort(block, block + keep, [&](int32_t a, int32_t b) {
            return plan.score[a] > plan.score[b] || (plan.score[a] == plan.score[b] && a < b);
          });
        } else if (cfg.drop_policy == DropPolicy::slot) {
          auto slot = [&](int32_t p) { return p - plan.token_offsets[pair_token[p]]; };
          std::sort(block, block + keep, [&](int32_t a, int32_t b) {
            return slot(a) < slot(b) || (slot(a) == slot(b) && a < b);
          });
        }
        keep = group_capacity(g);
      }
      std::memmove(sorted + out, sorted + lo, static_cast<size_t>(keep) * sizeof(int32_t));
      out += keep;
      lo = hi;
    }
    offsets[e + 1] = out;
    begin = end;
  }
  const int64_t M = out;
  row_pair = sorted;  // its first M entries are now the kept pairs in row order
  for (int64_t r = 0; r < M; ++r) pair_row[row_pair[r]] = static_cast<int32_t>(r);
  return M;
}

template <class T>
void forward_impl(const MoeConfig& cfg, MoeParams& params, Router& router, bool training,
                  NoiseSource& noise, MoeLayer::Saved& s, const Tensor& x, Arena& arena,
                  const Placement& where, MoeOutput& result) {
  const dist::ExpertGroups* ep = where.ep;
  const char* w = "moe.forward";
  const int64_t D = cfg.d_model, E = cfg.n_experts, F = cfg.d_ffn;
  MOE_CHECK(x.ndim() == 2 && x.size(1) == D && x.dtype() == dtype_of<T>(), w,
            "x must be {}[N, {}], got {}", dtype_name(dtype_of<T>()), D, x.str());
  const int64_t N = x.size(0);
  MOE_CHECK(N >= 1 || ep, w, "x has no tokens");
  MOE_CHECK(N * E < (int64_t(1) << 31), w, "N * E = {} exceeds 2^31", N * E);
  const T* xp = x.data<T>();
  check_finite(w, "input x", xp, N, D);

  s = MoeLayer::Saved{};
  s.n = N;
  s.x = x;

  // Router input: x, times U(1 - eps, 1 + eps) jitter in training (Switch Transformer).
  const T* xr = xp;
  if (training && cfg.jitter_eps > 0) {
    T* jitter = arena.alloc<T>(N * D);
    T* xj = arena.alloc<T>(N * D);
    noise.uniform_tokens(jitter, N, D);
    const T lo = static_cast<T>(1 - cfg.jitter_eps), width = static_cast<T>(2 * cfg.jitter_eps);
    for (int64_t i = 0; i < N * D; ++i) {
      jitter[i] = lo + width * jitter[i];
      xj[i] = xp[i] * jitter[i];
    }
    s.jitter = jitter;
    xr = xj;
  }
  s.xr = xr;

  // Router: logits = xr W_r^T over all its rows, then the routing method.
  const int64_t R = router.logit_rows();
  s.r = R;
  T* logits = arena.alloc<T>(N * R);
  cpu::gemm<T>(false, true, N, R, D, T(1), xr, D, params.w_router.data<T>(), D, T(0), logits, R);
  if (cfg.router_bias) {
    const T* b = params.b_router.data<T>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t r = 0; r < R; ++r) logits[i * R + r] += b[r];
  }
  check_finite(w, "router logits (check the router weights)", logits, N, R);
  RouterForward<T> rf;
  rf.n_tokens = N;
  rf.logits = logits;
  rf.training = training;
  rf.noise = &noise;
  rf.arena = &arena;
  rf.batch = ep ? &ep->world : nullptr;
  router.forward(rf);
  const RoutingPlan<T>& plan = rf.plan;
  const int64_t P = plan.n_pairs;
  MOE_CHECK(P < (int64_t(1) << 31), w, "{} (token, expert) pairs exceed 2^31", P);

  // Dispatch: sort pairs by expert, apply capacity, gather rows.
  int64_t* routed = arena.alloc<int64_t>(E);
  int64_t* offsets = arena.alloc<int64_t>(E + 1);
  int32_t* row_pair = nullptr;
  int32_t* pair_row = arena.alloc<int32_t>(P);
  int64_t capacity = 0;
  int32_t* pair_token = arena.alloc<int32_t>(P);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p)
      pair_token[p] = static_cast<int32_t>(t);
  const bool capped = cfg.capacity_factor > 0 && !router.applies_capacity();
  // Capacity applies per group of tokens; under expert parallelism the groups must lie within a
  // rank for the result to be the one process's.
  MOE_CHECK(!ep || !capped || (cfg.capacity_group > 0 && N % cfg.capacity_group == 0), w,
            "under expert parallelism a capacity factor needs capacity_group to divide the tokens "
            "of every rank ({} here)",
            N);
  const int64_t M = dispatch(cfg, capped, plan, pair_token, N, arena, routed, offsets, row_pair,
                             pair_row, capacity);

  T* ys = arena.alloc<T>(M * D);
  // The rows' inputs: copies of their tokens' rows (under expert parallelism each token travels
  // once to each rank holding any of its experts, which makes the copies).
  T* xs = nullptr;
  if (!ep) {
    xs = arena.alloc<T>(M * D);
#pragma omp parallel for schedule(static) if (M * D > kParallelMin)
    for (int64_t r = 0; r < M; ++r)
      std::memcpy(xs + r * D, xp + pair_token[row_pair[r]] * D, static_cast<size_t>(D) * sizeof(T));
  }
  // The experts held here run on their rows: this process's own, or under expert parallelism
  // the rows the group sends them (expert_parallel.h), whose outputs then travel back.
  const int64_t El = where.source ? E : params.experts.w_up.size(0);
  T* xe = xs;
  T* ye = ys;
  int64_t Me = M;
  const int64_t* e_offsets = offsets;
  if (ep) {
    s.exchange = ExpertExchange(ep->ep, offsets, E, arena);
    Me = s.exchange.rows();
    e_offsets = s.exchange.local_offsets();
    xe = arena.alloc<T>(Me * D);
    ye = arena.alloc<T>(Me * D);
    int32_t* row_token = arena.alloc<int32_t>(std::max<int64_t>(1, M));
    for (int64_t r = 0; r < M; ++r) row_token[r] = static_cast<int32_t>(pair_token[row_pair[r]]);
    s.exchange.index_tokens(row_token, arena);
    s.exchange.tokens_to_experts<T>(xp, xe, D, nullptr, arena);
  }
  T* a_gate = gated(cfg.act) ? arena.alloc<T>(Me * F) : nullptr;
  T* a_up = arena.alloc<T>(Me * F);
  T* h = arena.alloc<T>(Me * F);
  if (where.source) {
    // Offloaded experts: only those with rows are asked for, one after another.
    std::vector<int64_t>& routed_now = result.stats.routed;
    routed_now.assign(routed, routed + E);
    where.source->observe(where.source_index, routed_now, N);
    // Stored weights that stay in memory: every expert with rows through the fused kernel, two
    // parallel regions in all (decoding: a token's experts; a prompt: a grouped GEMM).
    bool fused = false;
    if constexpr (std::is_same_v<T, float>) {
      fused = where.source->all_at_once();
      if (fused) {
        std::vector<ExpertRun> runs;
        for (int64_t e = 0; e < E; ++e) {
          const int64_t r0 = e_offsets[e], n = e_offsets[e + 1] - e_offsets[e];
          if (n == 0) continue;
          runs.push_back({where.source->acquire(where.source_index, e), n, xe + r0 * D, ye + r0 * D,
                          a_gate ? a_gate + r0 * F : nullptr, a_up + r0 * F, h + r0 * F});
        }
        if (!runs.empty() && runs[0].w.w_up.dtype() == DType::F32) {
          fused = false;  // float32 experts: the GEMM path below
        } else {
          ffn_forward_stored_fused(cfg.ffn_act(), runs, D, F);
        }
        for (int64_t e = 0; e < E; ++e)
          if (e_offsets[e + 1] > e_offsets[e]) where.source->release(where.source_index, e);
      }
    }
    for (int64_t e = 0; e < E && !fused; ++e) {
      const int64_t r0 = e_offsets[e], n = e_offsets[e + 1] - e_offsets[e];
      if (n == 0) continue;
      const ExpertView v = where.source->acquire(where.source_index, e);
      ffn_forward_any<T>(cfg.ffn_act(), v, n, D, F, xe + r0 * D, ye + r0 * D,
                         a_gate ? a_gate + r0 * F : nullptr, a_up + r0 * F, h + r0 * F);
      where.source->release(where.source_index, e);
    }
  } else {
    const bool as_t = params.experts.w_up.dtype() == dtype_of<T>();
    for_each_expert(El, [&](int64_t e) {
      const int64_t r0 = e_offsets[e], n = e_offsets[e + 1] - e_offsets[e];
      T* ag = a_gate ? a_gate + r0 * F : nullptr;
      if (as_t) {
        ffn_forward<T>(cfg.ffn_act(), ffn_view<T>(params.experts, e, D, F), n, D, F, xe + r0 * D,
                       ye + r0 * D, ag, a_up + r0 * F, h + r0 * F);
      } else {  // kept as stored (inference)
        ffn_forward_any<T>(cfg.ffn_act(), expert_rows(params.experts, e), n, D, F, xe + r0 * D,
                           ye + r0 * D, ag, a_up + r0 * F, h + r0 * F);
      }
    });
  }
  if (ep) s.exchange.to_home(ye, ys, D * static_cast<int64_t>(sizeof(T)), arena);

  // Shared experts run on every token.
  const int64_t S = cfg.n_shared, Fs = cfg.shared_width();
  T* sh_y = nullptr;
  T* sh_g = nullptr;
  if (S > 0) {
    sh_y = arena.alloc<T>(N * D);
    T* tmp = arena.alloc<T>(N * D);
    T* sa_gate = gated(cfg.act) ? arena.alloc<T>(S * N * Fs) : nullptr;
    T* sa_up = arena.alloc<T>(S * N * Fs);
    T* sh = arena.alloc<T>(S * N * Fs);
    for (int64_t e = 0; e < S; ++e) {
      T* out = e == 0 ? sh_y : tmp;
      T* sg = sa_gate ? sa_gate + e * N * Fs : nullptr;
      if (params.shared.w_up.dtype() == dtype_of<T>()) {
        ffn_forward<T>(cfg.ffn_act(), ffn_view<T>(params.shared, e, D, Fs), N, D, Fs, xp, out, sg,
                       sa_up + e * N * Fs, sh + e * N * Fs);
      } else {  // kept as stored (inference)
        ffn_forward_any<T>(cfg.ffn_act(), expert_rows(params.shared, e), N, D, Fs, xp, out, sg,
                           sa_up + e * N * Fs, sh + e * N * Fs);
      }
      if (e > 0)
        for (int64_t i = 0; i < N * D; ++i) sh_y[i] += tmp[i];
    }
    if (cfg.shared_gate) {
      sh_g = arena.alloc<T>(N);
      cpu::gemm<T>(false, true, N, 1, D, T(1), xp, D, params.w_shared_gate.data<T>(), D, T(0), sh_g,
                   1);
      for (int64_t t = 0; t < N; ++t) sh_g[t] = sigmoid(sh_g[t]);
    }
    s.sh_a_gate = sa_gate;
    s.sh_a_up = sa_up;
    s.sh_h = sh;
  }

  // Combine: each token writes its own weighted sum, pairs in plan order.
  Tensor y = arena.tensor({N, D}, dtype_of<T>());
  T* yp = y.data<T>();
#pragma omp parallel for schedule(static) if (N * D > kParallelMin)
  for (int64_t t = 0; t < N; ++t) {
    T* out = yp + t * D;
    if (sh_y) {
      const T g = sh_g ? sh_g[t] : T(1);
      for (int64_t d = 0; d < D; ++d) out[d] = g * sh_y[t * D + d];
    } else {
      std::fill_n(out, D, T(0));
    }
    for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p) {
      const int32_t r = pair_row[p];
      if (r < 0) continue;
      const T wt = plan.weight[p];
      const T* src = ys + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] += wt * src[d];
    }
  }

  MoeOutput& out = result;
  out.y = y;
  out.router_logits = Tensor::view(logits, {N, R}, dtype_of<T>());
  out.plan_offsets = Tensor::view(plan.token_offsets, {N + 1}, DType::I64);
  out.plan_experts = Tensor::view(plan.expert, {P}, DType::I32);
  out.plan_weights = Tensor::view(plan.weight, {P}, dtype_of<T>());
  out.top_expert = arena.tensor({N}, DType::I32);
  int32_t* top = out.top_expert.data<int32_t>();
  for (int64_t t = 0; t < N; ++t) {
    top[t] = -1;
    T best = 0;
    for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p)
      if (top[t] < 0 || plan.weight[p] > best) {
        top[t] = plan.expert[p];
        best = plan.weight[p];
      }
  }
  out.aux_loss = rf.aux_loss;
  out.z_loss = rf.z_loss;
  RoutingStats& st = out.stats;
  st.n_tokens = N;
  st.capacity = capacity;
  st.routed.assign(routed, routed + E);
  st.kept.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) st.kept[static_cast<size_t>(e)] = offsets[e + 1] - offsets[e];
  int64_t pairs = P, kept = M;
  st.remote_rows = st.remote_tokens = 0;
  if (ep) {
    const int64_t me = ep->ep.rank();
    for (int64_t t = 0; t < N; ++t)
      for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p) {
        const int64_t q = plan.expert[p] / El;
        if (pair_row[p] < 0 || q == me) continue;
        ++st.remote_rows;
        bool seen = false;  // an earlier kept pair of this token to the same rank
        for (int64_t p2 = plan.token_offsets[t]; p2 < p && !seen; ++p2)
          seen = pair_row[p2] >= 0 && plan.expert[p2] / El == q;
        if (!seen) ++st.remote_tokens;
      }
    // The statistics of the whole batch, summed over the ranks that share it (exact integers).
    int64_t* sum = arena.alloc<int64_t>(2 * E + 3);
    std::copy_n(st.routed.data(), E, sum);
    std::copy_n(st.kept.data(), E, sum + E);
    sum[2 * E] = N;
    sum[2 * E + 1] = P;
    sum[2 * E + 2] = M;
    ep->world.sum(sum, 2 * E + 3);
    std::copy_n(sum, E, st.routed.data());
    std::copy_n(sum + E, E, st.kept.data());
    st.n_tokens = sum[2 * E];
    pairs = sum[2 * E + 1];
    kept = sum[2 * E + 2];
  }
  st.aux_loss = rf.aux_loss;
  st.z_loss = rf.z_loss;
  st.router_entropy = rf.entropy;
  st.dropped_fraction =
      pairs > 0 ? static_cast<double>(pairs - kept) / static_cast<double>(pairs) : 0;
  const int64_t max_routed = *std::max_element(st.routed.begin(), st.routed.end());
  st.load_imbalance = pairs > 0 ? static_cast<double>(max_routed) /
                                      (static_cast<double>(pairs) / static_cast<double>(E))
                                : 0;

  s.p = P;
  s.m = M;
  s.token_offsets = plan.token_offsets;
  s.weight = plan.weight;
  s.expert = plan.expert;
  s.offsets = offsets;
  s.row_pair = row_pair;
  s.pair_row = pair_row;
  s.ys = ys;
  s.me = Me;
  s.e_offsets = e_offsets;
  s.xe = xe;
  s.a_gate = a_gate;
  s.a_up = a_up;
  s.h = h;
  s.sh_y = sh_y;
  s.sh_g = sh_g;
  s.valid = true;
}

}  // namespace

void MoeLayer::forward(const Tensor& x, Arena& arena, MoeOutput& out) {
  MOE_CHECK(!source_ || !training_, "moe.offload",
            "offloaded experts run inference only (set_training(false))");
  const Placement where{ep_.get(), source_.get(), source_index_};
  NoiseSource noise = noise_normal_ || noise_uniform_ ? NoiseSource(noise_normal_, noise_uniform_)
                                                      : NoiseSource(&rng_);
  if (ep_ && training_) {
    // The routing noise of one process running the whole batch: this rank's share of it (the
    // ranks' tokens in rank order).
    const dist::Comm& world = ep_->world;
    std::vector<int64_t> n(static_cast<size_t>(world.size()));
    const int64_t mine = x.ndim() == 2 ? x.size(0) : 0;
    world.allgather(&mine, n.data(), sizeof(int64_t));
    int64_t offset = 0, total = 0;
    for (int q = 0; q < world.size(); ++q) {
      if (q < world.rank()) offset += n[static_cast<size_t>(q)];
      total += n[static_cast<size_t>(q)];
    }
    noise.set_share(offset, mine, total);
  }
  dense_forward_ = dense_;
  const MoeConfig& cfg = dense_ ? dense_cfg_ : cfg_;
  Router& router = dense_ ? *dense_router_ : *router_;
  if (dtype_ == DType::F64) {
    forward_impl<double>(cfg, params_, router, training_, noise, *saved_, x, arena, where, out);
  } else {
    forward_impl<float>(cfg, params_, router, training_, noise, *saved_, x, arena, where, out);
  }
  // Training forwards since the last step (all micro-batches of an accumulated step) add up.
  if (training_) {
    step_routed_.resize(out.stats.routed.size(), 0);
    for (size_t e = 0; e < step_routed_.size(); ++e) step_routed_[e] += out.stats.routed[e];
  }
}

MoeOutput MoeLayer::forward(const Tensor& x, Arena& arena) {
  MoeOutput out;
  forward(x, arena, out);
  return out;
}

}  // namespace moe
