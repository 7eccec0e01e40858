// Expert FFN forward and backward (see expert_ffn.h). Gradients w.r.t. W are GEMMs over the
// block's rows; the bias gradients are column sums in row order, so they are deterministic.
#include "moe/expert_ffn.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "moe/kernels.h"
#include "moe/weights.h"

namespace moe {

namespace {

template <class T>
T* at(const Tensor& t, int64_t offset) {
  return t.raw() ? const_cast<T*>(t.data<T>()) + offset : nullptr;
}

template <class T>
void add_bias(T* y, const T* b, int64_t n, int64_t cols) {
  if (!b) return;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < cols; ++c) y[i * cols + c] += b[c];
}

template <class T>
void add_colsum(T* db, const T* dy, int64_t n, int64_t cols) {
  if (!db) return;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < cols; ++c) db[c] += dy[i * cols + c];
}

Activation plain_act(FfnAct act) {
  return act.kind == ExpertAct::relu ? Activation::relu : Activation::gelu;
}

// gpt-oss's clamped SwiGLU (transformers' GptOssExperts, llama.cpp's swiglu_oai): with
// g = min(gate, L), u = clamp(up, -L, L): h = (u + 1) g sigmoid(1.702 g).
constexpr double kOaiAlpha = 1.702;

template <class T>
void swiglu_oai_forward(T* h, const T* gate, const T* up, int64_t n, double limit) {
  const T L = static_cast<T>(limit), a = static_cast<T>(kOaiAlpha);
  for (int64_t i = 0; i < n; ++i) {
    const T g = std::min(gate[i], L), u = std::clamp(up[i], -L, L);
    h[i] = (u + T(1)) * (g / (T(1) + std::exp(-a * g)));
  }
}

// dgate and dup from dh (dup may be dh itself): the clamps pass the gradient inside their
// range (their ends included, as torch.clamp does).
template <class T>
void swiglu_oai_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n,
                         double limit) {
  const T L = static_cast<T>(limit), a = static_cast<T>(kOaiAlpha);
  for (int64_t i = 0; i < n; ++i) {
    const T d = dh[i];
    const T g = std::min(gate[i], L), u = std::clamp(up[i], -L, L);
    const T s = T(1) / (T(1) + std::exp(-a * g));
    dgate[i] = gate[i] <= L ? d * (u + T(1)) * (s + a * g * s * (T(1) - s)) : T(0);
    dup[i] = up[i] >= -L && up[i] <= L ? d * g * s : T(0);
  }
}

// h from the pre-activations: the gated kinds from a_gate and a_up, the others from a_up.
template <class T>
void act_forward_any(FfnAct act, T* h, const T* a_gate, const T* a_up, int64_t n) {
  if (act.kind == ExpertAct::swiglu) {
    cpu::swiglu_forward<T>(h, a_gate, a_up, n);
  } else if (act.kind == ExpertAct::swiglu_oai) {
    swiglu_oai_forward<T>(h, a_gate, a_up, n, act.limit);
  } else {
    cpu::act_forward<T>(plain_act(act), h, a_up, n);
  }
}

}  // namespace

template <class T>
FfnView<T> ffn_view(const ExpertWeights& w, int64_t index, int64_t d_model, int64_t d_ffn) {
  const int64_t fd = d_ffn * d_model;
  return FfnView<T>{at<T>(w.w_gate, index * fd),  at<T>(w.w_up, index * fd),
                    at<T>(w.w_down, index * fd),  at<T>(w.b_gate, index * d_ffn),
                    at<T>(w.b_up, index * d_ffn), at<T>(w.b_down, index * d_model)};
}

template <class T>
FfnView<T> ffn_view(const ExpertView& v) {
  return FfnView<T>{at<T>(v.w_gate, 0), at<T>(v.w_up, 0), at<T>(v.w_down, 0),
                    at<T>(v.b_gate, 0), at<T>(v.b_up, 0), at<T>(v.b_down, 0)};
}

