// The MoE layer: router, sort-based dispatch with capacity, expert GEMMs, combine, losses, and
// the backward of all of it. The math is in docs/routing.md; the reference is moe_ref.cpp.
#include "moe/moe_layer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/expert_ffn.h"
#include "moe/kernels.h"
#include "moe/threading.h"

namespace moe {

// ---------------------------------------------------------------------------------------------
// Parameters

MoeParams MoeParams::zeros(const MoeConfig& cfg, DType dtype) {
  cfg.validate();
  const int64_t D = cfg.d_model, E = cfg.n_experts, F = cfg.d_ffn;
  const bool swiglu = cfg.act == ExpertAct::swiglu;
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
  p.w_router = Tensor::zeros({E, D}, dtype);
  p.experts = experts(E, F);
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

struct MoeLayer::Saved {
  int64_t n = 0;  // tokens
  int64_t m = 0;  // kept (token, slot) pairs = rows of the sorted block
  int64_t capacity = 0;
  Tensor x;                     // [N, D], the caller's input
  void* probs = nullptr;        // [N, E]
  void* lse = nullptr;          // [N]
  int32_t* top_idx = nullptr;   // [N, K]
  void* top_p = nullptr;        // [N, K] probabilities of the selected experts
  void* weight = nullptr;       // [N, K] combine weights (renormalized or not)
  int64_t* offsets = nullptr;   // [E + 1] row offsets of each expert's kept block
  int64_t* routed = nullptr;    // [E] pairs routed to each expert before capacity
  int32_t* row_pair = nullptr;  // [M] the pair (t * K + j) of each sorted row
  int32_t* pair_row = nullptr;  // [N * K] the sorted row of each pair, -1 when dropped
  void* xs = nullptr;           // [M, D] gathered inputs
  void* ys = nullptr;           // [M, D] expert outputs (unweighted)
  void* a_gate = nullptr;       // [M, F]
  void* a_up = nullptr;         // [M, F]
  void* h = nullptr;            // [M, F]
  void* sh_y = nullptr;         // [N, D] sum of the shared experts' outputs (ungated)
  void* sh_a_gate = nullptr;    // [S, N, Fs]
  void* sh_a_up = nullptr;      // [S, N, Fs]
  void* sh_h = nullptr;         // [S, N, Fs]
  void* sh_g = nullptr;         // [N] shared gate sigmoid
  bool valid = false;
};

MoeLayer::MoeLayer(const MoeConfig& cfg, DType dtype)
    : cfg_(cfg), dtype_(dtype), saved_(std::make_shared<Saved>()) {
  cfg_.validate();
  MOE_CHECK(dtype == DType::F32 || dtype == DType::F64, "moe.layer",
            "dtype must be f32 or f64, got {}", dtype_name(dtype));
  params_ = MoeParams::zeros(cfg_, dtype);
  grads_ = MoeParams::zeros(cfg_, dtype);
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
}

void MoeLayer::zero_grad() {
  grads_.for_each([](const std::string&, Tensor& t) { t.fill(0); });
}

namespace {

// Runs fn(e) for every expert: across experts on all threads when there are many (each GEMM then
// runs on its own thread), else one expert after another with multi-threaded GEMMs.
template <class Fn>
void for_each_expert(int64_t n_experts, Fn&& fn) {
  if (n_experts >= 2 * num_threads() && num_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < n_experts; ++e) fn(e);
  } else {
    for (int64_t e = 0; e < n_experts; ++e) fn(e);
  }
}

template <class T>
void check_finite(const char* where, const char* what, const T* p, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows * cols; ++i)
    MOE_CHECK(std::isfinite(p[i]), where, "{} has a non-finite value ({}) at row {}, column {}",
              what, static_cast<double>(p[i]), i / cols, i % cols);
}

template <class T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

template <class T>
MoeOutput forward_impl(const MoeConfig& cfg, MoeParams& params, MoeLayer::Saved& s, const Tensor& x,
                       Arena& arena) {
  const char* w = "moe.forward";
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k, F = cfg.d_ffn;
  MOE_CHECK(x.ndim() == 2 && x.size(1) == D && x.dtype() == dtype_of<T>(), w,
            "x must be {}[N, {}], got {}", dtype_name(dtype_of<T>()), D, x.str());
  const int64_t N = x.size(0);
  MOE_CHECK(N >= 1, w, "x has no tokens");
  MOE_CHECK(N * K < (int64_t(1) << 31), w, "N * K = {} exceeds 2^31 rows", N * K);
  const T* xp = x.data<T>();
  check_finite(w, "input x", xp, N, D);

  s = MoeLayer::Saved{};
  s.n = N;
  s.x = x;

  // Router: logits = x W_r^T, probabilities, top-k.
  T* logits = arena.alloc<T>(N * E);
  T* probs = arena.alloc<T>(N * E);
  T* lse = arena.alloc<T>(N);
  cpu::gemm<T>(false, true, N, E, D, T(1), xp, D, params.w_router.data<T>(), D, T(0), logits, E);
  check_finite(w, "router logits (check the router weights)", logits, N, E);
  cpu::softmax_rows<T>(probs, lse, logits, N, E);
  int32_t* top_idx = arena.alloc<int32_t>(N * K);
  T* top_p = arena.alloc<T>(N * K);
  T* weight = arena.alloc<T>(N * K);
  cpu::topk_rows<T>(top_idx, top_p, probs, N, E, K);
  for (int64_t t = 0; t < N; ++t) {
    T sum = 0;
    for (int64_t j = 0; j < K; ++j) sum += top_p[t * K + j];
    for (int64_t j = 0; j < K; ++j)
      weight[t * K + j] = cfg.renormalize ? top_p[t * K + j] / sum : top_p[t * K + j];
  }

  // Counting sort of the (token, slot) pairs by expert, stable in token order.
  int64_t* routed = arena.alloc<int64_t>(E);
  int64_t* offsets = arena.alloc<int64_t>(E + 1);
  std::fill_n(routed, E, 0);
  for (int64_t p = 0; p < N * K; ++p) ++routed[top_idx[p]];
  int64_t* cursor = arena.alloc<int64_t>(E + 1);
  cursor[0] = 0;
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] = cursor[e] + routed[e];
  int32_t* sorted = arena.alloc<int32_t>(N * K);
  for (int64_t p = 0; p < N * K; ++p) sorted[cursor[top_idx[p]]++] = static_cast<int32_t>(p);

