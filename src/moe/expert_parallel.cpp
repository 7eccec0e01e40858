// The all-to-all of expert parallelism (see expert_parallel.h).
#include "expert_parallel.h"

#include <algorithm>
#include <cstring>
#include <vector>

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

void ExpertExchange::to_home(const void* expert, void* home, int64_t width, Arena& arena) const {
  char* wire = arena.alloc<char>(rows_ * width);
  reorder(static_cast<const char*>(expert), wire, width, false);
  ep_->alltoallv(wire, recv_rows_, home, send_rows_, width);
}

void ExpertExchange::index_tokens(const int32_t* row_token, Arena& arena) {
  M_ = 0;
  for (int64_t q = 0; q < P_; ++q) M_ += send_rows_[q];
  sent_count_ = arena.alloc<int64_t>(P_);
  recv_count_ = arena.alloc<int64_t>(P_);
  recv_start_ = arena.alloc<int64_t>(P_);
  row_index_ = arena.alloc<int32_t>(std::max<int64_t>(1, M_));
  std::vector<int32_t> sent;
  int64_t r0 = 0;
  for (int64_t q = 0; q < P_; ++q) {
    // The rows for rank q are contiguous (sorted by expert): their distinct tokens, sorted.
    const int64_t n = send_rows_[q];
    std::vector<int32_t> u(row_token + r0, row_token + r0 + n);
    std::sort(u.begin(), u.end());
    u.erase(std::unique(u.begin(), u.end()), u.end());
    for (int64_t r = r0; r < r0 + n; ++r)
      row_index_[r] =
          static_cast<int32_t>(std::lower_bound(u.begin(), u.end(), row_token[r]) - u.begin());
    sent_count_[q] = static_cast<int64_t>(u.size());
    sent.insert(sent.end(), u.begin(), u.end());
    r0 += n;
  }
  sent_total_ = static_cast<int64_t>(sent.size());
  int32_t* tokens = arena.alloc<int32_t>(std::max<int64_t>(1, sent_total_));
  std::copy(sent.begin(), sent.end(), tokens);
  sent_tokens_ = tokens;
  ep_->alltoall(sent_count_, recv_count_, 1);
  recv_total_ = 0;
  for (int64_t q = 0; q < P_; ++q) {
    recv_start_[q] = recv_total_;
    recv_total_ += recv_count_[q];
  }
  // Each row's index travels with the rows (wire order: by source, then its dispatch order).
  wire_index_ = arena.alloc<int32_t>(std::max<int64_t>(1, rows_));
  ep_->alltoallv(row_index_, send_rows_, wire_index_, recv_rows_,
                 static_cast<int64_t>(sizeof(int32_t)));
  wire_source_ = arena.alloc<int64_t>(std::max<int64_t>(1, rows_));
  int64_t k = 0;
  for (int64_t q = 0; q < P_; ++q)
    for (int64_t i = 0; i < recv_rows_[q]; ++i) wire_source_[k++] = q;
}

template <class T>
void ExpertExchange::tokens_to_experts(const T* x, T* expert, int64_t D, const T* row_scale,
                                       Arena& arena) const {
  MOE_CHECK(row_index_ != nullptr, "moe.expert_parallel", "index_tokens was not called");
  const auto row = static_cast<size_t>(D) * sizeof(T);
  T* send = arena.alloc<T>(std::max<int64_t>(1, sent_total_) * D);
  for (int64_t i = 0; i < sent_total_; ++i) std::memcpy(send + i * D, x + sent_tokens_[i] * D, row);
  T* arrived = arena.alloc<T>(std::max<int64_t>(1, recv_total_) * D);
  ep_->alltoallv(send, sent_count_, arrived, recv_count_, D * static_cast<int64_t>(sizeof(T)));
  T* scale = nullptr;
  if (row_scale) {
    scale = arena.alloc<T>(std::max<int64_t>(1, rows_));
    ep_->alltoallv(row_scale, send_rows_, scale, recv_rows_, static_cast<int64_t>(sizeof(T)));
  }
  T* wire = arena.alloc<T>(std::max<int64_t>(1, rows_) * D);
  for (int64_t k = 0; k < rows_; ++k) {
    const T* src = arrived + (recv_start_[wire_source_[k]] + wire_index_[k]) * D;
    T* dst = wire + k * D;
    if (scale) {
      for (int64_t d = 0; d < D; ++d) dst[d] = scale[k] * src[d];
    } else {
      std::memcpy(dst, src, row);
    }
  }
  reorder(reinterpret_cast<const char*>(wire), reinterpret_cast<char*>(expert),
          D * static_cast<int64_t>(sizeof(T)), true);
}

template <class T>
void ExpertExchange::sum_to_tokens(const T* expert, T* out, int64_t D, Arena& arena) const {
  MOE_CHECK(row_index_ != nullptr, "moe.expert_parallel", "index_tokens was not called");
  T* wire = arena.alloc<T>(std::max<int64_t>(1, rows_) * D);
  reorder(reinterpret_cast<const char*>(expert), reinterpret_cast<char*>(wire),
          D * static_cast<int64_t>(sizeof(T)), false);
  T* sums = arena.alloc<T>(std::max<int64_t>(1, recv_total_) * D);
  std::fill_n(sums, std::max<int64_t>(1, recv_total_) * D, T(0));
  for (int64_t k = 0; k < rows_; ++k) {
    T* dst = sums + (recv_start_[wire_source_[k]] + wire_index_[k]) * D;
    const T* src = wire + k * D;
    for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
  }
  T* back = arena.alloc<T>(std::max<int64_t>(1, sent_total_) * D);
  ep_->alltoallv(sums, recv_count_, back, sent_count_, D * static_cast<int64_t>(sizeof(T)));
  for (int64_t i = 0; i < sent_total_; ++i) {
    T* dst = out + sent_tokens_[i] * D;
    const T* src = back + i * D;
    for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
  }
}

template void ExpertExchange::tokens_to_experts<float>(const float*, float*, int64_t, const float*,
                                                       Arena&) const;
template void ExpertExchange::tokens_to_experts<double>(const double*, double*, int64_t,
                                                        const double*, Arena&) const;
template void ExpertExchange::sum_to_tokens<float>(const float*, float*, int64_t, Arena&) const;
template void ExpertExchange::sum_to_tokens<double>(const double*, double*, int64_t, Arena&) const;

}  // namespace moe
