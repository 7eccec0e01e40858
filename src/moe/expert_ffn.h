// The expert FFN on a block of rows, forward and backward: the GEMMs every expert runs.
//
// x [n, D] -> y [n, D] through hidden width F:
//   SwiGLU:     a_gate = x W_gate^T + b_gate, a_up = x W_up^T + b_up, h = silu(a_gate) * a_up
//   ReLU/GELU:  a_up = x W_up^T + b_up, h = act(a_up)
//   y = h W_down^T + b_down
// Used for routed experts (on their row block), shared experts and the dense FFN (on all rows).
#pragma once

#include <cstdint>
#include <vector>

#include "moe/moe_config.h"
#include "moe/moe_layer.h"

namespace moe {

// One expert's tensors (weights, or their gradients) as pointers; null where absent.
template <class T>
struct FfnView {
  T* w_gate = nullptr;  // [F, D]
  T* w_up = nullptr;    // [F, D]
  T* w_down = nullptr;  // [D, F]
  T* b_gate = nullptr;  // [F]
  T* b_up = nullptr;    // [F]
  T* b_down = nullptr;  // [D]
};

// Expert `index` of `w`, whose tensors are [X, F, D], [X, D, F], [X, F], [X, D]. The view is
// writable (it also serves gradients); pass weights only to functions that read them.
template <class T>
FfnView<T> ffn_view(const ExpertWeights& w, int64_t index, int64_t d_model, int64_t d_ffn);
// One expert's views (an offloaded expert's cache slot, say) as pointers.
template <class T>
FfnView<T> ffn_view(const ExpertView& v);

// Expert `index` of w [X, ...] as views of its tensors, whatever their dtype.
ExpertView expert_rows(const ExpertWeights& w, int64_t index);

// Forward on n rows in float32 from weights of any stored format (f32, bf16, f16 matrices through
// moe/weights.h; biases float32): inference of checkpoints kept as stored.
void ffn_forward_stored(FfnAct act, const ExpertView& w, int64_t n, int64_t d_model, int64_t d_ffn,
                        const float* x, float* y, float* a_gate, float* a_up, float* h);

// The fused expert kernel: several experts' forwards on their rows (a token's k experts when
// decoding; every expert's block of a prompt, a grouped GEMM), weights as stored: every expert's
// gate and up projections in one parallel region, the activations, then every down projection in
// a second one. Each expert's results are ffn_forward_stored's, bit for bit.
struct ExpertRun {
  ExpertView w;
  int64_t n = 0;
  const float* x = nullptr;                                // [n, D]
  float* y = nullptr;                                      // [n, D]
  float *a_gate = nullptr, *a_up = nullptr, *h = nullptr;  // [n, F] each (a_gate: SwiGLU)
};
void ffn_forward_stored_fused(FfnAct act, const std::vector<ExpertRun>& runs, int64_t d_model,
                              int64_t d_ffn);

// ffn_forward when w holds T, ffn_forward_stored otherwise (T = float).
template <class T>
void ffn_forward_any(FfnAct act, const ExpertView& w, int64_t n, int64_t d_model, int64_t d_ffn,
                     const T* x, T* y, T* a_gate, T* a_up, T* h);

// Forward on n rows. Saves a_gate (SwiGLU only), a_up and h, each [n, F], for the backward.
template <class T>
void ffn_forward(FfnAct act, const FfnView<T>& w, int64_t n, int64_t d_model, int64_t d_ffn,
                 const T* x, T* y, T* a_gate, T* a_up, T* h);

// Backward on n rows: dx [n, D] written, gradients accumulated into g (an empty view, as for a
// frozen expert, accumulates nothing). dh and da_gate are [n, F] scratch (da_gate SwiGLU only).
template <class T>
void ffn_backward(FfnAct act, const FfnView<T>& w, const FfnView<T>& g, int64_t n, int64_t d_model,
                  int64_t d_ffn, const T* x, const T* dy, const T* a_gate, const T* a_up,
                  const T* h, T* dh, T* da_gate, T* dx);

}  // namespace moe