  // Capacity: each expert keeps at most C pairs, the first ones or the highest-scoring ones.
  const int64_t C =
      cfg.capacity_factor > 0
          ? static_cast<int64_t>(std::ceil(cfg.capacity_factor * static_cast<double>(N * K) /
                                           static_cast<double>(E)))
          : N;
  s.capacity = cfg.capacity_factor > 0 ? C : 0;
  int32_t* pair_row = arena.alloc<int32_t>(N * K);
  std::fill_n(pair_row, N * K, -1);
  offsets[0] = 0;
  int64_t begin = 0;
  for (int64_t e = 0; e < E; ++e) {
    int32_t* block = sorted + begin;
    const int64_t count = routed[e];
    if (count > C && cfg.drop_policy == DropPolicy::score) {
      std::stable_sort(block, block + count,
                       [&](int32_t a, int32_t b) { return top_p[a] > top_p[b]; });
    }
    const int64_t keep = std::min(count, C);
    // Compact the kept pairs of expert e to rows offsets[e] .. offsets[e] + keep.
    std::memmove(sorted + offsets[e], block, static_cast<size_t>(keep) * sizeof(int32_t));
    offsets[e + 1] = offsets[e] + keep;
    begin += count;
  }
  const int64_t M = offsets[E];
  int32_t* row_pair = sorted;  // its first M entries are now the kept pairs in row order
  for (int64_t r = 0; r < M; ++r) pair_row[row_pair[r]] = static_cast<int32_t>(r);
  s.m = M;

