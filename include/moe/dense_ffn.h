// moe/dense_ffn.h: a dense FFN (ReLU, GELU or SwiGLU), forward and backward: the transformer's
// ordinary feed-forward layer, and the yardstick the MoE layer is measured against (a dense
// FFN of width K*F does the same FLOPs per token as K experts of width F).
#pragma once

#include "moe/arena.h"
#include "moe/moe_layer.h"

namespace moe {

class DenseFfn {
 public:
  DenseFfn(int64_t d_model, int64_t d_ffn, ExpertAct act, bool bias, DType dtype = DType::F32);

  // Weights as a single "expert": w_gate/w_up [1, F, D], w_down [1, D, F].
  ExpertWeights& params() { return params_; }
  ExpertWeights& grads() { return grads_; }
  void init(Rng& rng);

  // x [N, D] -> y [N, D] in the arena; saves activations for backward().
  Tensor forward(const Tensor& x, Arena& arena);
  // dy [N, D] -> dx [N, D] written; parameter gradients accumulate.
  void backward(const Tensor& dy, Tensor& dx, Arena& arena);

 private:
  int64_t d_model_, d_ffn_;
  ExpertAct act_;
  DType dtype_;
  ExpertWeights params_, grads_;
  Tensor x_;
  void* a_gate_ = nullptr;
  void* a_up_ = nullptr;
  void* h_ = nullptr;
};

}  // namespace moe
