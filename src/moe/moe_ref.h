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
  std::vector<int64_t> token_offsets;  // [N + 1] the routing plan, as the router made it
  std::vector<int32_t> expert;         // [P]
  std::vector<uint8_t> kept;           // [P] 1 when the pair is within capacity
};

// Training mode and replayed noise (see MoeLayer::set_noise), for the stochastic routers.
struct RefOptions {
  bool training = false;
  const std::vector<double>* normal = nullptr;
  const std::vector<double>* uniform = nullptr;
};

// x [N, D] -> y [N, D]; the dtype of x selects float or double (params must match). The
// routing method itself is the router's (make_router); everything around it is recomputed here
// one token at a time.
RefOutput moe_forward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x,
                      const RefOptions& opt = {});

// dx [N, D] written; parameter gradients accumulate into grads. Recomputes the forward.
void moe_backward(const MoeConfig& cfg, const MoeParams& params, const Tensor& x, const Tensor& dy,
                  double d_aux, double d_z, Tensor& dx, MoeParams& grads,
                  const RefOptions& opt = {});

}  // namespace moe::ref
