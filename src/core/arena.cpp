// Arena: blocks that grow on the first rounds and are merged into one on reset().
#include "moe/arena.h"

#include <algorithm>
#include <cstdlib>
#include <limits>

namespace moe {

namespace {
constexpr size_t kAlign = 64;
size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

Arena::Arena(size_t initial_bytes) {
  if (initial_bytes > 0) add_block(initial_bytes);
}

Arena::~Arena() {
  for (Block& b : blocks_) std::free(b.data);
}

void Arena::add_block(size_t bytes) {
  bytes = round_up(std::max<size_t>(bytes, kAlign));
  void* p = std::aligned_alloc(kAlign, bytes);
  MOE_CHECK(p != nullptr, "arena", "out of memory allocating a block of {} bytes", bytes);
  blocks_.push_back({static_cast<std::byte*>(p), bytes});
  ++heap_allocations_;
}

size_t Arena::capacity() const {
  size_t c = 0;
  for (const Block& b : blocks_) c += b.size;
  return c;
}

void* Arena::alloc_bytes(size_t bytes, bool as_double) {
  bytes = round_up(std::max<size_t>(bytes, 1));
  while (current_ < blocks_.size() && offset_ + bytes > blocks_[current_].size) {
    ++current_;
    offset_ = 0;
  }
  if (current_ == blocks_.size()) {
    add_block(std::max(bytes, 2 * capacity()));
    offset_ = 0;
  }
  std::byte* p = blocks_[current_].data + offset_;
  offset_ += bytes;
  used_ += bytes;
  high_water_ = std::max(high_water_, used_);
#ifdef MOE_DEBUG
  if (as_double) {
    std::fill_n(reinterpret_cast<double*>(p), bytes / 8, std::numeric_limits<double>::quiet_NaN());
  } else {
    std::fill_n(reinterpret_cast<float*>(p), bytes / 4, std::numeric_limits<float>::quiet_NaN());
  }
#else
  (void)as_double;
#endif
  return p;
}

Tensor Arena::tensor(const Shape& shape, DType dtype) {
  const int64_t n = shape_numel(shape);
  void* p = alloc_bytes(static_cast<size_t>(n) * dtype_size(dtype), dtype_size(dtype) == 8);
  return Tensor::view(p, shape, dtype);
}

void Arena::rewind(const Mark& m) {
  MOE_CHECK(m.used <= used_ && m.block <= current_ && m.block <= blocks_.size(), "arena",
            "rewind to a mark past the current allocation (used {} at the mark, {} now)", m.used,
            used_);
  current_ = m.block;
  offset_ = m.offset;
  used_ = m.used;
}

void Arena::reset() {
  if (blocks_.size() > 1) {
    // Merge: one block as large as the most this arena ever held at once.
    const size_t want = std::max(high_water_, capacity());
    for (Block& b : blocks_) std::free(b.data);
    blocks_.clear();
    add_block(want);
  }
  current_ = 0;
  offset_ = 0;
  used_ = 0;
}

}  // namespace moe
