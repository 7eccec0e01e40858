// Names shared by the code that writes this engine's checkpoints (trainer.cpp) and the code
// that reads them (checkpoint_load.cpp).
#pragma once

#include <cstddef>
#include <string>

#include "moe/model.h"

namespace moe {

// Router state saved with the weights: "layers.<i>.moe.router.selection_bias" (f64 [E]) of the
// model's MoE layer number moe_index.
std::string bias_name(const Model& model, size_t moe_index);

}  // namespace moe
