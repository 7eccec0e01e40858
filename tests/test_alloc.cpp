// The steady-state training step makes no heap allocation: every operator new of this process is
// counted, and after warm-up steps a training step must not add to the count.
#include <execinfo.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "moe/trainer.h"

namespace {

std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocations{0};

}  // namespace

void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocations.fetch_add(1);
    // MOE_ALLOC_TRACE=1: where each counted allocation comes from (stderr, without allocating).
    static const bool trace = std::getenv("MOE_ALLOC_TRACE") != nullptr;
    if (trace) {
      g_counting = false;
      void* frames[8];
      backtrace_symbols_fd(frames, backtrace(frames, 8), 2);
      g_counting = true;
    }
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace moe {

// Heap allocations made by fn.
template <class Fn>
int64_t allocations(Fn&& fn) {
  g_allocations = 0;
  g_counting = true;
  fn();
  g_counting = false;
  return g_allocations.load();
}

Corpus small_corpus() {
  Corpus c;
  c.languages = {"en", "de"};
  for (int i = 0; i < 80; ++i)
    c.docs.push_back(
        {"document " + std::to_string(i) + " says something about mixtures of experts.", i % 2});
  return c;
}

TEST(Allocations, SteadyStateTrainingStepAllocatesNothing) {
  // Every routing method, and capacity with each drop policy.
  const char* const routers[] = {"topk",          "switch", "noisy_topk",   "gshard",
                                 "expert_choice", "soft",   "hierarchical", "deepseek"};
  for (const char* router : routers) {
    SCOPED_TRACE(router);
    ModelConfig m = model_preset("tiny");
    m.moe.router = parse_router_kind(router);
    if (m.moe.router == RouterKind::switch_top1) {
      m.moe.top_k = 1;
      m.moe.renormalize = false;
      m.moe.jitter_eps = 0.01;
      m.moe.capacity_factor = 1.0;
      m.moe.drop_policy = DropPolicy::score;
    }
    if (m.moe.router == RouterKind::topk) {
      m.moe.explore_prob = 0.1;
      m.moe.capacity_factor = 1.0;
      m.moe.drop_policy = DropPolicy::slot;
    }
    if (m.moe.router == RouterKind::gshard) m.moe.capacity_factor = 1.5;
    if (m.moe.router == RouterKind::expert_choice) m.moe.capacity_factor = 1.0;
    if (m.moe.router == RouterKind::hierarchical) {
      m.moe.hme_groups = 2;
      m.moe.hme_group_k = 1;
    }
    TrainConfig t;
    t.batch = 2;
    t.seq_len = 32;
    t.grad_accum = 2;
    t.steps = 10;
    t.clip = 1.0;
    Trainer trainer(m, t, small_corpus());
    for (int i = 0; i < 3; ++i) trainer.train_step();  // warm-up: the arena reaches its size
    const int64_t n = allocations([&] {
      for (int i = 0; i < 3; ++i) trainer.train_step();
    });
    EXPECT_EQ(n, 0) << "heap allocations in 3 steady-state training steps";
  }
}

}  // namespace moe
