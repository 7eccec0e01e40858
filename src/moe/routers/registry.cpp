// The router registry: which factory builds each RouterKind.
#include "moe/error.h"
#include "moe/router.h"
#include "moe/routers/routers.h"

namespace moe {

std::unique_ptr<Router> make_router(const MoeConfig& cfg) {
  cfg.validate();
  switch (cfg.router) {
    case RouterKind::topk:
    case RouterKind::switch_top1: return routing::make_topk(cfg);
    case RouterKind::noisy_topk: return routing::make_noisy_topk(cfg);
    case RouterKind::gshard: return routing::make_gshard(cfg);
    case RouterKind::expert_choice: return routing::make_expert_choice(cfg);
    case RouterKind::soft: return routing::make_soft(cfg);
    case RouterKind::hierarchical: return routing::make_hierarchical(cfg);
    case RouterKind::deepseek: return routing::make_deepseek(cfg);
  }
  throw_error("moe.router", fmt::format("router {} is not implemented", to_string(cfg.router)));
}

const char* Router::name() const { return to_string(cfg_.router); }

void NoiseSource::share_check(int64_t n_tokens) const {
  MOE_CHECK(n_tokens == share_.n && share_.offset >= 0 && share_.offset + share_.n <= share_.total,
            "moe.noise", "draws for {} tokens, but this rank holds tokens [{}, {}) of {}", n_tokens,
            share_.offset, share_.offset + share_.n, share_.total);
}

double NoiseSource::next(bool normal) {
  if (rng_) return normal ? rng_->normal() : rng_->uniform();
  const std::vector<double>* v = normal ? normal_ : uniform_;
  size_t& pos = normal ? normal_pos_ : uniform_pos_;
  MOE_CHECK(v != nullptr && pos < v->size(), "moe.noise",
            "the routing asked for more {} draws than were given ({})",
            normal ? "normal" : "uniform", v ? v->size() : 0);
  return (*v)[pos++];
}

}  // namespace moe
