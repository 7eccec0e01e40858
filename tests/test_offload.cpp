// Expert offloading: a model whose routed experts stay in the checkpoint's files and pass
// through a bounded cache gives the same logits, bit for bit, and the same generated tokens as
// the model with every expert in memory, whatever the cache size and eviction policy; the cache
// keeps its bound and its counts add up; the routing-aware policy beats LRU on a cyclic pattern.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <set>

#include "moe/expert_cache.h"
#include "moe/generate.h"
#include "moe/gguf.h"
#include "moe/quantize.h"
#include "moe/trainer.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

// A random model of the tiny preset (Mixtral-shaped: saved in Mixtral's layout), or with a
// shared expert (saved under this engine's names), written to a fresh folder.
std::string saved_model(const std::string& name, bool mixtral) {
  ModelConfig cfg = model_preset("tiny");
  cfg.moe.n_experts = 6;
  if (!mixtral) {
    cfg.moe.n_shared = 1;
    cfg.first_dense = 1;
    cfg.n_layers = 3;
  }
  Model model(cfg, DType::F32);
  Rng rng(5);
  model.init(rng);
  const fs::path dir = fs::temp_directory_path() / ("moe_offload_" + name);
  fs::remove_all(dir);
  save_model(model, dir.string());
  return dir.string();
}

Tensor logits_of(Model& model, const std::vector<std::vector<int32_t>>& seqs) {
  const auto T = static_cast<int64_t>(seqs[0].size());
  Tensor tok = Tensor::empty({static_cast<int64_t>(seqs.size()), T}, DType::I32);
  for (size_t b = 0; b < seqs.size(); ++b)
    std::copy(seqs[b].begin(), seqs[b].end(), tok.data<int32_t>() + static_cast<int64_t>(b) * T);
  Arena arena;
  return model.logits(tok, arena).clone();
}

// (Mixtral's layout or ours, experts stored as float32, bf16 or int8)
class Offload : public ::testing::TestWithParam<std::tuple<bool, std::string>> {};

TEST_P(Offload, SameLogitsAndTokensForEveryCacheSizeAndPolicy) {
  const auto [mixtral, format] = GetParam();
  std::string dir = saved_model(std::string(mixtral ? "mixtral_" : "ours_") + format, mixtral);
  if (format != "f32") {  // the same model with quantized experts
    const std::string q = dir + "_" + format;
    fs::remove_all(q);
    quantize_checkpoint(dir, q, parse_expert_format(format));
    dir = q;
  }
  std::unique_ptr<Model> resident = load_model(dir);
  const std::vector<std::vector<int32_t>> seqs = {{1, 72, 101, 108, 108, 111, 44, 32},
                                                  {1, 87, 111, 114, 108, 100, 33, 10}};
  const Tensor want = logits_of(*resident, seqs);
  SamplingConfig greedy;
  greedy.temperature = 0;
  const auto want_ids = generate(*resident, {{1, 72, 101}, {1, 87}}, 12, greedy);
  const ModelConfig& cfg = resident->config();
  const int64_t expert_floats = 3 * cfg.moe.d_ffn * cfg.moe.d_model;
  int64_t moe_layers = 0;
  for (int64_t i = 0; i < cfg.n_layers; ++i) moe_layers += cfg.is_moe_layer(i) ? 1 : 0;
  const int64_t all = moe_layers * cfg.moe.n_experts;
  // An expert's bytes as stored: float32, half of that in bf16, a quarter plus the scales (each
  // part's values and scales aligned to 64 bytes) in int8.
  const CheckpointInfo info = read_checkpoint_info(dir);
  const int64_t expert_bytes =
      ExpertCache(dir, cfg, info.model_type, int64_t{1} << 30, EvictionPolicy::lru)
          .stats()
          .expert_bytes;
  const int64_t F = cfg.moe.d_ffn, D = cfg.moe.d_model;
  auto a64 = [](int64_t b) { return (b + 63) / 64 * 64; };
  EXPECT_EQ(expert_bytes, format == "f32" ? 4 * expert_floats
                          : format == "bf16"
                              ? 2 * expert_floats
                              : 2 * (a64(F * D) + a64(4 * F)) + a64(D * F) + a64(4 * D));
  for (bool ahead : {false, true})
    for (EvictionPolicy policy :
         {EvictionPolicy::lru, EvictionPolicy::lfu, EvictionPolicy::routing})
      for (int64_t slots : {int64_t{1}, int64_t{3}, all}) {
        SCOPED_TRACE(fmt::format("{} with {} slots{}", to_string(policy), slots,
                                 ahead ? ", read-ahead" : ""));
        std::shared_ptr<ExpertCache> cache;
        std::unique_ptr<Model> model =
            load_model_offloaded(dir, slots * expert_bytes, policy, &cache, ahead);
        EXPECT_EQ(model->n_params() + all * expert_floats, resident->n_params());
        const Tensor got = logits_of(*model, seqs);
        EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0) << "logits differ";
        EXPECT_EQ(generate(*model, {{1, 72, 101}, {1, 87}}, 12, greedy), want_ids);
        const ExpertCacheStats s = cache->stats();
        EXPECT_EQ(s.slots, slots);
        EXPECT_GT(s.misses + s.prefetches, 0);
        // Every read fills a free slot or evicts one.
        EXPECT_EQ(s.bytes_read, (s.misses + s.prefetches) * expert_bytes);
        EXPECT_EQ(s.evictions, std::max<int64_t>(0, s.misses + s.prefetches - slots));
        EXPECT_LE(s.prefetch_used, s.prefetches);
        if (slots == all) {
          EXPECT_LE(s.misses, all);  // each expert read once at most
        }
      }
}

