// The continuous-batching generation engine (see moe/serve.h).
#include <algorithm>
#include <iterator>
#include <numeric>

#include "moe/arena.h"
#include "moe/error.h"
#include "moe/moe_layer.h"
#include "moe/serve.h"
#include "moe/threading.h"

namespace moe::serve {

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::stop: return "stop";
    case Finish::length: return "length";
    case Finish::cancelled: return "cancelled";
    case Finish::error: return "error";
    case Finish::none: break;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Stream

bool Stream::next(Event& ev, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return !events_.empty(); })) return false;
  ev = std::move(events_.front());
  events_.pop_front();
  return true;
}

void Stream::cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  cancelled_ = true;
}

bool Stream::cancelled() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cancelled_;
}

double Stream::first_token_s() const {
  std::lock_guard<std::mutex> lk(mu_);
  return first_token_s_;
}

void Stream::push(Event ev) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (first_token_s_ == 0 && ev.token >= 0)
      first_token_s_ =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - submitted_).count();
    events_.push_back(std::move(ev));
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Engine

struct Engine::Job {
  Request req;
  std::shared_ptr<Stream> stream;
  Rng rng;
  int64_t slot = -1;
  int64_t order = 0;      // the order of admission (prompts are run oldest first)
  int64_t prefilled = 0;  // prompt positions in the cache so far
  std::vector<TokenRouting> prompt_routing;  // of those positions, when the request asked
  int64_t generated = 0;
  int32_t last = -1;  // the newest token, the next step's input
  bool done = false;
  bool ready() const { return prefilled == static_cast<int64_t>(req.prompt.size()); }
  // Takes a new token: the next step's input, counted; how the job finishes with it (none
  // while it goes on).
  Finish take(int32_t token) {
    last = token;
    ++generated;
    if (std::find(req.stop_tokens.begin(), req.stop_tokens.end(), token) != req.stop_tokens.end())
      return Finish::stop;
    return generated >= req.max_tokens ? Finish::length : Finish::none;
  }
  explicit Job(const Request& r)
      : req(r), stream(std::make_shared<Stream>()), rng(r.sampling.seed) {}
};