  // Gather, experts, combine.
  T* xs = arena.alloc<T>(M * D);
  T* ys = arena.alloc<T>(M * D);
  T* a_gate = cfg.act == ExpertAct::swiglu ? arena.alloc<T>(M * F) : nullptr;
  T* a_up = arena.alloc<T>(M * F);
  T* h = arena.alloc<T>(M * F);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < M; ++r)
    std::memcpy(xs + r * D, xp + (row_pair[r] / K) * D, static_cast<size_t>(D) * sizeof(T));
  for_each_expert(E, [&](int64_t e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - offsets[e];
    ffn_forward<T>(cfg.act, ffn_view<T>(params.experts, e, D, F), n, D, F, xs + r0 * D, ys + r0 * D,
                   a_gate ? a_gate + r0 * F : nullptr, a_up + r0 * F, h + r0 * F);
  });

  // Shared experts run on every token.
  const int64_t S = cfg.n_shared, Fs = cfg.shared_width();
  T* sh_y = nullptr;
  T* sh_g = nullptr;
  if (S > 0) {
    sh_y = arena.alloc<T>(N * D);
    T* tmp = arena.alloc<T>(N * D);
    T* sa_gate = cfg.act == ExpertAct::swiglu ? arena.alloc<T>(S * N * Fs) : nullptr;
    T* sa_up = arena.alloc<T>(S * N * Fs);
    T* sh = arena.alloc<T>(S * N * Fs);
    for (int64_t e = 0; e < S; ++e) {
      T* out = e == 0 ? sh_y : tmp;
      ffn_forward<T>(cfg.act, ffn_view<T>(params.shared, e, D, Fs), N, D, Fs, xp, out,
                     sa_gate ? sa_gate + e * N * Fs : nullptr, sa_up + e * N * Fs, sh + e * N * Fs);
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

  Tensor y = arena.tensor({N, D}, dtype_of<T>());
  T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    T* out = yp + t * D;
    if (sh_y) {
      const T g = sh_g ? sh_g[t] : T(1);
      for (int64_t d = 0; d < D; ++d) out[d] = g * sh_y[t * D + d];
    } else {
      std::fill_n(out, D, T(0));
    }
    for (int64_t j = 0; j < K; ++j) {
      const int32_t r = pair_row[t * K + j];
      if (r < 0) continue;
      const T wt = weight[t * K + j];
      const T* src = ys + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] += wt * src[d];
    }
  }

  // Balancing losses. f_i: fraction of the N*K router choices that went to expert i;
  // P_i: mean router probability of expert i.
  MoeOutput out;
  out.y = y;
  RoutingStats& st = out.stats;
  st.n_tokens = N;
  st.capacity = s.capacity;
  st.routed.assign(routed, routed + E);
  st.kept.resize(static_cast<size_t>(E));
  double aux = 0, z = 0, entropy = 0;
  for (int64_t e = 0; e < E; ++e) {
    double p_mean = 0;
    for (int64_t t = 0; t < N; ++t) p_mean += probs[t * E + e];
    p_mean /= static_cast<double>(N);
    aux += static_cast<double>(routed[e]) / static_cast<double>(N * K) * p_mean;
    st.kept[static_cast<size_t>(e)] = offsets[e + 1] - offsets[e];
  }
  aux *= cfg.aux_loss_coef * static_cast<double>(E);
  for (int64_t t = 0; t < N; ++t) {
    z += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
    for (int64_t e = 0; e < E; ++e) {
      const double p = probs[t * E + e];
      if (p > 0) entropy -= p * std::log(p);
    }
  }
  z *= cfg.z_loss_coef / static_cast<double>(N);
  out.aux_loss = st.aux_loss = aux;
  out.z_loss = st.z_loss = z;
  st.router_entropy = entropy / static_cast<double>(N);
  st.dropped_fraction = static_cast<double>(N * K - M) / static_cast<double>(N * K);
  const int64_t max_routed = *std::max_element(routed, routed + E);
  st.load_imbalance =
      static_cast<double>(max_routed) / (static_cast<double>(N * K) / static_cast<double>(E));

  s.probs = probs;
  s.lse = lse;
  s.top_idx = top_idx;
  s.top_p = top_p;
  s.weight = weight;
  s.offsets = offsets;
  s.routed = routed;
  s.row_pair = row_pair;
  s.pair_row = pair_row;
  s.xs = xs;
  s.ys = ys;
  s.a_gate = a_gate;
  s.a_up = a_up;
  s.h = h;
  s.sh_y = sh_y;
  s.sh_g = sh_g;
  s.valid = true;
  return out;
}

