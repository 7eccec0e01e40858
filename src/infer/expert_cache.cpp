// Expert offloading: the bounded expert cache (see moe/expert_cache.h).
#include "moe/expert_cache.h"

#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "moe/gguf.h"
#include "moe/gguf_model.h"
#include "moe/hf.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"

namespace moe {

namespace fs = std::filesystem;

EvictionPolicy parse_eviction_policy(const std::string& s) {
  if (s == "lru") return EvictionPolicy::lru;
  if (s == "lfu") return EvictionPolicy::lfu;
  if (s == "routing") return EvictionPolicy::routing;
  throw_error("offload", fmt::format("unknown cache policy '{}' (lru, lfu, routing)", s));
}

const char* to_string(EvictionPolicy p) {
  switch (p) {
    case EvictionPolicy::lru: return "lru";
    case EvictionPolicy::lfu: return "lfu";
    case EvictionPolicy::routing: return "routing";
  }
  return "?";
}

std::string ExpertCacheStats::str() const {
  const int64_t n = hits + misses;
  std::string s = fmt::format(
      "expert cache: {} slots of {:.2f} MB ({}); {} hits, {} misses ({:.1f}% hits), {} "
      "evictions; {:.1f} MB read, {:.3f} s stalled",
      slots, static_cast<double>(expert_bytes) / 1e6, stored_as, hits, misses,
      n > 0 ? 100.0 * static_cast<double>(hits) / static_cast<double>(n) : 0.0, evictions,
      static_cast<double>(bytes_read) / 1e6, stall_s);
  if (prefetches > 0)
    s += fmt::format(
        "\nprefetch: {} experts read ahead, {} of them used ({} still loading when asked for); "
        "{:.3f} s of {:.3f} s of reading hidden ({:.0f}%)",
        prefetches, prefetch_used, prefetch_late, hidden_s(), load_s,
        load_s > 0 ? 100.0 * hidden_s() / load_s : 0.0);
  return s;
}

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

namespace {

// One expert's weights in the checkpoint: for each part (gate, SwiGLU only; up; down) its bytes
// in the mapped files, as stored, and for int8 its rows' scales.
struct Located {
  const char* from[3] = {nullptr, nullptr, nullptr};
  size_t bytes[3] = {0, 0, 0};
  const float* scales[3] = {nullptr, nullptr, nullptr};
};

}  // namespace

struct ExpertCache::Impl {
  ModelConfig cfg;
  EvictionPolicy policy;
  int64_t L = 0, E = 0, F = 0, D = 0;
  bool gate = true;
  int64_t floats = 0;  // per expert, as float32
  // How the experts are stored (in safetensors, every expert alike): each part's dtype, and its
  // bytes in a slot (values, then one float32 scale per row for int8; the largest layer's for
  // GGUF).
  std::string dtype[3];
  int64_t rows[3] = {0, 0, 0}, part_bytes[3] = {0, 0, 0}, slot_bytes = 0;
  bool float32 = true;            // all parts float32: the layers read the slots themselves
  std::unique_ptr<float[]> work;  // else: the acquired expert, converted to float32
  bool work_busy = false;
  // The files: our checkpoint (one safetensors file), a HuggingFace folder (shards) or a GGUF
  // file, whose experts are computed from as stored (each layer's parts in their own types).
  std::unique_ptr<SafetensorsFile> ours;
  std::unique_ptr<HfTensors> hf;
  std::unique_ptr<GgufFile> gguf;
  std::vector<std::array<DType, 3>> gguf_types;  // [L]
  std::vector<std::array<Tensor, 3>> gguf_bias;  // [L] float32 [E, F], [E, F], [E, D] (gpt-oss)
  std::vector<Located> where;                    // [L * E]

  struct Slot {
    int64_t key = -1;  // l * E + e, or -1 when free
    std::unique_ptr<char[]> data;
    int64_t last_use = 0;
    bool pinned = false;      // a layer is running it
    bool loading = false;     // its bytes are being copied in
    bool prefetched = false;  // read ahead and not used yet
  };
  std::vector<Slot> slots;
  int64_t max_slots = 0;
  std::vector<int32_t> slot_of;  // [L * E] -> slot, -1 when not resident
  std::vector<int64_t> uses;     // [L * E] acquisitions so far (lfu)
  std::vector<double> freq;      // [L * E] running frequency of use per pass (routing)
  std::vector<char> needed;      // [E] the current layer's experts still to run (routing)
  int64_t layer = 0;             // the layer being run
  int64_t tick = 0;