INSTANTIATE_TEST_SUITE_P(LayoutsAndFormats, Offload,
                         ::testing::Combine(::testing::Values(true, false),
                                            ::testing::Values("f32", "bf16", "int8")),
                         [](const auto& p) {
                           return std::string(std::get<0>(p.param) ? "mixtral_" : "ours_") +
                                  std::get<1>(p.param);
                         });

// GGUF files: the experts are held and computed from in their stored types, each layer's own
// (the Q4_K_M file's last layer has Q6_K down projections, larger than its Q4_K ones): the same
// logits, bit for bit, and tokens as the file's model with every expert mapped. DeepSeek-V3's
// file adds a dense layer and a shared expert, gpt-oss's experts with biases (read in place).
TEST(OffloadGguf, SameLogitsAndTokensAsTheMappedFile) {
  for (const char* name : {"qwen3moe-Q4_K_M", "deepseek_v3-Q5_K_M", "gpt_oss-MXFP4"}) {
    SCOPED_TRACE(name);
    const std::string path = std::string(MOE_TEST_FIXTURES) + "/gguf/" + name + ".gguf";
    std::unique_ptr<Model> resident = load_model(path, WeightsAs::stored);
    const std::vector<std::vector<int32_t>> seqs = {{1, 72, 101, 108, 108, 111, 44, 32},
                                                    {1, 87, 111, 114, 108, 100, 33, 10}};
    const Tensor want = logits_of(*resident, seqs);
    SamplingConfig greedy;
    greedy.temperature = 0;
    const auto want_ids = generate(*resident, {{1, 72, 101}, {1, 87}}, 12, greedy);
    const ModelConfig& cfg = resident->config();
    const GgufFile f = load_gguf(path);
    int64_t all = 0, expert_bytes = 0;
    std::set<std::string> types;
    const int64_t E = cfg.moe.n_experts;
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      if (!cfg.is_moe_layer(i)) continue;
      all += E;
      int64_t bytes = 0;
      for (const char* part : {"gate", "up", "down"}) {
        const Tensor t = f.view(fmt::format("blk.{}.ffn_{}_exps.weight", i, part));
        bytes += static_cast<int64_t>((t.nbytes() / static_cast<size_t>(E) + 63) / 64 * 64);
        types.insert(dtype_name(t.dtype()));
      }
      expert_bytes = std::max(expert_bytes, bytes);  // the largest layer's (by part, here)
    }
    for (bool ahead : {false, true})
      for (EvictionPolicy policy : {EvictionPolicy::lru, EvictionPolicy::routing})
        for (int64_t slots : {int64_t{1}, int64_t{3}, all}) {
          SCOPED_TRACE(fmt::format("{} with {} slots{}", to_string(policy), slots,
                                   ahead ? ", read-ahead" : ""));
          std::shared_ptr<ExpertCache> cache;
          std::unique_ptr<Model> model =
              load_model_offloaded(path, slots * expert_bytes, policy, &cache, ahead);
          const Tensor got = logits_of(*model, seqs);
          EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0) << "logits differ";
          EXPECT_EQ(generate(*model, {{1, 72, 101}, {1, 87}}, 12, greedy), want_ids);
          const ExpertCacheStats s = cache->stats();
          EXPECT_EQ(s.slots, slots);
          EXPECT_EQ(s.expert_bytes, expert_bytes);
          EXPECT_EQ(s.bytes_read, (s.misses + s.prefetches) * expert_bytes);
          for (const std::string& t : types) EXPECT_NE(s.stored_as.find(t), std::string::npos);
        }
  }
}