template <class T>
void backward_impl(const MoeConfig& cfg, MoeParams& params, MoeParams& grads, MoeLayer::Saved& s,
                   const Tensor& dy_t, Tensor& dx_t, Arena& arena, double d_aux, double d_z) {
  const char* w = "moe.backward";
  MOE_CHECK(s.valid, w, "backward() called without a forward() before it");
  const int64_t D = cfg.d_model, E = cfg.n_experts, K = cfg.top_k, F = cfg.d_ffn;
  const int64_t N = s.n, M = s.m;
  dy_t.expect(w, "dy", {N, D}, dtype_of<T>());
  dx_t.expect(w, "dx", {N, D}, dtype_of<T>());
  const T* dy = dy_t.data<T>();
  T* dx = dx_t.data<T>();
  check_finite(w, "upstream gradient dy", dy, N, D);
  const T* xp = s.x.data<T>();
  const T* probs = static_cast<const T*>(s.probs);
  const T* lse = static_cast<const T*>(s.lse);
  const T* top_p = static_cast<const T*>(s.top_p);
  const T* weight = static_cast<const T*>(s.weight);
  const T* ys = static_cast<const T*>(s.ys);
  const T* xs = static_cast<const T*>(s.xs);

  // Combine: y_t = sum_j w_tj ys[row(t, j)]. dw_tj = <dy_t, ys[row]>, dys[row] = w_tj dy_t.
  T* dw = arena.alloc<T>(N * K);
  T* dys = arena.alloc<T>(M * D);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int32_t r = s.pair_row[t * K + j];
      T acc = 0;
      if (r >= 0) {
        const T wt = weight[t * K + j];
        for (int64_t d = 0; d < D; ++d) {
          acc += dy[t * D + d] * ys[r * D + d];
          dys[r * D + d] = wt * dy[t * D + d];
        }
      }
      dw[t * K + j] = acc;
    }
  }

  // Experts.
  T* dxs = arena.alloc<T>(M * D);
  T* dh = arena.alloc<T>(M * F);
  T* da_gate = cfg.act == ExpertAct::swiglu ? arena.alloc<T>(M * F) : nullptr;
  const T* a_gate = static_cast<const T*>(s.a_gate);
  const T* a_up = static_cast<const T*>(s.a_up);
  const T* h = static_cast<const T*>(s.h);
  for_each_expert(E, [&](int64_t e) {
    const int64_t r0 = s.offsets[e], n = s.offsets[e + 1] - s.offsets[e];
    ffn_backward<T>(cfg.act, ffn_view<T>(params.experts, e, D, F),
                    ffn_view<T>(grads.experts, e, D, F), n, D, F, xs + r0 * D, dys + r0 * D,
                    a_gate ? a_gate + r0 * F : nullptr, a_up + r0 * F, h + r0 * F, dh + r0 * F,
                    da_gate ? da_gate + r0 * F : nullptr, dxs + r0 * D);
  });
  // dx_t = sum_j dxs[row(t, j)], in slot order.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    T* out = dx + t * D;
    std::fill_n(out, D, T(0));
    for (int64_t j = 0; j < K; ++j) {
      const int32_t r = s.pair_row[t * K + j];
      if (r < 0) continue;
      for (int64_t d = 0; d < D; ++d) out[d] += dxs[r * D + d];
    }
  }

  // Shared experts: y_t += g_t * sh_y_t.
  const int64_t S = cfg.n_shared, Fs = cfg.shared_width();
  if (S > 0) {
    const T* sh_y = static_cast<const T*>(s.sh_y);
    const T* sh_g = static_cast<const T*>(s.sh_g);
    const T* dsh = dy;
    if (sh_g) {
      T* scaled = arena.alloc<T>(N * D);
      T* dlogit = arena.alloc<T>(N);
      for (int64_t t = 0; t < N; ++t) {
        T dg = 0;
        for (int64_t d = 0; d < D; ++d) {
          dg += dy[t * D + d] * sh_y[t * D + d];
          scaled[t * D + d] = sh_g[t] * dy[t * D + d];
        }
        dlogit[t] = dg * sh_g[t] * (T(1) - sh_g[t]);
      }
      T* wg = params.w_shared_gate.data<T>();
      cpu::gemm<T>(true, false, 1, D, N, T(1), dlogit, 1, xp, D, T(1),
                   grads.w_shared_gate.data<T>(), D);
      cpu::gemm<T>(false, false, N, D, 1, T(1), dlogit, 1, wg, D, T(1), dx, D);
      dsh = scaled;
    }
    T* sdx = arena.alloc<T>(N * D);
    T* sdh = arena.alloc<T>(N * Fs);
    T* sda_gate = cfg.act == ExpertAct::swiglu ? arena.alloc<T>(N * Fs) : nullptr;
    const T* sa_gate = static_cast<const T*>(s.sh_a_gate);
    const T* sa_up = static_cast<const T*>(s.sh_a_up);
    const T* sh = static_cast<const T*>(s.sh_h);
    for (int64_t e = 0; e < S; ++e) {
      ffn_backward<T>(cfg.act, ffn_view<T>(params.shared, e, D, Fs),
                      ffn_view<T>(grads.shared, e, D, Fs), N, D, Fs, xp, dsh,
                      sa_gate ? sa_gate + e * N * Fs : nullptr, sa_up + e * N * Fs, sh + e * N * Fs,
                      sdh, sda_gate, sdx);
      for (int64_t i = 0; i < N * D; ++i) dx[i] += sdx[i];
    }
  }

  // Router. dp: gradient w.r.t. the probabilities, from the combine weights and the aux loss;
  // then the softmax backward and the z-loss, both per token.
  T* dlogits = arena.alloc<T>(N * E);
  const T aux_scale =
      static_cast<T>(d_aux * cfg.aux_loss_coef * static_cast<double>(E) / static_cast<double>(N));
  const T z_scale = static_cast<T>(d_z * cfg.z_loss_coef * 2.0 / static_cast<double>(N));
  const T nk = static_cast<T>(N * K);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    T* g = dlogits + t * E;
    for (int64_t e = 0; e < E; ++e) g[e] = aux_scale * static_cast<T>(s.routed[e]) / nk;
    if (cfg.renormalize) {
      T sum = 0, dot = 0;
      for (int64_t j = 0; j < K; ++j) {
        sum += top_p[t * K + j];
        dot += dw[t * K + j] * weight[t * K + j];
      }
      for (int64_t j = 0; j < K; ++j) g[s.top_idx[t * K + j]] += (dw[t * K + j] - dot) / sum;
    } else {
      for (int64_t j = 0; j < K; ++j) g[s.top_idx[t * K + j]] += dw[t * K + j];
    }
    const T* p = probs + t * E;
    T pg = 0;
    for (int64_t e = 0; e < E; ++e) pg += p[e] * g[e];
    for (int64_t e = 0; e < E; ++e) g[e] = p[e] * (g[e] - pg) + z_scale * lse[t] * p[e];
  }
  cpu::gemm<T>(true, false, E, D, N, T(1), dlogits, E, xp, D, T(1), grads.w_router.data<T>(), D);
  cpu::gemm<T>(false, false, N, D, E, T(1), dlogits, E, params.w_router.data<T>(), D, T(1), dx, D);
  s.valid = false;
}

}  // namespace

MoeOutput MoeLayer::forward(const Tensor& x, Arena& arena) {
  if (dtype_ == DType::F64) return forward_impl<double>(cfg_, params_, *saved_, x, arena);
  return forward_impl<float>(cfg_, params_, *saved_, x, arena);
}

void MoeLayer::backward(const Tensor& dy, Tensor& dx, Arena& arena, double d_aux, double d_z) {
  if (dtype_ == DType::F64) {
    backward_impl<double>(cfg_, params_, grads_, *saved_, dy, dx, arena, d_aux, d_z);
  } else {
    backward_impl<float>(cfg_, params_, grads_, *saved_, dy, dx, arena, d_aux, d_z);
  }
}

}  // namespace moe
