// moe/arena.h: a bump allocator for activations.
//
// A layer's forward allocates what its backward needs from an Arena; the training step calls
// reset() once the step is done. The first steps grow the arena; reset() then merges its blocks
// into one block of the high-water size, so a steady-state step makes no heap allocation
// (heap_allocations() counts them). Allocations are 64-byte aligned and, in debug builds,
// filled with NaN so that memory nobody wrote shows up in the results.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "moe/tensor.h"

namespace moe {

class Arena {
 public:
  explicit Arena(size_t initial_bytes = 0);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // n elements of T, uninitialized. Valid until the next reset().
  template <class T>
  T* alloc(int64_t n) {
    return static_cast<T*>(alloc_bytes(static_cast<size_t>(n) * sizeof(T), sizeof(T) == 8));
  }
  // A tensor viewing arena memory.
  Tensor tensor(const Shape& shape, DType dtype);

  // Frees every allocation at once and keeps the memory for the next round.
  void reset();

  // A point to come back to: rewind(mark()) frees what was allocated after the mark (and nothing
  // before it), keeping the memory. For a pass whose steps' scratch dies with each step (a
  // prompt's layers), so that it holds one step's scratch rather than all of them.
  struct Mark {
    size_t block, offset, used;
  };
  Mark mark() const { return {current_, offset_, used_}; }
  void rewind(const Mark& m);

  size_t used() const { return used_; }
  size_t capacity() const;
  size_t high_water() const { return high_water_; }
  int64_t heap_allocations() const { return heap_allocations_; }

 private:
  struct Block {
    std::byte* data;
    size_t size;
  };
  void* alloc_bytes(size_t bytes, bool as_double);
  void add_block(size_t bytes);

  std::vector<Block> blocks_;
  size_t current_ = 0;  // index of the block being filled
  size_t offset_ = 0;   // bytes used in blocks_[current_]
  size_t used_ = 0;     // bytes handed out since reset()
  size_t high_water_ = 0;
  int64_t heap_allocations_ = 0;
};

}  // namespace moe