  // Prefetching: a reader thread copies the experts of the queue into slots ahead of use. The
  // mutex guards everything above and the queue; the bytes are copied outside it.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<int64_t> queue;
  bool stop = false;
  std::thread reader;

  // Copies expert `key`, as stored, into out (a slot's buffer, taken under the lock; the copy
  // runs outside).
  void copy_in(char* out, int64_t key) const {
    const Located& src = where[static_cast<size_t>(key)];
    for (int k = gate ? 0 : 1; k < 3; ++k) {
      std::memcpy(out, src.from[k], src.bytes[k]);
      drop_mapped_pages(src.from[k], src.bytes[k]);
      if (src.scales[k])
        std::memcpy(out + (src.bytes[k] + 63) / 64 * 64, src.scales[k],
                    static_cast<size_t>(rows[k]) * sizeof(float));
      out += part_bytes[k];
    }
  }

  // A slot for `key` (under the lock): a new one while there is room, else the policy's
  // victim. A read-ahead never takes an expert the current layer still needs, nor one read
  // ahead and unused. -1 when every slot is busy.
  int64_t take_slot(int64_t key, bool ahead, ExpertCacheStats& st) {
    int64_t s = -1;
    if (static_cast<int64_t>(slots.size()) < max_slots) {
      slots.emplace_back();
      slots.back().data = std::make_unique<char[]>(static_cast<size_t>(slot_bytes));
      s = static_cast<int64_t>(slots.size()) - 1;
    } else {
      s = victim(ahead);
      if (s < 0) return -1;
      slot_of[static_cast<size_t>(slots[static_cast<size_t>(s)].key)] = -1;
      ++st.evictions;
    }
    Slot& slot = slots[static_cast<size_t>(s)];
    slot.key = key;
    slot.loading = true;
    slot.prefetched = ahead;
    slot_of[static_cast<size_t>(key)] = static_cast<int32_t>(s);
    return s;
  }

  // Next use of expert `key`, in layer steps from now, as the routing policy expects it.
  double next_use(int64_t key) const {
    const int64_t l = key / E, e = key % E;
    if (l == layer && needed[static_cast<size_t>(e)]) return 0;
    const int64_t d = l > layer ? l - layer : l - layer + L;  // steps until l runs again
    const double p = std::max(freq[static_cast<size_t>(key)], 1e-6);
    return static_cast<double>(d) + static_cast<double>(L) * (1.0 / p - 1.0);
  }