Engine::Engine(Model& model, const EngineOptions& opt, std::function<void()> before_step)
    : model_(model), opt_(opt), before_step_(std::move(before_step)) {
  const int64_t max_seq = model.config().max_seq_len;
  MOE_CHECK(opt.parallel >= 1 && opt.parallel <= 4096, "serve",
            "--parallel must be in [1, 4096], got {}", opt.parallel);
  MOE_CHECK(opt.queue >= 0, "serve", "the queue length must be >= 0, got {}", opt.queue);
  ctx_ = opt.ctx > 0 ? opt.ctx : max_seq;
  MOE_CHECK(ctx_ >= 2 && ctx_ <= max_seq, "serve",
            "--ctx must be in [2, {}] (the model's max_seq_len), got {}", max_seq, opt.ctx);
  for (MoeLayer* m : model_.moe_layers()) {
    ++shape_.layers;
    shape_.experts = std::max(shape_.experts, m->config().n_experts);
    shape_.top_k = std::max(shape_.top_k, m->config().top_k);
  }
  cache_ = model.make_cache(opt.parallel, ctx_);
  slots_.resize(static_cast<size_t>(opt.parallel));
  model_.set_training(false);
  // OpenMP's thread count is a setting of each thread: a new one starts from the default (every
  // core), so the engine's thread takes the count of the thread that made it.
  thread_ = std::thread([this, threads = num_threads()] {
    set_num_threads(threads);
    loop();
  });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::shared_ptr<Stream> Engine::submit(const Request& r) {
  const int64_t V = model_.config().vocab_size;
  const auto T = static_cast<int64_t>(r.prompt.size());
  MOE_CHECK(T >= 1, "request", "the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i)
    MOE_CHECK(r.prompt[i] >= 0 && r.prompt[i] < V, "request",
              "prompt token {} (at {}) is outside the vocabulary [0, {})", r.prompt[i], i, V);
  MOE_CHECK(r.max_tokens >= 0, "request", "max_tokens must be >= 0, got {}", r.max_tokens);
  MOE_CHECK(T <= ctx_, "request", "the prompt has {} tokens; the context holds {}", T, ctx_);
  MOE_CHECK(T + r.max_tokens <= ctx_, "request",
            "the prompt ({} tokens) plus max_tokens ({}) exceed the context of {} tokens", T,
            r.max_tokens, ctx_);
  // The sampling settings are checked here, not on the engine's thread.
  MOE_CHECK(r.sampling.temperature >= 0 && r.sampling.temperature <= 1e6, "request",
            "temperature must be in [0, 1e6], got {}", r.sampling.temperature);
  MOE_CHECK(r.sampling.top_p > 0 && r.sampling.top_p <= 1, "request",
            "top_p must be in (0, 1], got {}", r.sampling.top_p);
  MOE_CHECK(r.sampling.top_k >= 0, "request", "top_k must be >= 0, got {}", r.sampling.top_k);
  auto job = std::make_shared<Job>(r);
  job->stream->prompt_tokens_ = T;
  job->stream->submitted_ = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lk(mu_);
    MOE_CHECK(!stopping_, "serve", "the engine is stopping");
    const auto free_slots = std::count(slots_.begin(), slots_.end(), nullptr);
    if (static_cast<int64_t>(waiting_.size()) >= opt_.queue + free_slots) {
      ++stats_.rejected;
      return nullptr;
    }
    waiting_.push_back(job);
    ++stats_.requests;
  }
  cv_.notify_all();
  return job->stream;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats s = stats_;
  s.queued = static_cast<int64_t>(waiting_.size());
  s.active = std::count_if(slots_.begin(), slots_.end(), [](auto& j) { return j != nullptr; });
  return s;
}

void Engine::finish(Job& job, Finish f, const std::string& error) {
  job.done = true;
  {
    // The counts and the slot are settled before the client sees the end.
    std::lock_guard<std::mutex> lk(mu_);
    if (f == Finish::cancelled) ++stats_.cancelled;
    if (job.slot >= 0) slots_[static_cast<size_t>(job.slot)] = nullptr;
  }
  Event ev;
  ev.finish = f;
  ev.error = error;
  job.stream->push(std::move(ev));
}

void Engine::count_routing(const ModelOutput& r, int64_t n, std::vector<TokenRouting>* out) {
  const size_t layers = r.plan_offsets.size();
  if (out) out->assign(static_cast<size_t>(n), {});
  std::lock_guard<std::mutex> lk(mu_);
  if (stats_.expert_tokens.size() != layers) {
    stats_.expert_tokens.assign(layers, {});
    for (size_t l = 0; l < layers; ++l)
      stats_.expert_tokens[l].assign(
          static_cast<size_t>(model_.moe_layers()[l]->config().n_experts), 0);
  }
  for (size_t l = 0; l < layers; ++l) {
    const int64_t* off = r.plan_offsets[l].data<int64_t>();
    const int32_t* ex = r.plan_experts[l].data<int32_t>();
    const Tensor w = r.plan_weights[l].to(DType::F32);
    const float* wt = w.data<float>();
    std::vector<int64_t>& counts = stats_.expert_tokens[l];
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t p = off[t]; p < off[t + 1]; ++p)
        if (ex[p] >= 0 && ex[p] < static_cast<int32_t>(counts.size()))
          ++counts[static_cast<size_t>(ex[p])];
      if (!out) continue;
      std::vector<int64_t> order(static_cast<size_t>(off[t + 1] - off[t]));
      std::iota(order.begin(), order.end(), off[t]);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return wt[a] > wt[b]; });
      TokenRouting& tr = (*out)[static_cast<size_t>(t)];
      tr.experts.emplace_back();
      tr.weights.emplace_back();
      for (int64_t p : order) {
        tr.experts.back().push_back(ex[p]);
        tr.weights.back().push_back(wt[p]);
      }
    }
  }
}

// The prompts joining advance, oldest first, by at most opt_.prefill_chunk positions in all.
// A job's own failure (a NaN logit, say) ends it alone; the others go on.
void Engine::prefill() {
  std::vector<std::shared_ptr<Job>> joining;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& j : slots_)
      if (j && !j->ready()) joining.push_back(j);
  }
  std::sort(joining.begin(), joining.end(), [](auto& a, auto& b) { return a->order < b->order; });
  int64_t budget = opt_.prefill_chunk > 0 ? opt_.prefill_chunk : ctx_;
  for (auto& j : joining) {
    if (budget == 0) break;
    if (j->stream->cancelled()) {
      finish(*j, Finish::cancelled);
      continue;
    }
    const int64_t n = std::min(static_cast<int64_t>(j->req.prompt.size()) - j->prefilled, budget);
    budget -= n;
    try {
      prefill_chunk(*j, n);
    } catch (const std::exception& e) {
      finish(*j, Finish::error, e.what());
    }
  }
}

// Runs the next n positions of a job's prompt through its slot; after the last, chooses its
// first token (none for a prompt-only request, which ends there).
void Engine::prefill_chunk(Job& job, int64_t n) {
  const auto T = static_cast<int64_t>(job.req.prompt.size());
  const int64_t p0 = job.prefilled;
  const bool last = p0 + n == T;
  if (p0 == 0) cache_.length[static_cast<size_t>(job.slot)] = 0;
  Tensor tok = Tensor::empty({1, n}, DType::I32);
  std::copy_n(job.req.prompt.begin() + p0, n, tok.data<int32_t>());
  Arena& arena = arena_;  // reused: a step allocates nothing once warm
  arena.reset();
  ModelOutput routing;
  const auto t0 = std::chrono::steady_clock::now();
  const Tensor logits =
      model_.decode(tok, cache_, arena, {job.slot}, nullptr,
                    last ? Model::LogitRows::last : Model::LogitRows::none, &routing);
  std::vector<TokenRouting> routed;
  count_routing(routing, n, job.req.routing ? &routed : nullptr);
  std::move(routed.begin(), routed.end(), std::back_inserter(job.prompt_routing));
  job.prefilled += n;
  Event ev;
  if (last) {
    ev.routing = std::move(job.prompt_routing);
    if (job.req.max_tokens == 0) {
      ev.finish = Finish::length;
    } else {
      const Tensor l = logits.to(DType::F32);
      ev.token =
          sample_token(l.data<float>(), model_.config().vocab_size, job.req.sampling, job.rng);
      ev.finish = job.take(ev.token);
    }
  }
  // The counts and the freed slot are settled before the client sees the event.
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.prompt_tokens += n;
    stats_.generated_tokens += last ? job.generated : 0;
    stats_.busy_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (ev.finish != Finish::none) {
      job.done = true;
      slots_[static_cast<size_t>(job.slot)] = nullptr;
    }
  }
  if (last) job.stream->push(std::move(ev));
}

