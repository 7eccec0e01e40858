// DenseFfn: the expert FFN kernels applied to every row.
#include "moe/dense_ffn.h"

#include <cmath>

#include "moe/expert_ffn.h"

namespace moe {

DenseFfn::DenseFfn(int64_t d_model, int64_t d_ffn, ExpertAct act, bool bias, DType dtype)
    : d_model_(d_model), d_ffn_(d_ffn), act_(act), dtype_(dtype) {
  MoeConfig cfg;
  cfg.d_model = d_model;
  cfg.d_ffn = d_ffn;
  cfg.n_experts = 1;
  cfg.act = act;
  cfg.expert_bias = bias;
  params_ = MoeParams::zeros(cfg, dtype).experts;
  grads_ = MoeParams::zeros(cfg, dtype).experts;
}

void DenseFfn::init(Rng& rng) {
  for (Tensor* t : {&params_.w_gate, &params_.w_up})
    if (t->raw()) rng.fill_normal(*t, 0, 1.0 / std::sqrt(static_cast<double>(d_model_)));
  rng.fill_normal(params_.w_down, 0, 1.0 / std::sqrt(static_cast<double>(d_ffn_)));
}

namespace {
template <class T>
void forward_t(ExpertAct act, ExpertWeights& w, int64_t D, int64_t F, const Tensor& x, Tensor& y,
               Arena& arena, void*& a_gate, void*& a_up, void*& h) {
  const int64_t N = x.size(0);
  T* ag = gated(act) ? arena.alloc<T>(N * F) : nullptr;
  T* au = arena.alloc<T>(N * F);
  T* hh = arena.alloc<T>(N * F);
  if (w.w_up.dtype() == dtype_of<T>()) {
    ffn_forward<T>(act, ffn_view<T>(w, 0, D, F), N, D, F, x.data<T>(), y.data<T>(), ag, au, hh);
  } else {  // kept as stored (inference)
    ffn_forward_any<T>(act, expert_rows(w, 0), N, D, F, x.data<T>(), y.data<T>(), ag, au, hh);
  }
  a_gate = ag;
  a_up = au;
  h = hh;
}

template <class T>
void backward_t(ExpertAct act, ExpertWeights& w, ExpertWeights& g, int64_t D, int64_t F,
                const Tensor& x, const Tensor& dy, Tensor& dx, Arena& arena, void* a_gate,
                void* a_up, void* h) {
  const int64_t N = x.size(0);
  T* dh = arena.alloc<T>(N * F);
  T* dag = gated(act) ? arena.alloc<T>(N * F) : nullptr;
  ffn_backward<T>(act, ffn_view<T>(w, 0, D, F), ffn_view<T>(g, 0, D, F), N, D, F, x.data<T>(),
                  dy.data<T>(), static_cast<T*>(a_gate), static_cast<T*>(a_up), static_cast<T*>(h),
                  dh, dag, dx.data<T>());
}
}  // namespace

Tensor DenseFfn::forward(const Tensor& x, Arena& arena) {
  MOE_CHECK(x.ndim() == 2 && x.size(1) == d_model_ && x.dtype() == dtype_, "dense_ffn.forward",
            "x must be {}[N, {}], got {}", dtype_name(dtype_), d_model_, x.str());
  x_ = x;
  Tensor y = arena.tensor({x.size(0), d_model_}, dtype_);
  if (dtype_ == DType::F64) {
    forward_t<double>(act_, params_, d_model_, d_ffn_, x, y, arena, a_gate_, a_up_, h_);
  } else {
    forward_t<float>(act_, params_, d_model_, d_ffn_, x, y, arena, a_gate_, a_up_, h_);
  }
  return y;
}

void DenseFfn::backward(const Tensor& dy, Tensor& dx, Arena& arena) {
  MOE_CHECK(h_ != nullptr, "dense_ffn.backward", "backward() called without a forward()");
  dy.expect("dense_ffn.backward", "dy", x_.shape(), dtype_);
  dx.expect("dense_ffn.backward", "dx", x_.shape(), dtype_);
  if (dtype_ == DType::F64) {
    backward_t<double>(act_, params_, grads_, d_model_, d_ffn_, x_, dy, dx, arena, a_gate_, a_up_,
                       h_);
  } else {
    backward_t<float>(act_, params_, grads_, d_model_, d_ffn_, x_, dy, dx, arena, a_gate_, a_up_,
                      h_);
  }
  h_ = nullptr;
}

}  // namespace moe
