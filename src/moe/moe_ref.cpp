// Reference MoE layer (see moe_ref.h): one token at a time, every sum a plain loop.
#include "moe/moe_ref.h"

#include <algorithm>
#include <cmath>

#include "kernels/ref/ref.h"
#include "moe/expert_ffn.h"

namespace moe::ref {

namespace {

// The routing of a batch: the router's plan, plus capacity decided one expert at a time.
template <class T>
struct Routing {
  std::unique_ptr<Router> router;
  Arena arena;
  RoutingPlan<T> plan;
  std::vector<T> xr, jitter;  // [N, D] router input and jitter factors (empty: none)
  std::vector<T> logits;      // [N, R], kept alive for the router's backward
  std::vector<uint8_t> kept;  // [P]
  double aux = 0, z = 0;
};

template <class T>
std::unique_ptr<Routing<T>> route(const MoeConfig& cfg, const MoeParams& params, const T* x,
                                  int64_t N, const RefOptions& opt) {
  const int64_t D = cfg.d_model, E = cfg.n_experts;
  auto r = std::make_unique<Routing<T>>();
  r->router = make_router(cfg);
  const int64_t R = r->router->logit_rows();
  NoiseSource noise(opt.normal, opt.uniform);
  r->xr.assign(x, x + N * D);
  if (opt.training && cfg.jitter_eps > 0) {
    r->jitter.resize(static_cast<size_t>(N * D));
    noise.uniform_tokens(r->jitter.data(), N, D);
    for (size_t i = 0; i < r->jitter.size(); ++i) {
      r->jitter[i] = static_cast<T>(1 - cfg.jitter_eps + 2 * cfg.jitter_eps * r->jitter[i]);
      r->xr[i] *= r->jitter[i];
    }
  }
  const T* wr = params.w_router.data<T>();
  std::vector<T>& logits = r->logits;
  logits.resize(static_cast<size_t>(N * R));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < R; ++e) {
      T acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += r->xr[static_cast<size_t>(t * D + d)] * wr[e * D + d];
      logits[static_cast<size_t>(t * R + e)] =
          acc + (cfg.router_bias ? params.b_router.data<T>()[e] : T(0));
    }
  RouterForward<T> f;
  f.n_tokens = N;
  f.logits = logits.data();
  f.training = opt.training;
  f.noise = &noise;
  f.arena = &r->arena;
  r->router->forward(f);
  r->plan = f.plan;
  r->aux = f.aux_loss;
  r->z = f.z_loss;
  const int64_t P = f.plan.n_pairs;
  r->kept.assign(static_cast<size_t>(P), 1);
  if (cfg.capacity_factor > 0 && !r->router->applies_capacity()) {
    // Per group of tokens and per expert: sort the expert's pairs by the policy, keep C_g.
    const int64_t G = cfg.capacity_group > 0 ? cfg.capacity_group : N;
    for (int64_t t0 = 0; t0 < N; t0 += G) {
      const int64_t t1 = std::min(N, t0 + G);
      const double pairs = static_cast<double>(f.plan.token_offsets[t1] - f.plan.token_offsets[t0]);
      const auto C =
          static_cast<size_t>(std::ceil(cfg.capacity_factor * pairs / static_cast<double>(E)));
      for (int64_t e = 0; e < E; ++e) {
        struct Pair {
          int64_t p, slot;
          T score;
        };
        std::vector<Pair> pairs_e;  // in token order
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t p = f.plan.token_offsets[t]; p < f.plan.token_offsets[t + 1]; ++p)
            if (f.plan.expert[p] == e)
              pairs_e.push_back({p, p - f.plan.token_offsets[t], f.plan.score[p]});
        if (cfg.drop_policy == DropPolicy::score)
          std::stable_sort(pairs_e.begin(), pairs_e.end(),
                           [](const Pair& a, const Pair& b) { return a.score > b.score; });
        if (cfg.drop_policy == DropPolicy::slot)
          std::stable_sort(pairs_e.begin(), pairs_e.end(),
                           [](const Pair& a, const Pair& b) { return a.slot < b.slot; });
        for (size_t i = C; i < pairs_e.size(); ++i) r->kept[static_cast<size_t>(pairs_e[i].p)] = 0;
      }
    }
  }
  return r;
}

