// The MoE layer's backward (see moe/moe_layer.h and docs/routing.md): the combine's, the
// experts' (under expert parallelism on the experts' ranks), the router's and the balancing
// losses', in the reverse order of moe_layer.cpp's forward.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/expert_ffn.h"
#include "moe/kernels.h"
#include "moe/weights.h"
#include "moe_layer_impl.h"

namespace moe {

namespace {

using namespace moe_detail;

template <class T>
void backward_impl(const MoeConfig& cfg, MoeParams& params, MoeParams& grads, Router& router,
                   MoeLayer::Saved& s, const Tensor& dy_t, Tensor& dx_t, Arena& arena, double d_aux,
                   double d_z, const dist::ExpertGroups* ep, int64_t first_expert,
                   const Tensor* dlogits_extra) {
  const char* w = "moe.backward";
  MOE_CHECK(s.valid, w, "backward() called without a forward() before it");
  const int64_t D = cfg.d_model, F = cfg.d_ffn;
  const int64_t N = s.n, M = s.m, P = s.p, R = s.r;
  dy_t.expect(w, "dy", {N, D}, dtype_of<T>());
  dx_t.expect(w, "dx", {N, D}, dtype_of<T>());
  const T* dy = dy_t.data<T>();
  T* dx = dx_t.data<T>();
  check_finite(w, "upstream gradient dy", dy, N, D);
  const T* xp = s.x.data<T>();
  const T* weight = static_cast<const T*>(s.weight);
  const T* ys = static_cast<const T*>(s.ys);

  // Combine: y_t = sum_p w_p ys[row(p)]. dw_p = <dy_t, ys[row]>, dys[row] = w_p dy_t.
  // (Under expert parallelism the rows' dy are made on the experts' rank: only their weights.)
  T* dw = arena.alloc<T>(P);
  T* dys = ep ? nullptr : arena.alloc<T>(M * D);
  T* row_weight = ep ? arena.alloc<T>(std::max<int64_t>(1, M)) : nullptr;
#pragma omp parallel for schedule(static) if (N * D > kParallelMin)
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t p = s.token_offsets[t]; p < s.token_offsets[t + 1]; ++p) {
      const int32_t r = s.pair_row[p];
      T acc = 0;
      if (r >= 0) {
        const T wt = weight[p];
        for (int64_t d = 0; d < D; ++d) acc += dy[t * D + d] * ys[r * D + d];
        if (ep) {
          row_weight[r] = wt;  // the experts' rank makes the row from the token's dy
        } else {
          for (int64_t d = 0; d < D; ++d) dys[r * D + d] = wt * dy[t * D + d];
        }
      }
      dw[p] = acc;
    }
  }

