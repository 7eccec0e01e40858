// Reference MoE layer (see moe_ref.h): one token at a time, every sum a plain loop.
#include "moe/moe_ref.h"

#include <algorithm>
#include <cmath>

#include "kernels/ref/ref.h"
#include "moe/expert_ffn.h"

namespace moe::ref {

namespace {

template <class T>
struct Routing {
  std::vector<T> probs, lse;     // [N, E], [N]
  std::vector<int32_t> idx;      // [N, K]
  std::vector<T> top_p, weight;  // [N, K]
  std::vector<uint8_t> kept;     // [N, K]
  std::vector<int64_t> routed;   // [E]
};

template <class T>
Routing<T> route(const MoeConfig& cfg, const MoeParams& params, const T* x, int64_t N) {
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k;
  const T* wr = params.w_router.data<T>();
  Routing<T> r;
  r.probs.resize(static_cast<size_t>(N * E));
  r.lse.resize(static_cast<size_t>(N));
  r.idx.resize(static_cast<size_t>(N * K));
  r.top_p.resize(static_cast<size_t>(N * K));
  r.weight.resize(static_cast<size_t>(N * K));
  r.kept.assign(static_cast<size_t>(N * K), 1);
  r.routed.assign(static_cast<size_t>(E), 0);
  std::vector<T> logits(static_cast<size_t>(E));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      T acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += x[t * D + d] * wr[e * D + d];
      logits[static_cast<size_t>(e)] = acc;
    }
    softmax_rows<T>(&r.probs[static_cast<size_t>(t * E)], &r.lse[static_cast<size_t>(t)],
                    logits.data(), 1, E);
    topk_rows<T>(&r.idx[static_cast<size_t>(t * K)], &r.top_p[static_cast<size_t>(t * K)],
                 &r.probs[static_cast<size_t>(t * E)], 1, E, K);
    T sum = 0;
    for (int64_t j = 0; j < K; ++j) sum += r.top_p[static_cast<size_t>(t * K + j)];
    for (int64_t j = 0; j < K; ++j) {
      const size_t p = static_cast<size_t>(t * K + j);
      r.weight[p] = cfg.renormalize ? r.top_p[p] / sum : r.top_p[p];
      ++r.routed[static_cast<size_t>(r.idx[p])];
    }
  }
  if (cfg.capacity_factor > 0) {
    const auto C = static_cast<size_t>(
        std::ceil(cfg.capacity_factor * static_cast<double>(N * K) / static_cast<double>(E)));
    for (int64_t e = 0; e < E; ++e) {
      std::vector<size_t> pairs;  // in token order
      for (size_t p = 0; p < r.idx.size(); ++p)
        if (r.idx[p] == e) pairs.push_back(p);
      if (cfg.drop_policy == DropPolicy::score)
        std::stable_sort(pairs.begin(), pairs.end(),
                         [&](size_t a, size_t b) { return r.top_p[a] > r.top_p[b]; });
      for (size_t i = C; i < pairs.size(); ++i) r.kept[pairs[i]] = 0;
    }
  }
  return r;
}