bool frozen(const MoeConfig& cfg, int64_t e) {
  for (int64_t f : cfg.frozen_experts)
    if (f == e) return true;
  return false;
}

// gpt-oss's clamped SwiGLU, as transformers' GptOssExperts writes it: gate.clamp(max=L),
// up.clamp(-L, L), (up + 1) * gate * sigmoid(1.702 gate); and its derivatives (torch.clamp passes
// the gradient where the input is within its bounds, ends included).
template <class T>
T oai(T gate, T up, double limit) {
  const T L = static_cast<T>(limit);
  const T g = gate > L ? L : gate, u = up > L ? L : (up < -L ? -L : up);
  return (u + T(1)) * g * (T(1) / (T(1) + std::exp(T(-1.702) * g)));
}
template <class T>
void oai_grad(T gate, T up, double limit, T dh, T* dgate, T* dup) {
  const T L = static_cast<T>(limit);
  const T g = gate > L ? L : gate, u = up > L ? L : (up < -L ? -L : up);
  const T s = T(1) / (T(1) + std::exp(T(-1.702) * g));
  *dgate = gate <= L ? dh * (u + T(1)) * (s + T(1.702) * g * s * (T(1) - s)) : T(0);
  *dup = (up >= -L && up <= L) ? dh * g * s : T(0);
}

// One token through one expert; a_gate, a_up, h are [F] buffers the backward reuses.
template <class T>
void ffn_token(FfnAct act, const FfnView<T>& w, int64_t D, int64_t F, const T* x, T* y, T* a_gate,
               T* a_up, T* h) {
  for (int64_t f = 0; f < F; ++f) {
    T u = w.b_up ? w.b_up[f] : T(0);
    for (int64_t d = 0; d < D; ++d) u += w.w_up[f * D + d] * x[d];
    a_up[f] = u;
    if (act.gated()) {
      T g = w.b_gate ? w.b_gate[f] : T(0);
      for (int64_t d = 0; d < D; ++d) g += w.w_gate[f * D + d] * x[d];
      a_gate[f] = g;
      h[f] = act.kind == ExpertAct::swiglu ? silu(g) * u : oai(g, u, act.limit);
    } else {
      h[f] = ref::act(act.kind == ExpertAct::relu ? Activation::relu : Activation::gelu, u);
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    T acc = w.b_down ? w.b_down[d] : T(0);
    for (int64_t f = 0; f < F; ++f) acc += w.w_down[d * F + f] * h[f];
    y[d] = acc;
  }
}

// Backward of ffn_token for the upstream gradient dy [D]: dx [D] accumulates.
template <class T>
void ffn_token_backward(FfnAct act, const FfnView<T>& w, const FfnView<T>& g, int64_t D, int64_t F,
                        const T* x, const T* dy, const T* a_gate, const T* a_up, const T* h,
                        T* dx) {
  const bool train = g.w_up != nullptr;
  for (int64_t d = 0; d < D; ++d) {
    if (g.b_down) g.b_down[d] += dy[d];
    if (train)
      for (int64_t f = 0; f < F; ++f) g.w_down[d * F + f] += dy[d] * h[f];
  }
  for (int64_t f = 0; f < F; ++f) {
    T dh = 0;
    for (int64_t d = 0; d < D; ++d) dh += dy[d] * w.w_down[d * F + f];
    T da_up, da_gate = 0;
    if (act.kind == ExpertAct::swiglu) {
      da_up = dh * silu(a_gate[f]);
      da_gate = dh * a_up[f] * silu_grad(a_gate[f]);
    } else if (act.kind == ExpertAct::swiglu_oai) {
      oai_grad(a_gate[f], a_up[f], act.limit, dh, &da_gate, &da_up);
    } else {
      da_up =
          dh * act_grad(act.kind == ExpertAct::relu ? Activation::relu : Activation::gelu, a_up[f]);
    }
    if (g.b_up) g.b_up[f] += da_up;
    for (int64_t d = 0; d < D; ++d) {
      if (train) g.w_up[f * D + d] += da_up * x[d];
      dx[d] += da_up * w.w_up[f * D + d];
    }
    if (act.gated()) {
      if (g.b_gate) g.b_gate[f] += da_gate;
      for (int64_t d = 0; d < D; ++d) {
        if (train) g.w_gate[f * D + d] += da_gate * x[d];
        dx[d] += da_gate * w.w_gate[f * D + d];
      }
    }
  }
}

template <class T>
T shared_gate(const MoeConfig& cfg, const MoeParams& params, const T* x) {
  if (!cfg.shared_gate) return T(1);
  T acc = 0;
  for (int64_t d = 0; d < cfg.d_model; ++d) acc += params.w_shared_gate.data<T>()[d] * x[d];
  return T(1) / (T(1) + std::exp(-acc));
}

template <class T>
RefOutput forward_impl(const MoeConfig& cfg, const MoeParams& params, const Tensor& xt,
                       const RefOptions& opt) {
  const int64_t D = cfg.d_model, N = xt.size(0);
  const int64_t F = cfg.d_ffn, Fs = cfg.shared_width();
  const T* x = xt.data<T>();
  auto r = route<T>(cfg, params, x, N, opt);
  const RoutingPlan<T>& plan = r->plan;
  RefOutput out;
  out.y = Tensor::zeros({N, D}, dtype_of<T>());
  T* y = out.y.data<T>();
  const int64_t Fmax = std::max(F, Fs);
  std::vector<T> ye(static_cast<size_t>(D)), ag(static_cast<size_t>(Fmax)),
      au(static_cast<size_t>(Fmax)), h(static_cast<size_t>(Fmax));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p) {
      if (!r->kept[static_cast<size_t>(p)]) continue;
      ffn_token<T>(cfg.ffn_act(), ffn_view<T>(params.experts, plan.expert[p], D, F), D, F,
                   x + t * D, ye.data(), ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) y[t * D + d] += plan.weight[p] * ye[static_cast<size_t>(d)];
    }
    const T g = shared_gate<T>(cfg, params, x + t * D);
    for (int64_t e = 0; e < cfg.n_shared; ++e) {
      ffn_token<T>(cfg.ffn_act(), ffn_view<T>(params.shared, e, D, Fs), D, Fs, x + t * D, ye.data(),
                   ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) y[t * D + d] += g * ye[static_cast<size_t>(d)];
    }
  }
  out.aux_loss = r->aux;
  out.z_loss = r->z;
  out.token_offsets.assign(plan.token_offsets, plan.token_offsets + N + 1);
  out.expert.assign(plan.expert, plan.expert + plan.n_pairs);
  out.kept = r->kept;
  return out;
}