  // Experts; a frozen expert still passes its input gradient but accumulates no weight gradient.
  // Under expert parallelism the output gradients travel to the experts' ranks as the rows did,
  // and the input gradients come back.
  const int64_t Me = s.me, El = params.experts.w_up.size(0);
  T* dxs = ep ? nullptr : arena.alloc<T>(M * D);
  const T* dye = dys;
  T* dxe = dxs;
  if (ep) {
    T* buf = arena.alloc<T>(std::max<int64_t>(1, Me) * D);
    s.exchange.tokens_to_experts<T>(dy, buf, D, row_weight, arena);
    dye = buf;
    dxe = arena.alloc<T>(std::max<int64_t>(1, Me) * D);
  }
  T* dh = arena.alloc<T>(Me * F);
  T* da_gate = gated(cfg.act) ? arena.alloc<T>(Me * F) : nullptr;
  const T* xe = static_cast<const T*>(s.xe);
  const T* a_gate = static_cast<const T*>(s.a_gate);
  const T* a_up = static_cast<const T*>(s.a_up);
  const T* h = static_cast<const T*>(s.h);
  for_each_expert(El, [&](int64_t e) {
    const int64_t r0 = s.e_offsets[e], n = s.e_offsets[e + 1] - s.e_offsets[e];
    const FfnView<T> g =
        is_frozen(cfg, first_expert + e) ? FfnView<T>{} : ffn_view<T>(grads.experts, e, D, F);
    ffn_backward<T>(cfg.ffn_act(), ffn_view<T>(params.experts, e, D, F), g, n, D, F, xe + r0 * D,
                    dye + r0 * D, a_gate ? a_gate + r0 * F : nullptr, a_up + r0 * F, h + r0 * F,
                    dh + r0 * F, da_gate ? da_gate + r0 * F : nullptr, dxe + r0 * D);
  });
  if (ep) {
    // dx_t = its rows' input gradients, summed on each experts' rank, then over the ranks.
    std::fill_n(dx, N * D, T(0));
    s.exchange.sum_to_tokens<T>(dxe, dx, D, arena);
  } else {
    // dx_t = sum of its pairs' rows of dxs, in plan order.
#pragma omp parallel for schedule(static) if (N * D > kParallelMin)
    for (int64_t t = 0; t < N; ++t) {
      T* out = dx + t * D;
      std::fill_n(out, D, T(0));
      for (int64_t p = s.token_offsets[t]; p < s.token_offsets[t + 1]; ++p) {
        const int32_t r = s.pair_row[p];
        if (r < 0) continue;
        for (int64_t d = 0; d < D; ++d) out[d] += dxs[r * D + d];
      }
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
    T* sda_gate = gated(cfg.act) ? arena.alloc<T>(N * Fs) : nullptr;
    const T* sa_gate = static_cast<const T*>(s.sh_a_gate);
    const T* sa_up = static_cast<const T*>(s.sh_a_up);
    const T* sh = static_cast<const T*>(s.sh_h);
    for (int64_t e = 0; e < S; ++e) {
      ffn_backward<T>(cfg.ffn_act(), ffn_view<T>(params.shared, e, D, Fs),
                      ffn_view<T>(grads.shared, e, D, Fs), N, D, Fs, xp, dsh,
                      sa_gate ? sa_gate + e * N * Fs : nullptr, sa_up + e * N * Fs, sh + e * N * Fs,
                      sdh, sda_gate, sdx);
      for (int64_t i = 0; i < N * D; ++i) dx[i] += sdx[i];
    }
  }

  // Router: the routing method turns weight and loss gradients into logit gradients; then
  // logits = xr W_r^T gives dW_r (unless frozen) and the input gradient through xr.
  T* dlogits = arena.alloc<T>(N * R);
  router.backward(dw, d_aux, d_z, dlogits);
  if (dlogits_extra) {
    dlogits_extra->expect(w, "dlogits_extra", {N, R}, dtype_of<T>());
    const T* extra = dlogits_extra->data<T>();
    for (int64_t i = 0; i < N * R; ++i) dlogits[i] += extra[i];
  }
  const T* xr = static_cast<const T*>(s.xr);
  if (!cfg.freeze_router) {
    cpu::gemm<T>(true, false, R, D, N, T(1), dlogits, R, xr, D, T(1), grads.w_router.data<T>(), D);
    if (cfg.router_bias) {  // column sums in row order
      T* db = grads.b_router.data<T>();
      for (int64_t i = 0; i < N; ++i)
        for (int64_t r = 0; r < R; ++r) db[r] += dlogits[i * R + r];
    }
  }
  if (s.jitter) {
    const T* jitter = static_cast<const T*>(s.jitter);
    T* dxr = arena.alloc<T>(N * D);
    cpu::gemm<T>(false, false, N, D, R, T(1), dlogits, R, params.w_router.data<T>(), D, T(0), dxr,
                 D);
    for (int64_t i = 0; i < N * D; ++i) dx[i] += dxr[i] * jitter[i];
  } else {
    cpu::gemm<T>(false, false, N, D, R, T(1), dlogits, R, params.w_router.data<T>(), D, T(1), dx,
                 D);
  }
  s.valid = false;
}

}  // namespace

void MoeLayer::backward(const Tensor& dy, Tensor& dx, Arena& arena, double d_aux, double d_z,
                        const Tensor* dlogits_extra) {
  MOE_CHECK(!source_, "moe.offload", "offloaded experts run inference only: no backward");
  // The routing of the forward this backward follows.
  const MoeConfig& cfg = dense_forward_ ? dense_cfg_ : cfg_;
  Router& router = dense_forward_ ? *dense_router_ : *router_;
  if (dtype_ == DType::F64) {
    backward_impl<double>(cfg, params_, grads_, router, *saved_, dy, dx, arena, d_aux, d_z,
                          ep_.get(), first_expert_, dlogits_extra);
  } else {
    backward_impl<float>(cfg, params_, grads_, router, *saved_, dy, dx, arena, d_aux, d_z,
                         ep_.get(), first_expert_, dlogits_extra);
  }
}

}  // namespace moe
