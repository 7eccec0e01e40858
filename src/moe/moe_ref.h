// The reference MoE layer: a per-token loop with naive kernels, forward and backward, in float
// or double. It is the oracle the optimized layer (moe_layer.cpp) is tested against and the
// function the finite-difference checks differentiate; it is never on a hot path.
#pragma once

#include <vector>

#include "moe/moe_layer.h"

namespace moe::ref {

struct RefOutput {
  Tensor y;  // [N, D]
  double aux_loss = 0;
  double z_loss = 0;
  std::vector<int32_t> top_idx;  // [N * K] selected experts, best first
  std::vector<uint8_t> kept;     // [N * K] 1 when the pair is within capacity
};

// x [N, D] -> y [N, D]; the dtype of x selects float or double (params must match).
RefOutput moe_forward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x);

// dx [N, D] written; parameter gradients accumulate into grads. Recomputes the forward.
void moe_backward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x, const Tensor& dy,
                  double d_aux, double d_z, Tensor& dx, MoeParams& grads);

}  // namespace moe::ref