  int64_t victim(bool ahead) const {
    int64_t best = -1;
    for (size_t i = 0; i < slots.size(); ++i) {
      const Slot& s = slots[i];
      if (s.pinned || s.loading) continue;
      if (ahead && (s.prefetched || (s.key / E == layer && needed[static_cast<size_t>(s.key % E)])))
        continue;
      if (best < 0) {
        best = static_cast<int64_t>(i);
        continue;
      }
      const Slot& b = slots[static_cast<size_t>(best)];
      bool better = false;
      switch (policy) {
        case EvictionPolicy::lru: better = s.last_use < b.last_use; break;
        case EvictionPolicy::lfu: {
          const int64_t us = uses[static_cast<size_t>(s.key)],
                        ub = uses[static_cast<size_t>(b.key)];
          better = us < ub || (us == ub && s.last_use < b.last_use);
          break;
        }
        case EvictionPolicy::routing: {
          const double ns = next_use(s.key), nb = next_use(b.key);
          better = ns > nb || (ns == nb && s.last_use < b.last_use);
          break;
        }
      }
      if (better) best = static_cast<int64_t>(i);
    }
    return best;
  }
};

namespace {

// Where every expert is in a safetensors checkpoint (ours: one stacked tensor per part and
// layer; HuggingFace: one tensor per expert and part), and how they are stored: as expert 0 is,
// every expert alike.
void locate_safetensors(ExpertCache::Impl& m, const std::string& dir, const ModelConfig& cfg,
                        const std::string& model_type) {
  const char* w = "offload";
  std::vector<const StoredTensor*> parts[3];  // [L * E] per part
  for (auto& p : parts) p.resize(static_cast<size_t>(m.L * m.E));
  auto check = [&](const StoredTensor& t, const std::string& name, int64_t rows, int64_t cols) {
    MOE_CHECK(t.as_f32() && t.row_len() == cols && t.rows() == rows, w,
              "{} must be float32, bf16, f16 or int8 with {} rows of {} to be offloaded, got {} {}",
              name, rows, cols, t.dtype, fmt::format("{}", fmt::join(t.shape, "x")));
  };
  const int64_t part_cols[3] = {m.D, m.D, m.F};
  // Expert (li, e)'s part k: rows [first, first + m.rows[k]) of t.
  auto place = [&](int64_t li, int64_t e, int k, const StoredTensor& t, int64_t first) {
    Located& at = m.where[static_cast<size_t>(li * m.E + e)];
    at.from[k] = t.data + static_cast<size_t>(first) * t.row_bytes();
    at.bytes[k] = static_cast<size_t>(m.rows[k]) * t.row_bytes();
    at.scales[k] = t.scale ? t.scale_values + first : nullptr;
    parts[k][static_cast<size_t>(li * m.E + e)] = &t;
  };
  int64_t li = 0;
  if (model_type == "moe_cpp") {
    m.ours = std::make_unique<SafetensorsFile>(
        load_safetensors((fs::path(dir) / "model.safetensors").string()));
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      if (!cfg.is_moe_layer(i)) continue;
      const std::string p = fmt::format("layers.{}.moe.experts.", i);
      const char* names[3] = {"w_gate", "w_up", "w_down"};
      for (int k = m.gate ? 0 : 1; k < 3; ++k) {
        MOE_CHECK(m.ours->has(p + names[k]), w, "{} has no tensor {}", dir, p + names[k]);
        const StoredTensor& t = m.ours->stored.at(p + names[k]);
        check(t, p + names[k], m.E * m.rows[k], part_cols[k]);
        for (int64_t e = 0; e < m.E; ++e) place(li, e, k, t, e * m.rows[k]);
      }
      ++li;
    }
  } else {
    m.hf = std::make_unique<HfTensors>(dir);
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      if (!cfg.is_moe_layer(i)) continue;
      for (int64_t e = 0; e < m.E; ++e) {
        const std::vector<std::string> names = hf_expert_names(model_type, i, e);
        for (int k = m.gate ? 0 : 1; k < 3; ++k) {
          const std::string& name = names[static_cast<size_t>(k)];
          MOE_CHECK(m.hf->has(name), w,
                    "{} has no tensor {} (offloading reads one tensor per expert)", dir, name);
          const StoredTensor& t = m.hf->stored(name);
          check(t, name, m.rows[k], part_cols[k]);
          place(li, e, k, t, 0);
        }
      }
      ++li;
    }
  }
  auto align = [](int64_t b) { return (b + 63) / 64 * 64; };
  for (int k = m.gate ? 0 : 1; k < 3; ++k) {
    const StoredTensor& t = *parts[k][0];
    m.dtype[k] = t.dtype;
    m.part_bytes[k] = align(m.rows[k] * static_cast<int64_t>(t.row_bytes())) +
                      (t.scale ? align(m.rows[k] * 4) : 0);
    m.slot_bytes += m.part_bytes[k];
    m.float32 = m.float32 && t.dtype == "F32";
    for (const StoredTensor* at : parts[k])
      MOE_CHECK(
          at->dtype == t.dtype, w,
          "the experts are stored in different dtypes ({} and {}): offloading needs them alike",
          t.dtype, at->dtype);
  }
}

// A GGUF file's expert types, each once in order of appearance: "Q4_K+Q6_K".
std::string gguf_types_str(const std::vector<std::array<DType, 3>>& types) {
  std::vector<std::string> names;
  for (const auto& layer : types)
    for (DType t : layer)
      if (std::find(names.begin(), names.end(), dtype_name(t)) == names.end())
        names.emplace_back(dtype_name(t));
  return fmt::format("{}", fmt::join(names, "+"));
}

}  // namespace

