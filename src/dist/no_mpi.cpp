// The communicator of a build without MPI: one rank, every collective the identity, and a clear
// error when the job was started by mpirun (see moe/dist.h).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "moe/dist.h"
#include "moe/error.h"

namespace moe::dist {

struct Comm::Impl {};

bool built_with_mpi() { return false; }

bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

void init(int*, char***, double) {
  if (const char* n = std::getenv("OMPI_COMM_WORLD_SIZE"); n && std::atoi(n) > 1)
    throw_error("dist", fmt::format("started by mpirun with {} ranks, but this build of moe has no "
                                    "MPI: install libopenmpi-dev and rebuild",
                                    n));
}

bool initialized() { return false; }

void abort_job(const std::string& why, int code) {
  std::fprintf(stderr, "%s\n", why.c_str());
  std::exit(code);
}

Comm::Comm() = default;
Comm Comm::world() { return Comm(); }
Comm Comm::split(int, int) const { return Comm(); }
void Comm::sum(float*, int64_t) const {}
void Comm::sum(double*, int64_t) const {}
void Comm::sum(int64_t*, int64_t) const {}
double Comm::sum(double v) const { return v; }
double Comm::max(double v) const { return v; }
void Comm::alltoall(const int64_t* send, int64_t* recv, int64_t count) const {
  std::copy_n(send, count, recv);
}
void Comm::alltoallv(const void* send, const int64_t* send_counts, void* recv, const int64_t*,
                     int64_t elem_bytes) const {
  if (send_counts[0] > 0) std::memcpy(recv, send, static_cast<size_t>(send_counts[0] * elem_bytes));
}
void Comm::broadcast(void*, int64_t, int) const {}
void Comm::allgather(const void* send, void* recv, int64_t bytes) const {
  std::memcpy(recv, send, static_cast<size_t>(bytes));
}
void Comm::barrier() const {}
int64_t Comm::alltoall_bytes_sent() const { return 0; }
void Comm::reset_counters() const {}

}  // namespace moe::dist
