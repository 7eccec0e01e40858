// The all-to-all of expert parallelism (see expert_parallel.h).
#include "expert_parallel.h"

#include <cstring>

#include "moe/error.h"

namespace moe {

ExpertExchange::ExpertExchange(const dist::Comm& ep, const int64_t* offsets, int64_t n_experts,
                               Arena& arena)
    : ep_(&ep), P_(ep.size()), El_(n_experts / ep.size()) {
  MOE_CHECK(El_ * P_ == n_experts, "moe.expert_parallel",
            "{} experts do not split evenly over {} expert-parallel ranks", n_experts, P_);
  int64_t* send_counts = arena.alloc<int64_t>(P_ * El_);
  for (int64_t e = 0; e < n_experts; ++e) send_counts[e] = offsets[e + 1] - offsets[e];
  recv_counts_ = arena.alloc<int64_t>(P_ * El_);
  ep.alltoall(send_counts, recv_counts_, El_);
  send_rows_ = arena.alloc<int64_t>(P_);
  recv_rows_ = arena.alloc<int64_t>(P_);
  for (int64_t q = 0; q < P_; ++q) {
    send_rows_[q] = offsets[(q + 1) * El_] - offsets[q * El_];
    recv_rows_[q] = 0;
    for (int64_t j = 0; j < El_; ++j) recv_rows_[q] += recv_counts_[q * El_ + j];
  }
  local_offsets_ = arena.alloc<int64_t>(El_ + 1);
  local_offsets_[0] = 0;
  for (int64_t j = 0; j < El_; ++j) {
    int64_t n = 0;
    for (int64_t s = 0; s < P_; ++s) n += recv_counts_[s * El_ + j];
    local_offsets_[j + 1] = local_offsets_[j] + n;
  }
  rows_ = local_offsets_[El_];
}

void ExpertExchange::reorder(const char* from, char* to, int64_t width, bool wire_to_expert) const {
  // Block (s, j) sits at wire offset sum of the blocks before it in (s, j) order, and at expert
  // offset local_offsets[j] + the blocks (s' < s, j) before it.
  int64_t wire = 0;
  for (int64_t s = 0; s < P_; ++s)
    for (int64_t j = 0; j < El_; ++j) {
      int64_t at = local_offsets_[j];
      for (int64_t s2 = 0; s2 < s; ++s2) at += recv_counts_[s2 * El_ + j];
      const int64_t n = recv_counts_[s * El_ + j];
      if (n > 0) {
        const auto bytes = static_cast<size_t>(n * width);
        if (wire_to_expert) {
          std::memcpy(to + at * width, from + wire * width, bytes);
        } else {
          std::memcpy(to + wire * width, from + at * width, bytes);
        }
      }
      wire += n;
    }
}

void ExpertExchange::to_experts(const void* home, void* expert, int64_t width, Arena& arena) const {
  char* wire = arena.alloc<char>(rows_ * width);
  ep_->alltoallv(home, send_rows_, wire, recv_rows_, width);
  reorder(wire, static_cast<char*>(expert), width, true);
}

void ExpertExchange::to_home(const void* expert, void* home, int64_t width, Arena& arena) const {
  char* wire = arena.alloc<char>(rows_ * width);
  reorder(static_cast<const char*>(expert), wire, width, false);
  ep_->alltoallv(wire, recv_rows_, home, send_rows_, width);
}

}  // namespace moe