ExpertCache::ExpertCache(const std::string& dir, const ModelConfig& cfg,
                         const std::string& model_type, int64_t capacity_bytes,
                         EvictionPolicy policy, bool prefetch)
    : impl_(std::make_unique<Impl>()) {
  const char* w = "offload";
  Impl& m = *impl_;
  m.cfg = cfg;
  m.policy = policy;
  const MoeConfig& mc = cfg.moe;
  MOE_CHECK(!mc.expert_bias || model_type == "gguf", w,
            "offloading experts with biases is supported for GGUF files only");
  for (int64_t i = 0; i < cfg.n_layers; ++i) m.L += cfg.is_moe_layer(i) ? 1 : 0;
  MOE_CHECK(m.L > 0, w, "the model has no MoE layer: nothing to offload");
  m.E = mc.n_experts;
  m.F = mc.d_ffn;
  m.D = mc.d_model;
  m.gate = gated(mc.act);
  m.floats = (m.gate ? 2 : 1) * m.F * m.D + m.D * m.F;

  // Where every expert is in the files.
  m.where.resize(static_cast<size_t>(m.L * m.E));
  const int64_t part_rows[3] = {m.F, m.F, m.D}, part_cols[3] = {m.D, m.D, m.F};
  for (int k = 0; k < 3; ++k) m.rows[k] = part_rows[k];
  auto align = [](int64_t b) { return (b + 63) / 64 * 64; };
  if (model_type == "gguf") {
    m.gguf = std::make_unique<GgufFile>(load_gguf(dir));
    const char* names[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
    m.gguf_types.resize(static_cast<size_t>(m.L));
    m.gguf_bias.resize(static_cast<size_t>(m.L));
    int64_t li = 0;
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      if (!cfg.is_moe_layer(i)) continue;
      for (int k = m.gate ? 0 : 1; k < 3; ++k) {
        const std::string name = fmt::format("blk.{}.{}.weight", i, names[k]);
        MOE_CHECK(m.gguf->has_tensor(name), w, "{} has no tensor {}", dir, name);
        const Tensor t = m.gguf->view(name);
        MOE_CHECK(t.shape() == Shape({m.E, part_rows[k], part_cols[k]}), w,
                  "{}: {} must be [{}, {}, {}] to be offloaded, got {}", dir, name, m.E,
                  part_rows[k], part_cols[k], t.str());
        const auto bytes = static_cast<size_t>(dtype_bytes(t.dtype(), part_rows[k] * part_cols[k]));
        for (int64_t e = 0; e < m.E; ++e) {
          Located& at = m.where[static_cast<size_t>(li * m.E + e)];
          at.from[k] = static_cast<const char*>(t.raw()) + static_cast<size_t>(e) * bytes;
          at.bytes[k] = bytes;
        }
        m.gguf_types[static_cast<size_t>(li)][static_cast<size_t>(k)] = t.dtype();
        if (mc.expert_bias) {  // small: read where they lie, never cached
          const std::string b = fmt::format("blk.{}.{}.bias", i, names[k]);
          MOE_CHECK(m.gguf->has_tensor(b), w, "{} has no tensor {}", dir, b);
          const Tensor bt = m.gguf->view(b);
          MOE_CHECK(bt.dtype() == DType::F32 && bt.shape() == Shape({m.E, part_rows[k]}), w,
                    "{}: {} must be float32 [{}, {}], got {}", dir, b, m.E, part_rows[k], bt.str());
          m.gguf_bias[static_cast<size_t>(li)][static_cast<size_t>(k)] = bt;
        }
        m.part_bytes[k] = std::max(m.part_bytes[k], align(static_cast<int64_t>(bytes)));
        m.dtype[k] = dtype_name(t.dtype());
      }
      ++li;
    }
    for (int k = m.gate ? 0 : 1; k < 3; ++k) m.slot_bytes += m.part_bytes[k];
    m.float32 = true;  // the slots are read in place, as stored
  } else {
    locate_safetensors(m, dir, cfg, model_type);
  }
  if (!m.float32) m.work = std::make_unique<float[]>(static_cast<size_t>(m.floats));
  stats_.expert_bytes = m.slot_bytes;
  stats_.stored_as = m.gguf                 ? gguf_types_str(m.gguf_types)
                     : m.dtype[2] == "F32"  ? "float32"
                     : m.dtype[2] == "I8"   ? "int8"
                     : m.dtype[2] == "BF16" ? "bf16"
                                            : "f16";
  m.max_slots = std::min(capacity_bytes / stats_.expert_bytes, m.L * m.E);
  MOE_CHECK(m.max_slots >= 1, w,
            "the cache of {:.2f} MB cannot hold one expert ({:.2f} MB): give a larger size",
            static_cast<double>(capacity_bytes) / 1e6,
            static_cast<double>(stats_.expert_bytes) / 1e6);
  stats_.slots = m.max_slots;
  m.slot_of.assign(static_cast<size_t>(m.L * m.E), -1);
  m.uses.assign(static_cast<size_t>(m.L * m.E), 0);
  m.freq.assign(static_cast<size_t>(m.L * m.E),
                static_cast<double>(mc.top_k) / static_cast<double>(m.E));
  m.needed.assign(static_cast<size_t>(m.E), 0);
  m.slots.reserve(static_cast<size_t>(m.max_slots));  // slots never move
  if (prefetch) m.reader = std::thread([this] { read_ahead(); });
}

