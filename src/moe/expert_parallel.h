// The all-to-all of expert parallelism: the rows a rank dispatched (sorted by expert) travel to
// the ranks that hold their experts, and the experts' outputs travel back.
//
// Experts are split into EP equal blocks of El = E / EP: expert e lives on rank e / El of the
// expert-parallel group. A rank's sorted rows for the experts of rank q are contiguous, so one
// MPI_Alltoallv sends them all, after an MPI_Alltoall of the per-expert row counts (no padding).
// Arriving rows come grouped by source rank; they are reordered by expert (then source rank,
// then the source's order: the order one process would use for the whole batch) so that each
// local expert runs as one GEMM over all of its rows.
#pragma once

#include <cstdint>

#include "moe/arena.h"
#include "moe/dist.h"

namespace moe {

class ExpertExchange {
 public:
  ExpertExchange() = default;
  // offsets [E + 1]: this rank's rows of each expert (all E). Exchanges the counts.
  ExpertExchange(const dist::Comm& ep, const int64_t* offsets, int64_t n_experts, Arena& arena);

  // Rows this rank's experts receive, and their offsets per local expert [El + 1].
  int64_t rows() const { return rows_; }
  const int64_t* local_offsets() const { return local_offsets_; }

  // home [M, width] in dispatch order -> expert [rows(), width] grouped by local expert.
  void to_experts(const void* home, void* expert, int64_t width_bytes, Arena& arena) const;
  // The inverse: expert [rows(), width] -> home [M, width].
  void to_home(const void* expert, void* home, int64_t width_bytes, Arena& arena) const;

 private:
  // Copies between the (source, expert) order of the wire and the (expert, source) order of the
  // experts' GEMMs.
  void reorder(const char* from, char* to, int64_t width, bool wire_to_expert) const;

  const dist::Comm* ep_ = nullptr;
  int64_t P_ = 1, El_ = 0, rows_ = 0;
  int64_t* send_rows_ = nullptr;      // [P] rows to each rank
  int64_t* recv_rows_ = nullptr;      // [P] rows from each rank
  int64_t* recv_counts_ = nullptr;    // [P, El] rows from rank s for local expert j
  int64_t* local_offsets_ = nullptr;  // [El + 1]
};

}  // namespace moe
