// Sparse upcycling (moe/upcycle.h).
#include "moe/upcycle.h"

#include <fmt/core.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "moe/error.h"
#include "moe/rng.h"

namespace moe {

namespace {
constexpr const char* kWhere = "upcycle";
}  // namespace

Model upcycle(Model& dense, const UpcycleOptions& o) {
  const ModelConfig& dc = dense.config();
  MOE_CHECK(dc.moe_every == 0, kWhere,
            "the model already has MoE layers (moe_every = {}): upcycling starts from a dense one",
            dc.moe_every);
  MOE_CHECK(dc.d_ffn > 0, kWhere, "the dense model has no FFN width (d_ffn = {})", dc.d_ffn);
  MOE_CHECK(o.experts >= 2, kWhere, "--experts must be at least 2, got {}", o.experts);
  MOE_CHECK(o.top_k >= 1 && o.top_k <= o.experts, kWhere,
            "--top-k must be in [1, --experts = {}], got {}", o.experts, o.top_k);
  MOE_CHECK(o.moe_every >= 1 && o.moe_every <= dc.n_layers, kWhere,
            "--moe-every must be in [1, layers = {}], got {}", dc.n_layers, o.moe_every);

  ModelConfig c = dc;
  c.moe_every = o.moe_every;
  c.first_dense = 0;
  c.dense_layers.clear();
  c.moe.d_model = dc.d_model;
  c.moe.d_ffn = dc.d_ffn;
  c.moe.n_experts = o.experts;
  c.moe.top_k = o.top_k;
  c.moe.router = o.router;
  // The combine weights sum to 1 wherever the router lets them (Switch's one expert keeps its
  // probability).
  c.moe.renormalize = o.router != RouterKind::switch_top1;
  try {
    c.validate();
  } catch (const Error& e) {
    throw_error(kWhere, fmt::format("these options make no valid MoE model: {}", e.what()));
  }

  Model up(c);
  Rng rng(o.seed);
  up.init(rng);  // the routers' N(0, init_std^2); everything else is replaced below

  std::map<std::string, const Tensor*> from;
  for (NamedParam& p : dense.params()) from[p.name] = &p.value;
  for (NamedParam& p : up.params()) {
    float* dst = p.value.data<float>();
    const auto it = from.find(p.name);
    if (it != from.end()) {  // embedding, attention, norms, head, the FFNs left dense
      MOE_CHECK(it->second->numel() == p.value.numel(), kWhere, "parameter {}: {} values, not {}",
                p.name, it->second->numel(), p.value.numel());
      const Tensor src = it->second->to(DType::F32);
      std::memcpy(dst, src.data<float>(), static_cast<size_t>(src.numel()) * 4);
      continue;
    }
    // layers.<i>.moe.experts.w_* from layers.<i>.ffn.w_*, copied into every expert.
    const size_t at = p.name.find(".moe.experts.w_");
    if (at != std::string::npos) {
      const std::string ffn = p.name.substr(0, at) + ".ffn." + p.name.substr(at + 13);
      const auto f = from.find(ffn);
      MOE_CHECK(f != from.end(), kWhere, "the dense model has no {} for {}", ffn, p.name);
      const Tensor src = f->second->to(DType::F32);
      MOE_CHECK(src.numel() * o.experts == p.value.numel(), kWhere,
                "{}: {} values per expert, the dense {} has {}", p.name,
                p.value.numel() / o.experts, ffn, src.numel());
      for (int64_t e = 0; e < o.experts; ++e)
        std::memcpy(dst + e * src.numel(), src.data<float>(), static_cast<size_t>(src.numel()) * 4);
      continue;
    }
    MOE_CHECK(p.name.find(".moe.router.") != std::string::npos, kWhere,
              "parameter {} has no counterpart in the dense model", p.name);
  }
  return up;
}

}  // namespace moe