template <class T>
void ffn_forward(FfnAct act, const FfnView<T>& w, int64_t n, int64_t d_model, int64_t d_ffn,
                 const T* x, T* y, T* a_gate, T* a_up, T* h) {
  if (n == 0) return;
  const int64_t D = d_model, F = d_ffn;
  cpu::bf16_keep(x, n * D);  // x and h are saved for the backward: they hold still
  cpu::gemm<T>(false, true, n, F, D, T(1), x, D, w.w_up, D, T(0), a_up, F);
  add_bias(a_up, w.b_up, n, F);
  if (act.gated()) {
    cpu::gemm<T>(false, true, n, F, D, T(1), x, D, w.w_gate, D, T(0), a_gate, F);
    add_bias(a_gate, w.b_gate, n, F);
  }
  act_forward_any<T>(act, h, a_gate, a_up, n * F);
  cpu::bf16_keep(h, n * F);
  cpu::gemm<T>(false, true, n, D, F, T(1), h, F, w.w_down, F, T(0), y, D);
  add_bias(y, w.b_down, n, D);
}

ExpertView expert_rows(const ExpertWeights& w, int64_t index) {
  auto row = [index](const Tensor& t) {
    if (!t.defined() || t.ndim() == 0) return Tensor();
    const Shape s(t.shape().begin() + 1, t.shape().end());
    return t.view_at(index * shape_numel(s), s);  // block-aware for quantized types
  };
  return {row(w.w_gate),
          row(w.w_up),
          row(w.w_down),
          row(w.b_gate),
          row(w.b_up),
          row(w.b_down),
          {},
          {},
          {}};
}

namespace {
const float* bias(const Tensor& b) { return b.defined() && b.raw() ? b.data<float>() : nullptr; }
}  // namespace

namespace {
// y [n, D] = h [n, F] through the stored down projection, in either orientation.
void down_stored(const ExpertView& w, const float* h, int64_t n, float* y) {
  if (w.down_in_rows) {
    cpu::matmul_w(as_weight(w.w_down, &w.s_down), h, w.w_down.size(0), n, y, w.w_down.size(1));
  } else {
    cpu::linear<float>(y, h, n, w.w_down, &w.s_down);
  }
}
}  // namespace

void ffn_forward_stored(FfnAct act, const ExpertView& w, int64_t n, int64_t d_model, int64_t d_ffn,
                        const float* x, float* y, float* a_gate, float* a_up, float* h) {
  if (n == 0) return;
  const int64_t D = d_model, F = d_ffn;
  cpu::linear<float>(a_up, x, n, w.w_up, &w.s_up);
  add_bias(a_up, bias(w.b_up), n, F);
  if (act.gated()) {
    cpu::linear<float>(a_gate, x, n, w.w_gate, &w.s_gate);
    add_bias(a_gate, bias(w.b_gate), n, F);
  }
  act_forward_any<float>(act, h, a_gate, a_up, n * F);
  down_stored(w, h, n, y);
  add_bias(y, bias(w.b_down), n, D);
}

void ffn_forward_stored_fused(FfnAct act, const std::vector<ExpertRun>& runs, int64_t d_model,
                              int64_t d_ffn) {
  const int64_t D = d_model, F = d_ffn;
  const bool swiglu = act.gated();
  std::vector<cpu::MatmulJob> jobs;
  for (const ExpertRun& r : runs) {
    if (r.n == 0) continue;
    jobs.push_back({as_weight(r.w.w_up, &r.w.s_up), r.x, D, r.n, r.a_up, F});
    if (swiglu) jobs.push_back({as_weight(r.w.w_gate, &r.w.s_gate), r.x, D, r.n, r.a_gate, F});
  }
  cpu::matmul_wt_many(jobs.data(), jobs.size());
  jobs.clear();
  for (const ExpertRun& r : runs) {
    if (r.n == 0) continue;
    add_bias(r.a_up, bias(r.w.b_up), r.n, F);
    if (swiglu) add_bias(r.a_gate, bias(r.w.b_gate), r.n, F);
    act_forward_any<float>(act, r.h, r.a_gate, r.a_up, r.n * F);
    if (r.w.down_in_rows) continue;  // below, on its own
    jobs.push_back({as_weight(r.w.w_down, &r.w.s_down), r.h, F, r.n, r.y, D});
  }
  cpu::matmul_wt_many(jobs.data(), jobs.size());
  for (const ExpertRun& r : runs)
    if (r.n > 0 && r.w.down_in_rows) down_stored(r.w, r.h, r.n, r.y);
  for (const ExpertRun& r : runs)
    if (r.n > 0) add_bias(r.y, bias(r.w.b_down), r.n, D);
}

