// The process groups of expert parallelism (see moe/dist.h).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "moe/dist.h"
#include "moe/error.h"

namespace moe::dist {

int ranks_on_this_machine() {
  const char* n = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  return n ? std::max(1, std::atoi(n)) : 1;
}

ExpertGroups make_expert_groups(const Comm& world, int ep) {
  MOE_CHECK(ep == 1 || built_with_mpi(), "dist",
            "--expert-parallel {} needs MPI, and this build of moe has none: install "
            "libopenmpi-dev openmpi-bin and rebuild",
            ep);
  MOE_CHECK(ep >= 1 && world.size() % ep == 0, "dist",
            "--expert-parallel {} must divide the number of ranks ({}){}", ep, world.size(),
            world.size() == 1 ? fmt::format(": start the job with mpirun -np {} moe ...", ep)
                              : std::string());
  ExpertGroups g;
  g.world = world;
  const int r = world.rank();
  g.ep = world.split(r / ep, r % ep);  // the EP ranks that together hold every expert
  g.dp = world.split(r % ep, r / ep);  // the ranks that hold the same experts
  return g;
}

}  // namespace moe::dist
