// moe/serve.h: the generation engine behind `moe serve`. Continuous batching: requests join the
// running batch between decode steps (each prompt runs through the cache in one pass) and
// leave it when they finish, are cancelled or run out of room, so N concurrent streams share
// one batched decode step instead of taking turns. Every request samples with its own seed,
// so what it gets does not depend on which others share its steps.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moe/arena.h"
#include "moe/generate.h"
#include "moe/model.h"

namespace moe::serve {

// One token's routing: for each MoE layer, the experts it went to and their combine weights,
// by decreasing weight.
struct TokenRouting {
  std::vector<std::vector<int32_t>> experts;
  std::vector<std::vector<float>> weights;
};

// The shape of the routing the engine reports: MoE layers, routed experts per layer (the most
// of any layer) and experts per token.
struct RoutingShape {
  int64_t layers = 0, experts = 0, top_k = 0;
};

enum class Finish { none, stop, length, cancelled, error };
const char* finish_name(Finish f);  // "stop", "length", ... ("" for none)

// A token's routing is known once the token has gone through the model, one step after it was
// chosen: the first event carries the prompt's routing (positions 0..T-1), each later one the
// routing of the token before it (position T + j - 1 for new token j). The last new token is
// never run, so it has none. A prompt-only request (max_tokens 0) gets one event: the prompt's
// routing, no token, Finish::length.
struct Event {
  int32_t token = -1;                 // the new token; -1 when there is none
  Finish finish = Finish::none;       // set on the stream's last event
  std::string error;                  // Finish::error's message
  int64_t routed_from = 0;            // position of routing[0] in the sequence, prompt included
  std::vector<TokenRouting> routing;  // when the request asked
};

struct Request {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;  // 0: run the prompt only (for its routing), generate nothing
  SamplingConfig sampling;
  std::vector<int32_t> stop_tokens;  // a sequence ends after generating any of these
  bool routing = false;              // report each token's routing (and the prompt's)
};

// A request's events, handed from the engine to the client that submitted it.
class Stream {
 public:
  // The next event, waiting at most `timeout`; false if none came.
  bool next(Event& ev, std::chrono::milliseconds timeout);
  // The client is gone or has what it wants: the engine frees the slot before its next step.
  void cancel();
  bool cancelled() const;
  int64_t prompt_tokens() const { return prompt_tokens_; }
  // Time from submission to the first token, in seconds (0 before it).
  double first_token_s() const;

 private:
  friend class Engine;
  void push(Event ev);
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  bool cancelled_ = false;
  int64_t prompt_tokens_ = 0;
  std::chrono::steady_clock::time_point submitted_;
  double first_token_s_ = 0;
};

struct EngineOptions {
  int64_t parallel = 4;  // sequences decoded together (key/value cache slots)
  int64_t ctx = 0;       // positions per slot, prompt included (0: the model's max_seq_len)
  int64_t queue = 32;    // requests that may wait for a slot; beyond, submit() refuses
  // Prompt positions run between two decode steps, shared by the prompts joining (oldest
  // first); a longer prompt goes on at the next round, so the running streams wait for at most
  // this many positions (0: every prompt in one pass).
  int64_t prefill_chunk = 256;
};

struct EngineStats {
  int64_t requests = 0;       // accepted
  int64_t rejected = 0;       // refused because the queue was full
  int64_t cancelled = 0;      // ended early by their clients (gone, or a stop string reached)
  int64_t active = 0;         // in the batch now
  int64_t queued = 0;         // waiting for a slot
  int64_t prompt_tokens = 0;  // run through the model
  int64_t generated_tokens = 0;
  int64_t steps = 0;  // batched decode steps
  double busy_s = 0;  // time spent computing
  // Per MoE layer, per routed expert: the token-expert pairs routed to it (prompts included).
  std::vector<std::vector<int64_t>> expert_tokens;
};

class Engine {
 public:
  // The model must outlive the engine; the engine's thread is its only user.
  // before_step, when given, is called on the engine's thread before each decode step: a hook
  // for tests that need the batch to hold still while they queue, refuse or cancel requests.
  Engine(Model& model, const EngineOptions& opt, std::function<void()> before_step = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request. Returns nullptr when `queue` requests already wait; throws moe::Error
  // for one that cannot run (empty prompt, a token outside the vocabulary, prompt plus
  // max_tokens beyond ctx).
  std::shared_ptr<Stream> submit(const Request& r);
  EngineStats stats() const;
  int64_t ctx() const { return ctx_; }
  int64_t parallel() const { return opt_.parallel; }
  const RoutingShape& routing_shape() const { return shape_; }

 private:
  struct Job;
  void loop();
  // Runs the next chunks of the prompts joining, within opt_.prefill_chunk positions; a prompt
  // whose last chunk ran chooses its first token.
  void prefill();
  void prefill_chunk(Job& job, int64_t n);
  void step();
  void finish(Job& job, Finish f, const std::string& error = {});
  // Adds a pass's routing of n tokens to the expert counts; fills out (when given) with each
  // token's routing.
  void count_routing(const ModelOutput& routing, int64_t n, std::vector<TokenRouting>* out);

  Model& model_;
  EngineOptions opt_;
  std::function<void()> before_step_;
  int64_t ctx_ = 0;
  RoutingShape shape_;
  KvCache cache_;
  Arena arena_;  // each pass's scratch (the engine's thread only)
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> waiting_;
  std::vector<std::shared_ptr<Job>> slots_;  // the running job of each cache slot
  EngineStats stats_;
  bool stopping_ = false;
  int64_t admitted_ = 0;  // jobs given a slot so far (the engine's thread only)
  std::thread thread_;
};

}  // namespace moe::serve