ExpertCache::~ExpertCache() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.stop = true;
  }
  m.cv.notify_all();
  if (m.reader.joinable()) m.reader.join();
}

bool ExpertCache::wants_prefetch() const { return impl_->reader.joinable(); }

bool ExpertCache::all_at_once() const { return impl_->gguf && impl_->max_slots >= impl_->E; }

void ExpertCache::prefetch(int64_t layer, const std::vector<int64_t>& experts) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.queue.clear();  // only the newest guess matters
    for (int64_t e : experts)
      if (m.slot_of[static_cast<size_t>(layer * m.E + e)] < 0) m.queue.push_back(layer * m.E + e);
  }
  m.cv.notify_all();
}

void ExpertCache::read_ahead() {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  for (;;) {
    m.cv.wait(lock, [&] { return m.stop || !m.queue.empty(); });
    if (m.stop) return;
    const int64_t key = m.queue.front();
    m.queue.pop_front();
    if (m.slot_of[static_cast<size_t>(key)] >= 0) continue;
    const int64_t s = m.take_slot(key, true, stats_);
    if (s < 0) continue;  // no room: the layer will read it itself if it needs it
    ++stats_.prefetches;
    fill(lock, s, key);
  }
}

void ExpertCache::fill(std::unique_lock<std::mutex>& lock, int64_t s, int64_t key) {
  Impl& m = *impl_;
  char* out = m.slots[static_cast<size_t>(s)].data.get();
  lock.unlock();
  const auto t0 = std::chrono::steady_clock::now();
  m.copy_in(out, key);
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  lock.lock();
  m.slots[static_cast<size_t>(s)].loading = false;
  stats_.load_s += dt;
  stats_.bytes_read += stats_.expert_bytes;
  m.cv.notify_all();
}

void ExpertCache::observe(int64_t layer, const std::vector<int64_t>& routed, int64_t /*n*/) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.layer = layer;
  constexpr double kRate = 0.1;  // the running frequency's update weight per pass
  for (int64_t e = 0; e < m.E; ++e) {
    const bool used = routed[static_cast<size_t>(e)] > 0;
    m.needed[static_cast<size_t>(e)] = used ? 1 : 0;
    double& f = m.freq[static_cast<size_t>(layer * m.E + e)];
    f += kRate * ((used ? 1.0 : 0.0) - f);
  }
}

