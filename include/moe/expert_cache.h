// moe/expert_cache.h: expert offloading. A model's routed experts stay in its checkpoint files
// (memory-mapped, read only when a token needs them) and at most a bounded number of them are
// resident, in the slots of an ExpertCache; the rest of the model is in memory as usual.
//
// Eviction policies (docs/inference.md has their reasoning):
//   lru      the expert used longest ago;
//   lfu      the expert used least often so far (ties: longest ago);
//   routing  the expert whose next use is expected latest, from routing statistics: layers run
//            in a cycle, so expert (l, e) is next needed after the layers until l comes round,
//            plus a whole cycle for every pass it is expected to sit out (1 / p - 1, p its
//            running frequency of use per pass); the current layer's experts that its tokens
//            still need are never evicted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "moe/model.h"

namespace moe {

enum class EvictionPolicy { lru, lfu, routing };
EvictionPolicy parse_eviction_policy(const std::string& s);
const char* to_string(EvictionPolicy p);

struct ExpertCacheStats {
  int64_t slots = 0;         // experts the cache may hold
  int64_t expert_bytes = 0;  // one expert's weights, as stored
  std::string stored_as;     // float32, bf16, f16 or int8 (read as float32 when used)
  int64_t hits = 0, misses = 0, evictions = 0;
  int64_t bytes_read = 0;  // expert weights copied in from the checkpoint
  double load_s = 0;       // time spent copying them in (by the layers or read-ahead)
  double stall_s = 0;      // time the layers waited for experts
  // Read-ahead: experts read before a layer asked, how many it then used, and how many were
  // still being read when asked for.
  int64_t prefetches = 0, prefetch_used = 0, prefetch_late = 0;
  // Reading time the layers did not wait for.
  double hidden_s() const { return std::max(0.0, load_s - stall_s); }
  std::string str() const;
};

class ExpertCache : public ExpertSource {
 public:
  // The routed experts of the model `cfg` in checkpoint folder `dir` (ours, or a HuggingFace
  // folder of `model_type` with one tensor per expert), stored as float32, bf16, f16 or int8
  // (moe/quantize.h) and held in the cache as stored; or in the GGUF file `dir` (`model_type`
  // "gguf"), held and computed from in their stored types (each layer's own: a Q4_K_M file
  // mixes Q4_K and Q6_K). `capacity_bytes` bounds the resident experts' weights (at least one
  // expert).
  // With `prefetch`, a reader thread copies in the experts prefetch() names while the layers
  // compute.
  ExpertCache(const std::string& dir, const ModelConfig& cfg, const std::string& model_type,
              int64_t capacity_bytes, EvictionPolicy policy, bool prefetch = false);
  ~ExpertCache() override;
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  void observe(int64_t layer, const std::vector<int64_t>& routed, int64_t n_tokens) override;
  ExpertView acquire(int64_t layer, int64_t e) override;
  void release(int64_t layer, int64_t e) override;
  bool wants_prefetch() const override;
  // GGUF experts are computed from their slots in place: when the cache can hold a whole
  // layer's, the layer takes all it needs at once and runs them through the fused kernel.
  bool all_at_once() const override;
  void prefetch(int64_t layer, const std::vector<int64_t>& experts) override;

  // The counts so far, once the reads in flight have finished.
  ExpertCacheStats stats() const;

  struct Impl;

 private:
  void read_ahead();  // the reader thread
  // Copies expert `key` into slot s (marked loading), without the lock held during the copy.
  void fill(std::unique_lock<std::mutex>& lock, int64_t s, int64_t key);
  std::unique_ptr<Impl> impl_;
  ExpertCacheStats stats_;  // guarded by the Impl's mutex
};

// A float32 model from a checkpoint folder or a GGUF file (as load_model) whose routed experts
// stay in the files, behind an ExpertCache of `capacity_bytes`; `cache` receives it (for its
// statistics); `prefetch` reads the next MoE layer's likely experts ahead (Model::decode guesses
// them).
std::unique_ptr<Model> load_model_offloaded(const std::string& dir, int64_t capacity_bytes,
                                            EvictionPolicy policy,
                                            std::shared_ptr<ExpertCache>* cache = nullptr,
                                            bool prefetch = false);

// The process's peak resident memory so far (bytes).
int64_t peak_rss_bytes();

}  // namespace moe