// One token for every running job, in one batched pass.
void Engine::step() {
  if (before_step_) before_step_();
  std::vector<std::shared_ptr<Job>> run;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& j : slots_)
      if (j && j->ready()) run.push_back(j);
  }
  std::vector<std::shared_ptr<Job>> live;
  for (auto& j : run) {
    if (j->stream->cancelled())
      finish(*j, Finish::cancelled);
    else
      live.push_back(j);
  }
  if (live.empty()) return;
  const auto R = static_cast<int64_t>(live.size());
  Tensor tok = Tensor::empty({R, 1}, DType::I32);
  std::vector<int64_t> slots(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    tok.data<int32_t>()[r] = live[static_cast<size_t>(r)]->last;
    slots[static_cast<size_t>(r)] = live[static_cast<size_t>(r)]->slot;
  }
  Arena& arena = arena_;  // reused: a step allocates nothing once warm
  arena.reset();
  ModelOutput routing;
  const auto t0 = std::chrono::steady_clock::now();
  const Tensor logits =
      model_.decode(tok, cache_, arena, slots, nullptr, Model::LogitRows::all, &routing)
          .to(DType::F32);
  std::vector<TokenRouting> routed;
  const bool any_routing =
      std::any_of(live.begin(), live.end(), [](auto& j) { return j->req.routing; });
  count_routing(routing, R, any_routing ? &routed : nullptr);
  const int64_t V = model_.config().vocab_size;
  std::vector<Event> events;
  for (int64_t r = 0; r < R; ++r) {
    Job& job = *live[static_cast<size_t>(r)];
    Event ev;
    if (job.req.routing) {
      ev.routed_from = static_cast<int64_t>(job.req.prompt.size()) + job.generated - 1;
      ev.routing.push_back(std::move(routed[static_cast<size_t>(r)]));
    }
    ev.token = sample_token(logits.data<float>() + r * V, V, job.req.sampling, job.rng);
    ev.finish = job.take(ev.token);
    job.done = ev.finish != Finish::none;
    events.push_back(std::move(ev));
  }
  // The counts and the freed slots are settled before the clients see the events.
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (int64_t r = 0; r < R; ++r)
      if (live[static_cast<size_t>(r)]->done)
        slots_[static_cast<size_t>(live[static_cast<size_t>(r)]->slot)] = nullptr;
    stats_.generated_tokens += R;
    stats_.steps += 1;
    stats_.busy_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  for (int64_t r = 0; r < R; ++r)
    live[static_cast<size_t>(r)]->stream->push(std::move(events[static_cast<size_t>(r)]));
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] {
        return stopping_ || !waiting_.empty() ||
               std::any_of(slots_.begin(), slots_.end(), [](auto& j) { return j != nullptr; });
      });
      if (stopping_) break;
      // Requests join between steps, into the free slots, oldest first.
      for (size_t s = 0; s < slots_.size() && !waiting_.empty(); ++s) {
        if (slots_[s]) continue;
        std::shared_ptr<Job> j = std::move(waiting_.front());
        waiting_.pop_front();
        j->slot = static_cast<int64_t>(s);
        j->order = admitted_++;
        slots_[s] = std::move(j);
      }
    }
    prefill();
    // The jobs whose prompts ran to the end just now have their first token and join this step.
    try {
      step();
    } catch (const std::exception& e) {
      // A failed batch step ends every job of the batch: their caches are no longer whole.
      std::vector<std::shared_ptr<Job>> run;
      {
        std::lock_guard<std::mutex> lk(mu_);
        for (auto& j : slots_)
          if (j && j->ready()) run.push_back(j);
      }
      for (auto& j : run) finish(*j, Finish::error, e.what());
    }
  }
  // Stopping: every stream still open ends with an error.
  std::vector<std::shared_ptr<Job>> open;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& j : slots_)
      if (j) open.push_back(j);
    for (auto& j : waiting_) open.push_back(j);
    waiting_.clear();
  }
  for (auto& j : open) finish(*j, Finish::error, "the server is stopping");
}

}  // namespace moe::serve