ExpertView ExpertCache::acquire(int64_t layer, int64_t e) {
  Impl& m = *impl_;
  const int64_t key = layer * m.E + e;
  std::unique_lock<std::mutex> lock(m.mu);
  ++m.tick;
  ++m.uses[static_cast<size_t>(key)];
  int64_t s = m.slot_of[static_cast<size_t>(key)];
  const auto t0 = std::chrono::steady_clock::now();
  if (s >= 0) {
    ++stats_.hits;
    Impl::Slot& slot = m.slots[static_cast<size_t>(s)];
    if (slot.loading) {  // read ahead, not finished yet: wait for it
      ++stats_.prefetch_late;
      m.cv.wait(lock, [&] { return !m.slots[static_cast<size_t>(s)].loading; });
    }
    if (slot.prefetched) ++stats_.prefetch_used;
    slot.prefetched = false;
  } else {
    ++stats_.misses;
    // Every slot busy (read-aheads in flight): wait for one to finish.
    while ((s = m.take_slot(key, false, stats_)) < 0) m.cv.wait(lock);
    fill(lock, s, key);
  }
  stats_.stall_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Impl::Slot& slot = m.slots[static_cast<size_t>(s)];
  slot.last_use = m.tick;
  slot.pinned = true;
  m.needed[static_cast<size_t>(e)] = 0;
  // Float32 slots are read in place; others are converted into the work buffer, which the layer
  // holds until release (it runs its experts one after another).
  MOE_CHECK(m.float32 || !m.work_busy, "offload",
            "one expert at a time: release the last one first");
  m.work_busy = !m.float32;
  lock.unlock();
  ExpertView v;
  const char* in = slot.data.get();
  float* work = m.work.get();
  Tensor* parts[3] = {&v.w_gate, &v.w_up, &v.w_down};
  Tensor* biases[3] = {&v.b_gate, &v.b_up, &v.b_down};
  for (int k = m.gate ? 0 : 1; k < 3; ++k) {
    const int64_t rows = m.rows[k], cols = k == 2 ? m.F : m.D;
    if (m.gguf) {  // computed from as stored, in the layer's types
      const DType t = m.gguf_types[static_cast<size_t>(layer)][static_cast<size_t>(k)];
      *parts[k] = Tensor::view(const_cast<char*>(in), {rows, cols}, t);
      const Tensor& b = m.gguf_bias[static_cast<size_t>(layer)][static_cast<size_t>(k)];
      if (b.defined()) *biases[k] = b.view_at(e * rows, {rows});
      in += m.part_bytes[k];
      continue;
    }
    float* p = const_cast<float*>(reinterpret_cast<const float*>(in));
    if (!m.float32) {
      const int64_t value_bytes = rows * cols * static_cast<int64_t>(st_dtype_size(m.dtype[k]));
      const auto* scales = reinterpret_cast<const float*>(in + (value_bytes + 63) / 64 * 64);
      rows_to_f32(m.dtype[k], in, m.dtype[k] == "I8" ? scales : nullptr, rows, cols, work);
      p = work;
      work += rows * cols;
    }
    *parts[k] = Tensor::view(p, {rows, cols}, DType::F32);
    in += m.part_bytes[k];
  }
  return v;
}

void ExpertCache::release(int64_t layer, int64_t e) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  const int32_t s = m.slot_of[static_cast<size_t>(layer * m.E + e)];
  if (s >= 0) m.slots[static_cast<size_t>(s)].pinned = false;
  m.work_busy = false;
  m.cv.notify_all();
}

ExpertCacheStats ExpertCache::stats() const {
  // A read is counted when it starts and its bytes when it ends: wait for the reads in flight
  // (read-aheads) so that the counts agree.
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  m.cv.wait(lock, [&] {
    return std::none_of(m.slots.begin(), m.slots.end(),
                        [](const Impl::Slot& s) { return s.loading; });
  });
  return stats_;
}

std::unique_ptr<Model> load_model_offloaded(const std::string& dir, int64_t capacity_bytes,
                                            EvictionPolicy policy,
                                            std::shared_ptr<ExpertCache>* cache, bool prefetch) {
  if (is_gguf_file(dir)) {
    // The file is mapped twice (the cache's reads and the model's views): the kernel shares the
    // pages. Nothing is read in ahead: the experts stay on disk until a token needs one.
    const GgufFile f = load_gguf(dir);
    const ModelConfig cfg = config_from_gguf(f);
    auto made = std::make_shared<ExpertCache>(dir, cfg, "gguf", capacity_bytes, policy, prefetch);
    auto model = std::make_unique<Model>(cfg, DType::F32, /*routed_experts=*/false);
    model->set_expert_source(made);
    load_gguf_weights(*model, f, /*stored=*/true, /*experts=*/false);
    model->set_training(false);
    if (cache) *cache = made;
    return model;
  }
  const CheckpointInfo info = read_checkpoint_info(dir);
  auto made = std::make_shared<ExpertCache>(info.dir, info.config, info.model_type, capacity_bytes,
                                            policy, prefetch);
  auto model = std::make_unique<Model>(info.config, DType::F32, /*routed_experts=*/false);
  model->set_expert_source(made);
  load_checkpoint_weights(*model, info);
  model->set_training(false);
  if (cache) *cache = made;
  return model;
}

}  // namespace moe