// Three layers each needing expert 0 on every pass, with room for two: LRU always evicts the
// one needed next (no hit at all), the routing policy evicts the one needed last.
TEST(ExpertCache, RoutingPolicyBeatsLruOnACycle) {
  ModelConfig cfg = model_preset("tiny");
  cfg.n_layers = 3;
  Model model(cfg, DType::F32);
  Rng rng(1);
  model.init(rng);
  const fs::path dir = fs::temp_directory_path() / "moe_offload_cycle";
  fs::remove_all(dir);
  save_model(model, dir.string());
  const int64_t expert_bytes = 3 * cfg.moe.d_ffn * cfg.moe.d_model * 4;
  std::vector<int64_t> routed(static_cast<size_t>(cfg.moe.n_experts), 0);
  routed[0] = 1;
  auto hits = [&](EvictionPolicy p) {
    ExpertCache cache(dir.string(), cfg, "mixtral", 2 * expert_bytes, p);
    for (int pass = 0; pass < 10; ++pass)
      for (int64_t l = 0; l < 3; ++l) {
        cache.observe(l, routed, 1);
        cache.acquire(l, 0);
        cache.release(l, 0);
      }
    EXPECT_EQ(cache.stats().hits + cache.stats().misses, 30);
    return cache.stats().hits;
  };
  EXPECT_EQ(hits(EvictionPolicy::lru), 0);
  // The best any policy can do (Belady's) on a cycle of three with room for two: a hit on every
  // other access after the first pass, 13 or 14 of 30.
  EXPECT_GE(hits(EvictionPolicy::routing), 13);
}

TEST(ExpertCache, RefusesWhatItCannotDo) {
  const std::string dir = saved_model("errors", true);
  try {
    load_model_offloaded(dir, 1000, EvictionPolicy::lru);
    ADD_FAILURE() << "a cache smaller than one expert was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot hold one expert"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_eviction_policy("fifo"), Error);
  std::unique_ptr<Model> model = load_model_offloaded(dir, int64_t{1} << 30, EvictionPolicy::lru);
  Tensor tok = Tensor::empty({1, 5}, DType::I32);
  for (int i = 0; i < 5; ++i) tok.data<int32_t>()[i] = i + 1;
  Arena arena;
  model->set_training(true);
  EXPECT_THROW(model->forward_backward(tok, arena), Error);  // inference only
}

}  // namespace
}  // namespace moe