template <class T>
void ffn_forward_any(FfnAct act, const ExpertView& w, int64_t n, int64_t d_model, int64_t d_ffn,
                     const T* x, T* y, T* a_gate, T* a_up, T* h) {
  if (w.w_up.dtype() == dtype_of<T>() && !w.down_in_rows) {
    ffn_forward<T>(act, ffn_view<T>(w), n, d_model, d_ffn, x, y, a_gate, a_up, h);
  } else if constexpr (std::is_same_v<T, float>) {
    ffn_forward_stored(act, w, n, d_model, d_ffn, x, y, a_gate, a_up, h);
  } else {
    throw_error("expert", fmt::format("{} expert weights compute in float32 only",
                                      dtype_name(w.w_up.dtype())));
  }
}

template <class T>
void ffn_backward(FfnAct act, const FfnView<T>& w, const FfnView<T>& g, int64_t n, int64_t d_model,
                  int64_t d_ffn, const T* x, const T* dy, const T* a_gate, const T* a_up,
                  const T* h, T* dh, T* da_gate, T* dx) {
  if (n == 0) return;
  const int64_t D = d_model, F = d_ffn;
  // y = h W_down^T + b_down
  const bool train = g.w_up != nullptr;    // a frozen expert passes gradients through only
  const cpu::Bf16Kept dy_kept(dy, n * D);  // each gradient is read by two products
  if (train) cpu::gemm<T>(true, false, D, F, n, T(1), dy, D, h, F, T(1), g.w_down, F);
  add_colsum(g.b_down, dy, n, D);
  cpu::gemm<T>(false, false, n, F, D, T(1), dy, D, w.w_down, F, T(0), dh, F);
  // h -> pre-activations; da_up overwrites dh in place.
  T* da_up = dh;
  if (act.kind == ExpertAct::swiglu) {
    cpu::swiglu_backward<T>(da_gate, da_up, dh, a_gate, a_up, n * F);
  } else if (act.kind == ExpertAct::swiglu_oai) {
    swiglu_oai_backward<T>(da_gate, da_up, dh, a_gate, a_up, n * F, act.limit);
  } else {
    cpu::act_backward<T>(plain_act(act), da_up, dh, a_up, n * F);
  }
  // a_up = x W_up^T + b_up (and the same for a_gate)
  const cpu::Bf16Kept da_up_kept(da_up, n * F);
  const cpu::Bf16Kept da_gate_kept(act.gated() ? da_gate : nullptr, n * F);
  if (train) cpu::gemm<T>(true, false, F, D, n, T(1), da_up, F, x, D, T(1), g.w_up, D);
  add_colsum(g.b_up, da_up, n, F);
  cpu::gemm<T>(false, false, n, D, F, T(1), da_up, F, w.w_up, D, T(0), dx, D);
  if (act.gated()) {
    if (train) cpu::gemm<T>(true, false, F, D, n, T(1), da_gate, F, x, D, T(1), g.w_gate, D);
    add_colsum(g.b_gate, da_gate, n, F);
    cpu::gemm<T>(false, false, n, D, F, T(1), da_gate, F, w.w_gate, D, T(1), dx, D);
  }
}

#define MOE_INSTANTIATE(T)                                                                         \
  template void ffn_forward_any<T>(FfnAct, const ExpertView&, int64_t, int64_t, int64_t, const T*, \
                                   T*, T*, T*, T*);                                                \
  template FfnView<T> ffn_view<T>(const ExpertWeights&, int64_t, int64_t, int64_t);                \
  template FfnView<T> ffn_view<T>(const ExpertView&);                                              \
  template void ffn_forward<T>(FfnAct, const FfnView<T>&, int64_t, int64_t, int64_t, const T*, T*, \
                               T*, T*, T*);                                                        \
  template void ffn_backward<T>(FfnAct, const FfnView<T>&, const FfnView<T>&, int64_t, int64_t,    \
                                int64_t, const T*, const T*, const T*, const T*, const T*, T*, T*, \
                                T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
