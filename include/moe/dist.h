// moe/dist.h: the processes of a distributed run and what they say to each other (MPI).
//
// A Comm is a group of processes (ranks). Without MPI, or when the program was not started by
// mpirun, the world is one rank and every collective is the identity; a build without MPI says
// so when asked for more than one rank. Every collective here gives the same bits on every
// rank and on every run: sums add the ranks' contributions in rank order (each rank sums one
// chunk, then the chunks are shared), whatever algorithm the MPI library picks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe::dist {

// True when this build links MPI.
bool built_with_mpi();
// True when the environment says mpirun started this process (OpenMPI, MPICH/PMI, Slurm).
bool launched_by_mpirun();
// The ranks of this job on this machine (OpenMPI's OMPI_COMM_WORLD_LOCAL_SIZE; 1 otherwise),
// which share its cores.
int ranks_on_this_machine();

// Starts MPI when this process was launched by mpirun (else does nothing); MPI stops at exit.
// A collective that waits longer than `timeout_s` seconds (0: never) ends the whole job with an
// error naming the collective and the rank: a rank that died or hangs cannot stall the others
// forever. The environment variable MOE_DIST_TIMEOUT (seconds) overrides `timeout_s`.
void init(int* argc, char*** argv, double timeout_s = 300);
bool initialized();
// Ends every rank of the job with `why` on stderr (MPI_Abort); in one process, exits.
[[noreturn]] void abort_job(const std::string& why, int code = 1);

class Comm {
 public:
  // The one-rank group of this process alone.
  Comm();
  // Every rank of the job (one rank when MPI is not running).
  static Comm world();

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ranks with the same color form a group, ordered by key (then by rank).
  Comm split(int color, int key) const;

  // In-place sums over the ranks: every rank gets the same bits.
  void sum(float* v, int64_t n) const;
  void sum(double* v, int64_t n) const;
  void sum(int64_t* v, int64_t n) const;
  double sum(double v) const;
  double max(double v) const;
  // Every rank sends `count` values to every rank: send [size * count] (block q to rank q),
  // recv [size * count] (block q from rank q).
  void alltoall(const int64_t* send, int64_t* recv, int64_t count) const;
  // Variable all-to-all of elements of `elem_bytes` bytes: send_counts[q] elements go to rank q,
  // recv_counts[q] arrive from rank q, each side packed in rank order.
  void alltoallv(const void* send, const int64_t* send_counts, void* recv,
                 const int64_t* recv_counts, int64_t elem_bytes) const;
  // Rank `root`'s `bytes` bytes at `data` to every rank.
  void broadcast(void* data, int64_t bytes, int root) const;
  // Every rank's `bytes` bytes, in rank order, into recv [size * bytes] on every rank.
  void allgather(const void* send, void* recv, int64_t bytes) const;
  void barrier() const;

  // Bytes this process has sent through alltoallv since the last reset (for measurements).
  int64_t alltoall_bytes_sent() const;
  void reset_counters() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
};

// The process groups of expert parallelism over P = EP x DP ranks: rank r holds the experts of
// expert-parallel rank r % EP; `ep` is its group of EP ranks that together hold all experts
// (ranks r - r % EP ...), `dp` the DP ranks that hold the same experts, and `world` all P ranks,
// which hold the non-expert parameters and share the global batch.
struct ExpertGroups {
  Comm world, ep, dp;
  int ep_size() const { return ep.size(); }
  int dp_size() const { return dp.size(); }
};
ExpertGroups make_expert_groups(const Comm& world, int ep);

}  // namespace moe::dist
