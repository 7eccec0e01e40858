// The all-to-all of expert parallelism: the tokens a rank dispatched travel to the ranks that
// hold their experts, and the experts' outputs (one per dispatched row) travel back.
//
// Experts are split into EP equal blocks of El = E / EP: expert e lives on rank e / El of the
// expert-parallel group. A rank's sorted rows for the experts of rank q are contiguous, so one
// MPI_Alltoallv sends them all, after an MPI_Alltoall of the per-expert row counts (no padding).
// Arriving rows come grouped by source rank; they are reordered by expert (then source rank,
// then the source's order: the order one process would use for the whole batch) so that each
// local expert runs as one GEMM over all of its rows.
//
// Token-level traffic (index_tokens, then tokens_to_experts and sum_to_tokens): a token routed to
// several experts of one rank travels to that rank once, with each of its rows' index into the
// rank's list of arriving tokens; the rank copies it into every row that needs it, and sums the
// input gradients of a token's rows before sending them back once.
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

  // expert [rows(), width] grouped by local expert -> home [M, width] in dispatch order (the
  // experts' outputs, one per row).
  void to_home(const void* expert, void* home, int64_t width_bytes, Arena& arena) const;

  // Token-level traffic. row_token [M]: the token (of this rank's) of each dispatched row.
  // Exchanges which tokens go where and each row's index among them (collective).
  void index_tokens(const int32_t* row_token, Arena& arena);
  // Tokens sent to each rank (each once) and received from all ranks, after index_tokens.
  int64_t tokens_sent() const { return sent_total_; }
  // x [N, D] by token -> expert [rows(), D] grouped by local expert: each row its token's row of
  // x, times row_scale[r] (dispatch order, [M]) when given.
  template <class T>
  void tokens_to_experts(const T* x, T* expert, int64_t D, const T* row_scale, Arena& arena) const;
  // expert [rows(), D] -> out [N, D] += each token's rows summed (on the experts' rank, in wire
  // order; then over the ranks in rank order).
  template <class T>
  void sum_to_tokens(const T* expert, T* out, int64_t D, Arena& arena) const;

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
  // Token-level traffic (index_tokens): per rank q the tokens sent to it (sorted, each once),
  // concatenated in rank order, with their counts; each dispatched row's index in its rank's
  // list; per source rank the tokens arriving from it, and each arriving row's index (wire
  // order) in its source's list.
  int64_t M_ = 0, sent_total_ = 0, recv_total_ = 0;
  const int32_t* sent_tokens_ = nullptr;
  int64_t* sent_count_ = nullptr;   // [P]
  int64_t* recv_count_ = nullptr;   // [P]
  int64_t* recv_start_ = nullptr;   // [P] first arriving token of each source
  int32_t* row_index_ = nullptr;    // [M]
  int32_t* wire_index_ = nullptr;   // [rows()]
  int64_t* wire_source_ = nullptr;  // [rows()]: the source rank of each arriving row
};

}  // namespace moe
