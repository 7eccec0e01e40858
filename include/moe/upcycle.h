// Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from
// Dense Checkpoints", ICLR 2023): a trained dense model turned into an MoE model whose experts
// all start as copies of the dense FFN they replace.
#pragma once

#include <cstdint>
#include <string>

#include "moe/model.h"

namespace moe {

struct UpcycleOptions {
  int64_t experts = 8;    // E routed experts per upcycled layer
  int64_t top_k = 2;      // K experts per token
  int64_t moe_every = 2;  // layer i becomes MoE when (i + 1) % moe_every == 0 (the paper: every
                          // other FFN, as Switch and GShard place theirs); 1: every layer
  RouterKind router = RouterKind::topk;
  uint64_t seed = 1;  // the routers' initialization
  // Fine-grained experts (DeepSeekMoE's segmentation): the FFN's hidden width F is cut into
  // `segments` runs of F / segments units, and expert e holds run e % segments (experts a
  // multiple of segments), its down projection times `segments`; 1: whole copies.
  int64_t segments = 1;
};

// The MoE model upcycled from `dense` (a model without MoE layers): its config with the MoE
// layers the options name (routed experts of the dense FFN's width, top-k weights renormalized
// where the router allows), every expert of layer i a copy of layer i's FFN, each router new, N(0,
// init_std^2) from the seed (the paper initializes the router afresh), every other parameter
// copied. With renormalized weights the upcycled model computes what the dense model computes
// (sum_k g_k FFN(x) = FFN(x) when the g_k sum to 1), up to float32 rounding, until training
// moves it. Throws naming the option when the model already has MoE layers or o does not make a
// valid MoE configuration. With segments m > 1 a token's output is sum_k g_k m FFN_s(k)(x), FFN_s
// the dense FFN's units of run s (the runs' outputs sum to the FFN's): the dense function again
// when the m runs are each chosen once with weight 1 / m (uniform routing over m experts of
// distinct runs, as at the start of training when the router's logits are near zero).
Model upcycle(Model& dense, const UpcycleOptions& o);

}  // namespace moe