template <class T>
void backward_impl(const MoeConfig& cfg, const MoeParams& params, const Tensor& xt,
                   const Tensor& dyt, double d_aux, double d_z, Tensor& dxt, MoeParams& grads,
                   const RefOptions& opt) {
  const int64_t D = cfg.d_model, N = xt.size(0);
  const int64_t F = cfg.d_ffn, Fs = cfg.shared_width();
  const T* x = xt.data<T>();
  const T* dy = dyt.data<T>();
  T* dx = dxt.data<T>();
  auto r = route<T>(cfg, params, x, N, opt);
  const RoutingPlan<T>& plan = r->plan;
  const int64_t Fmax = std::max(F, Fs);
  std::vector<T> ye(static_cast<size_t>(D)), dye(static_cast<size_t>(D)),
      sh(static_cast<size_t>(D)), ag(static_cast<size_t>(Fmax)), au(static_cast<size_t>(Fmax)),
      h(static_cast<size_t>(Fmax));
  std::vector<T> dw(static_cast<size_t>(plan.n_pairs), T(0));
  for (int64_t t = 0; t < N; ++t) {
    const T* xt_ = x + t * D;
    const T* dyt_ = dy + t * D;
    T* dxt_ = dx + t * D;
    std::fill_n(dxt_, D, T(0));
    // Routed experts: y_t += w_p * E_p(x_t).
    for (int64_t p = plan.token_offsets[t]; p < plan.token_offsets[t + 1]; ++p) {
      if (!r->kept[static_cast<size_t>(p)]) continue;
      const int32_t e = plan.expert[p];
      ffn_token<T>(cfg.ffn_act(), ffn_view<T>(params.experts, e, D, F), D, F, xt_, ye.data(),
                   ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) {
        dw[static_cast<size_t>(p)] += dyt_[d] * ye[static_cast<size_t>(d)];
        dye[static_cast<size_t>(d)] = plan.weight[p] * dyt_[d];
      }
      const FfnView<T> g = frozen(cfg, e) ? FfnView<T>{} : ffn_view<T>(grads.experts, e, D, F);
      ffn_token_backward<T>(cfg.ffn_act(), ffn_view<T>(params.experts, e, D, F), g, D, F, xt_,
                            dye.data(), ag.data(), au.data(), h.data(), dxt_);
    }
    // Shared experts: y_t += g_t * sum_s E_s(x_t).
    if (cfg.n_shared > 0) {
      const T g = shared_gate<T>(cfg, params, xt_);
      std::fill(sh.begin(), sh.end(), T(0));
      for (int64_t e = 0; e < cfg.n_shared; ++e) {
        ffn_token<T>(cfg.ffn_act(), ffn_view<T>(params.shared, e, D, Fs), D, Fs, xt_, ye.data(),
                     ag.data(), au.data(), h.data());
        for (int64_t d = 0; d < D; ++d) sh[static_cast<size_t>(d)] += ye[static_cast<size_t>(d)];
        for (int64_t d = 0; d < D; ++d) dye[static_cast<size_t>(d)] = g * dyt_[d];
        ffn_token_backward<T>(cfg.ffn_act(), ffn_view<T>(params.shared, e, D, Fs),
                              ffn_view<T>(grads.shared, e, D, Fs), D, Fs, xt_, dye.data(),
                              ag.data(), au.data(), h.data(), dxt_);
      }
      if (cfg.shared_gate) {
        T dg = 0;
        for (int64_t d = 0; d < D; ++d) dg += dyt_[d] * sh[static_cast<size_t>(d)];
        const T dl = dg * g * (T(1) - g);
        for (int64_t d = 0; d < D; ++d) {
          grads.w_shared_gate.data<T>()[d] += dl * xt_[d];
          dxt_[d] += dl * params.w_shared_gate.data<T>()[d];
        }
      }
    }
  }
  // Router: the routing method maps weight gradients to logit gradients; logits = xr W_r^T.
  const int64_t R = r->router->logit_rows();
  std::vector<T> dlogits(static_cast<size_t>(N * R));
  r->router->backward(dw.data(), d_aux, d_z, dlogits.data());
  const T* wr = params.w_router.data<T>();
  T* gwr = grads.w_router.data<T>();
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < R; ++e) {
      const T dl = dlogits[static_cast<size_t>(t * R + e)];
      if (cfg.router_bias && !cfg.freeze_router) grads.b_router.data<T>()[e] += dl;
      for (int64_t d = 0; d < D; ++d) {
        const size_t i = static_cast<size_t>(t * D + d);
        if (!cfg.freeze_router) gwr[e * D + d] += dl * r->xr[i];
        dx[t * D + d] += dl * wr[e * D + d] * (r->jitter.empty() ? T(1) : r->jitter[i]);
      }
    }
}

void check_inputs(const MoeConfig& cfg, const Tensor& x) {
  cfg.validate();
  MOE_CHECK(x.ndim() == 2 && x.size(1) == cfg.d_model, "moe.ref", "x must be [N, {}], got {}",
            cfg.d_model, x.str());
}

}  // namespace

RefOutput moe_forward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x,
                      const RefOptions& opt) {
  check_inputs(cfg, x);
  if (x.dtype() == DType::F64) return forward_impl<double>(cfg, params, x, opt);
  return forward_impl<float>(cfg, params, x, opt);
}

void moe_backward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x, const Tensor& dy,
                  double d_aux, double d_z, Tensor& dx, MoeParams& grads, const RefOptions& opt) {
  check_inputs(cfg, x);
  dy.expect("moe.ref", "dy", x.shape(), x.dtype());
  dx.expect("moe.ref", "dx", x.shape(), x.dtype());
  if (x.dtype() == DType::F64) {
    backward_impl<double>(cfg, params, x, dy, d_aux, d_z, dx, grads, opt);
  } else {
    backward_impl<float>(cfg, params, x, dy, d_aux, d_z, dx, grads, opt);
  }
}

}  // namespace moe::ref
