// Core: tensors, the arena, the RNG, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "moe/arena.h"
#include "moe/error.h"
#include "moe/rng.h"
#include "moe/tensor.h"

namespace moe {

TEST(Tensor, ShapesDtypesAndConversion) {
  Tensor t = Tensor::zeros({2, 3}, DType::F32);
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.nbytes(), 24u);
  EXPECT_EQ(t.str(), "f32[2, 3]");
  t.data<float>()[4] = 1.5f;
  Tensor d = t.to(DType::F64);
  EXPECT_EQ(d.dtype(), DType::F64);
  EXPECT_EQ(d.data<double>()[4], 1.5);
  EXPECT_THROW(t.data<double>(), Error);  // wrong dtype is an error, not a reinterpretation
  Tensor c = t.clone();
  c.data<float>()[4] = 2;
  EXPECT_EQ(t.data<float>()[4], 1.5f);  // clone copies
  EXPECT_THROW(Tensor::empty({2, -1}, DType::F32), Error);
  EXPECT_THROW(Tensor::empty({int64_t(1) << 40, int64_t(1) << 40}, DType::F32), Error);
  Tensor i = Tensor::zeros({4}, DType::I64);
  EXPECT_EQ(i.nbytes(), 32u);
  EXPECT_THROW(i.to(DType::F32), Error);
}

TEST(Tensor, ExpectNamesTheTensor) {
  Tensor t = Tensor::zeros({2, 3}, DType::F32);
  try {
    t.expect("layer.forward", "x", {2, 4}, DType::F32);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[layer.forward] x must be f32[2, 4], got f32[2, 3]"),
              std::string::npos)
        << e.what();
  }
}

TEST(Arena, AlignedReusedAndAllocationFreeWhenSteady) {
  Arena arena;
  for (int round = 0; round < 4; ++round) {
    arena.reset();
    float* a = arena.alloc<float>(1000);
    double* b = arena.alloc<double>(3);
    int32_t* c = arena.alloc<int32_t>(100000);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(c) % 64, 0u);
    a[999] = 1;
    c[99999] = 2;
    if (round == 1) {
      const int64_t allocs = arena.heap_allocations();
      // From the second round on, the blocks have been merged: no more heap allocations.
      arena.reset();
      arena.alloc<float>(1000);
      arena.alloc<double>(3);
      arena.alloc<int32_t>(100000);
      EXPECT_EQ(arena.heap_allocations(), allocs);
    }
  }
  EXPECT_GE(arena.capacity(), arena.high_water());
}

// rewind(mark()) frees what came after the mark and keeps what came before: a pass of many steps
// holds one step's scratch (the most used at once stays that of one step), and memory from
// before the mark is untouched by what is allocated after.
TEST(Arena, RewindFreesOnlyWhatCameAfterTheMark) {
  Arena arena;
  float* keep = arena.alloc<float>(100);
  for (int i = 0; i < 100; ++i) keep[i] = static_cast<float>(i);
  const size_t before = arena.used();
  for (int step = 0; step < 10; ++step) {
    const Arena::Mark m = arena.mark();
    float* scratch = arena.alloc<float>(50000);
    std::fill(scratch, scratch + 50000, -1.0f);
    arena.alloc<double>(7);
    arena.rewind(m);
    EXPECT_EQ(arena.used(), before);
  }
  for (int i = 0; i < 100; ++i) ASSERT_EQ(keep[i], static_cast<float>(i));
  EXPECT_LT(arena.high_water(), before + 2 * 50000 * sizeof(float));
  // A mark past the current allocation is refused by name.
  const Arena::Mark later{arena.mark().block, arena.mark().offset, arena.used() + 64};
  EXPECT_THROW(arena.rewind(later), Error);
}

TEST(Rng, SeededAndWellDistributed) {
  Rng a(42), b(42), c(43);
  EXPECT_EQ(a.next_u64(), b.next_u64());
  EXPECT_NE(a.next_u64(), c.next_u64());
  Rng r(7);
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double v = r.normal();
    sum += v;
    sq += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.02);
  for (int i = 0; i < 1000; ++i) {
    const double u = r.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    const int64_t k = r.randint(3, 9);
    ASSERT_GE(k, 3);
    ASSERT_LT(k, 9);
  }
}

}  // namespace moe
