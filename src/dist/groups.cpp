// The process groups of expert parallelism (see moe/dist.h).
#include "moe/dist.h"
#include "moe/error.h"

namespace moe::dist {

ExpertGroups make_expert_groups(const Comm& world, int ep) {
  MOE_CHECK(ep >= 1 && world.size() % ep == 0, "dist",
            "--expert-parallel {} must divide the number of ranks ({})", ep, world.size());
  ExpertGroups g;
  g.world = world;
  const int r = world.rank();
  g.ep = world.split(r / ep, r % ep);  // the EP ranks that together hold every expert
  g.dp = world.split(r % ep, r / ep);  // the ranks that hold the same experts
  return g;
}

}  // namespace moe::dist
