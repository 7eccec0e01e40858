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
  const int64_t m = o.segments;
  MOE_CHECK(m >= 1 && dc.d_ffn % m == 0 && o.experts % m == 0, kWhere,
            "--segments must divide the FFN width {} and --experts {}, got {}", dc.d_ffn, o.experts,
            m);

  ModelConfig c = dc;
  c.moe_every = o.moe_every;
  c.first_dense = 0;
  c.dense_layers.clear();
  c.moe.d_model = dc.d_model;
  c.moe.d_ffn = dc.d_ffn / m;
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
      const auto it_ffn = from.find(ffn);
      MOE_CHECK(it_ffn != from.end(), kWhere, "the dense model has no {} for {}", ffn, p.name);
      const Tensor src = it_ffn->second->to(DType::F32);
      MOE_CHECK(src.numel() * o.experts == p.value.numel() * m, kWhere,
                "{}: {} values per expert, the dense {} has {}", p.name,
                p.value.numel() / o.experts, ffn, src.numel());
      // gate and up [F, D]: run s is rows s f ..; down [D, F]: columns s f .. of every row.
      const int64_t F = dc.d_ffn, f = F / m, D = src.numel() / F;
      const bool down = p.name.compare(p.name.size() - 6, 6, "w_down") == 0;
      for (int64_t e = 0; e < o.experts; ++e) {
        const int64_t s = e % m;
        float* out = dst + e * f * D;
        const float* in = src.data<float>();
        if (!down) {
          std::memcpy(out, in + s * f * D, static_cast<size_t>(f * D) * 4);
        } else {
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = 0; j < f; ++j)
              out[d * f + j] = static_cast<float>(m) * in[d * F + s * f + j];
        }
      }
      continue;
    }
    MOE_CHECK(p.name.find(".moe.router.") != std::string::npos, kWhere,
              "parameter {} has no counterpart in the dense model", p.name);
  }
  return up;
}

}  // namespace moe