// One token through one expert; a_gate, a_up, h are [F] buffers the backward reuses.
template <class T>
void ffn_token(ExpertAct act, const FfnView<T>& w, int64_t D, int64_t F, const T* x, T* y,
               T* a_gate, T* a_up, T* h) {
  for (int64_t f = 0; f < F; ++f) {
    T u = w.b_up ? w.b_up[f] : T(0);
    for (int64_t d = 0; d < D; ++d) u += w.w_up[f * D + d] * x[d];
    a_up[f] = u;
    if (act == ExpertAct::swiglu) {
      T g = w.b_gate ? w.b_gate[f] : T(0);
      for (int64_t d = 0; d < D; ++d) g += w.w_gate[f * D + d] * x[d];
      a_gate[f] = g;
      h[f] = silu(g) * u;
    } else {
      h[f] = ref::act(act == ExpertAct::relu ? Activation::relu : Activation::gelu, u);
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
void ffn_token_backward(ExpertAct act, const FfnView<T>& w, const FfnView<T>& g, int64_t D,
                        int64_t F, const T* x, const T* dy, const T* a_gate, const T* a_up,
                        const T* h, T* dx) {
  for (int64_t d = 0; d < D; ++d) {
    if (g.b_down) g.b_down[d] += dy[d];
    for (int64_t f = 0; f < F; ++f) g.w_down[d * F + f] += dy[d] * h[f];
  }
  for (int64_t f = 0; f < F; ++f) {
    T dh = 0;
    for (int64_t d = 0; d < D; ++d) dh += dy[d] * w.w_down[d * F + f];
    T da_up, da_gate = 0;
    if (act == ExpertAct::swiglu) {
      da_up = dh * silu(a_gate[f]);
      da_gate = dh * a_up[f] * silu_grad(a_gate[f]);
    } else {
      da_up = dh * act_grad(act == ExpertAct::relu ? Activation::relu : Activation::gelu, a_up[f]);
    }
    if (g.b_up) g.b_up[f] += da_up;
    for (int64_t d = 0; d < D; ++d) {
      g.w_up[f * D + d] += da_up * x[d];
      dx[d] += da_up * w.w_up[f * D + d];
    }
    if (act == ExpertAct::swiglu) {
      if (g.b_gate) g.b_gate[f] += da_gate;
      for (int64_t d = 0; d < D; ++d) {
        g.w_gate[f * D + d] += da_gate * x[d];
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
RefOutput forward_impl(const MoeConfig& cfg, const MoeParams& params, const Tensor& xt) {
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k, N = xt.size(0);
  const int64_t F = cfg.d_ffn, Fs = cfg.shared_width();
  const T* x = xt.data<T>();
  Routing<T> r = route<T>(cfg, params, x, N);
  RefOutput out;
  out.y = Tensor::zeros({N, D}, dtype_of<T>());
  T* y = out.y.data<T>();
  const int64_t Fmax = std::max(F, Fs);
  std::vector<T> ye(static_cast<size_t>(D)), ag(static_cast<size_t>(Fmax)),
      au(static_cast<size_t>(Fmax)), h(static_cast<size_t>(Fmax));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const size_t p = static_cast<size_t>(t * K + j);
      if (!r.kept[p]) continue;
      ffn_token<T>(cfg.act, ffn_view<T>(params.experts, r.idx[p], D, F), D, F, x + t * D, ye.data(),
                   ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) y[t * D + d] += r.weight[p] * ye[static_cast<size_t>(d)];
    }
    const T g = shared_gate<T>(cfg, params, x + t * D);
    for (int64_t e = 0; e < cfg.n_shared; ++e) {
      ffn_token<T>(cfg.act, ffn_view<T>(params.shared, e, D, Fs), D, Fs, x + t * D, ye.data(),
                   ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) y[t * D + d] += g * ye[static_cast<size_t>(d)];
    }
  }
  double aux = 0, z = 0;
  for (int64_t e = 0; e < E; ++e) {
    double pm = 0;
    for (int64_t t = 0; t < N; ++t) pm += r.probs[static_cast<size_t>(t * E + e)];
    aux += static_cast<double>(r.routed[static_cast<size_t>(e)]) / static_cast<double>(N * K) * pm /
           static_cast<double>(N);
  }
  for (int64_t t = 0; t < N; ++t)
    z += static_cast<double>(r.lse[static_cast<size_t>(t)] * r.lse[static_cast<size_t>(t)]);
  out.aux_loss = cfg.aux_loss_coef * static_cast<double>(E) * aux;
  out.z_loss = cfg.z_loss_coef * z / static_cast<double>(N);
  out.top_idx = r.idx;
  out.kept = r.kept;
  return out;
}

template <class T>
void backward_impl(const MoeConfig& cfg, const MoeParams& params, const Tensor& xt,
                   const Tensor& dyt, double d_aux, double d_z, Tensor& dxt, MoeParams& grads) {
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k, N = xt.size(0);
  const int64_t F = cfg.d_ffn, Fs = cfg.shared_width();
  const T* x = xt.data<T>();
  const T* dy = dyt.data<T>();
  T* dx = dxt.data<T>();
  Routing<T> r = route<T>(cfg, params, x, N);
  const int64_t Fmax = std::max(F, Fs);
  std::vector<T> ye(static_cast<size_t>(D)), dye(static_cast<size_t>(D)),
      sh(static_cast<size_t>(D)), ag(static_cast<size_t>(Fmax)), au(static_cast<size_t>(Fmax)),
      h(static_cast<size_t>(Fmax)), dp(static_cast<size_t>(E));
  const T* wr = params.w_router.data<T>();
  T* gwr = grads.w_router.data<T>();
  for (int64_t t = 0; t < N; ++t) {
    const T* xt_ = x + t * D;
    const T* dyt_ = dy + t * D;
    T* dxt_ = dx + t * D;
    std::fill_n(dxt_, D, T(0));
    // Routed experts: y_t += w_j * E_j(x_t).
    std::vector<T> dw(static_cast<size_t>(K), T(0));
    for (int64_t j = 0; j < K; ++j) {
      const size_t p = static_cast<size_t>(t * K + j);
      if (!r.kept[p]) continue;
      ffn_token<T>(cfg.act, ffn_view<T>(params.experts, r.idx[p], D, F), D, F, xt_, ye.data(),
                   ag.data(), au.data(), h.data());
      for (int64_t d = 0; d < D; ++d) {
        dw[static_cast<size_t>(j)] += dyt_[d] * ye[static_cast<size_t>(d)];
        dye[static_cast<size_t>(d)] = r.weight[p] * dyt_[d];
      }
      ffn_token_backward<T>(cfg.act, ffn_view<T>(params.experts, r.idx[p], D, F),
                            ffn_view<T>(grads.experts, r.idx[p], D, F), D, F, xt_, dye.data(),
                            ag.data(), au.data(), h.data(), dxt_);
    }
    // Shared experts: y_t += g_t * sum_s E_s(x_t).
    if (cfg.n_shared > 0) {
      const T g = shared_gate<T>(cfg, params, xt_);
      std::fill(sh.begin(), sh.end(), T(0));
      for (int64_t e = 0; e < cfg.n_shared; ++e) {
        ffn_token<T>(cfg.act, ffn_view<T>(params.shared, e, D, Fs), D, Fs, xt_, ye.data(),
                     ag.data(), au.data(), h.data());
        for (int64_t d = 0; d < D; ++d) sh[static_cast<size_t>(d)] += ye[static_cast<size_t>(d)];
        for (int64_t d = 0; d < D; ++d) dye[static_cast<size_t>(d)] = g * dyt_[d];
        ffn_token_backward<T>(cfg.act, ffn_view<T>(params.shared, e, D, Fs),
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
    // Router: gradient w.r.t. the probabilities, then through the softmax.
    for (int64_t e = 0; e < E; ++e)
      dp[static_cast<size_t>(e)] =
          static_cast<T>(d_aux * cfg.aux_loss_coef * static_cast<double>(E) *
                         static_cast<double>(r.routed[static_cast<size_t>(e)]) /
                         static_cast<double>(N * K) / static_cast<double>(N));
    T sum = 0, dot = 0;
    for (int64_t j = 0; j < K; ++j) {
      const size_t p = static_cast<size_t>(t * K + j);
      sum += r.top_p[p];
      dot += dw[static_cast<size_t>(j)] * r.weight[p];
    }
    for (int64_t j = 0; j < K; ++j) {
      const size_t p = static_cast<size_t>(t * K + j);
      const T dwj = dw[static_cast<size_t>(j)];
      dp[static_cast<size_t>(r.idx[p])] += cfg.renormalize ? (dwj - dot) / sum : dwj;
    }
    const T* pr = &r.probs[static_cast<size_t>(t * E)];
    T pdp = 0;
    for (int64_t e = 0; e < E; ++e) pdp += pr[e] * dp[static_cast<size_t>(e)];
    const T lse = r.lse[static_cast<size_t>(t)];
    for (int64_t e = 0; e < E; ++e) {
      const T dl =
          pr[e] * (dp[static_cast<size_t>(e)] - pdp) +
          static_cast<T>(d_z * cfg.z_loss_coef * 2.0 / static_cast<double>(N)) * lse * pr[e];
      for (int64_t d = 0; d < D; ++d) {
        gwr[e * D + d] += dl * xt_[d];
        dxt_[d] += dl * wr[e * D + d];
      }
    }
  }
}

void check_inputs(const MoeConfig& cfg, const Tensor& x) {
  cfg.validate();
  MOE_CHECK(x.ndim() == 2 && x.size(1) == cfg.d_model, "moe.ref", "x must be [N, {}], got {}",
            cfg.d_model, x.str());
}

}  // namespace

RefOutput moe_forward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x) {
  check_inputs(cfg, x);
  if (x.dtype() == DType::F64) return forward_impl<double>(cfg, params, x);
  return forward_impl<float>(cfg, params, x);
}

void moe_backward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x, const Tensor& dy,
                  double d_aux, double d_z, Tensor& dx, MoeParams& grads) {
  check_inputs(cfg, x);
  dy.expect("moe.ref", "dy", x.shape(), x.dtype());
  dx.expect("moe.ref", "dx", x.shape(), x.dtype());
  if (x.dtype() == DType::F64) {
    backward_impl<double>(cfg, params, x, dy, d_aux, d_z, dx, grads);
  } else {
    backward_impl<float>(cfg, params, x, dy, d_aux, d_z, dx, grads);
  }
}

}  // namespace moe::ref
