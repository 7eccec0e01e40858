// The serving engine: continuous batching gives every request what it would get alone (greedy
// and seeded sampling), requests beyond the slots wait and beyond the queue are refused, a
// cancelled stream frees its slot, and the routing it reports is the model's.
#include <gtest/gtest.h>

#include <future>
#include <mutex>
#include <thread>

#include "moe/arena.h"
#include "moe/serve.h"
#include "moe/trainer.h"

namespace moe {

namespace {

using namespace std::chrono_literals;

Model tiny_model(DType dtype = DType::F32) {
  ModelConfig cfg = model_preset("tiny");
  cfg.max_seq_len = 48;
  Model model(cfg, dtype);
  Rng init(3);
  model.init(init);
  return model;
}

// Every event of a stream until its last; fails the test on a 10 s wait.
std::vector<serve::Event> drain(serve::Stream& s) {
  std::vector<serve::Event> out;
  for (;;) {
    serve::Event ev;
    if (!s.next(ev, 10s)) {
      ADD_FAILURE() << "no event in 10 s";
      return out;
    }
    out.push_back(ev);
    if (ev.finish != serve::Finish::none) return out;
  }
}

std::vector<int32_t> tokens_of(const std::vector<serve::Event>& evs) {
  std::vector<int32_t> t;
  for (const auto& e : evs)
    if (e.token >= 0) t.push_back(e.token);
  return t;
}

std::vector<std::vector<int32_t>> prompts() {
  return {
      {256, 72, 105}, {256, 65}, {256, 84, 104, 101, 32}, {256, 1, 2, 3, 4, 5, 6, 7}, {256, 200},
      {256, 99, 98},  {256, 10}};
}

// Expects got[t] (t < n) to be the routing of token t in ref (a decode()'s plan): the same
// experts with the same weights, by decreasing weight.
void expect_routing_is(const ModelOutput& ref, const std::vector<serve::TokenRouting>& got,
                       int64_t n) {
  const int64_t L = static_cast<int64_t>(ref.plan_offsets.size());
  ASSERT_EQ(static_cast<int64_t>(got.size()), n);
  for (int64_t t = 0; t < n; ++t) {
    ASSERT_EQ(static_cast<int64_t>(got[static_cast<size_t>(t)].experts.size()), L);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* off = ref.plan_offsets[static_cast<size_t>(l)].data<int64_t>();
      const int32_t* ex = ref.plan_experts[static_cast<size_t>(l)].data<int32_t>();
      const double* wt = ref.plan_weights[static_cast<size_t>(l)].data<double>();
      const auto& ge = got[static_cast<size_t>(t)].experts[static_cast<size_t>(l)];
      const auto& gw = got[static_cast<size_t>(t)].weights[static_cast<size_t>(l)];
      ASSERT_EQ(static_cast<int64_t>(ge.size()), off[t + 1] - off[t]) << t << " " << l;
      for (size_t k = 0; k < ge.size(); ++k) {
        if (k > 0) {
          EXPECT_GE(gw[k - 1], gw[k]);
        }
        bool found = false;
        for (int64_t p = off[t]; p < off[t + 1]; ++p)
          if (ex[p] == ge[k]) {
            found = true;
            EXPECT_NEAR(gw[k], wt[p], 1e-6);
          }
        EXPECT_TRUE(found) << "token " << t << " layer " << l << " expert " << ge[k];
      }
    }
  }
}

}  // namespace

// Seven requests through three slots, sampled and greedy, in float64 and float32: each gets
// exactly the tokens generate() gives it alone with its seed, whichever others share its steps.
TEST(Serve, BatchedRequestsGetWhatTheyGetAlone) {
  for (DType dtype : {DType::F64, DType::F32}) {
    SCOPED_TRACE(dtype_name(dtype));
    Model model = tiny_model(dtype);
    const auto ps = prompts();
    std::vector<std::vector<int32_t>> alone;
    std::vector<SamplingConfig> sampling(ps.size());
    for (size_t i = 0; i < ps.size(); ++i) {
      sampling[i].temperature = i % 2 ? 0.0 : 0.9;
      sampling[i].top_k = i % 3 == 0 ? 20 : 0;
      sampling[i].seed = 100 + i;
      const auto g = generate(model, {ps[i]}, 6 + static_cast<int64_t>(i), sampling[i]);
      alone.emplace_back(g[0].begin() + static_cast<int64_t>(ps[i].size()), g[0].end());
    }
    serve::Engine engine(model, {3, 32, 16, 256});
    std::vector<std::shared_ptr<serve::Stream>> streams;
    for (size_t i = 0; i < ps.size(); ++i) {
      serve::Request r;
      r.prompt = ps[i];
      r.max_tokens = 6 + static_cast<int64_t>(i);
      r.sampling = sampling[i];
      streams.push_back(engine.submit(r));
      ASSERT_NE(streams.back(), nullptr);
    }
    for (size_t i = 0; i < ps.size(); ++i) {
      const auto evs = drain(*streams[i]);
      EXPECT_EQ(tokens_of(evs), alone[i]) << "request " << i;
      EXPECT_EQ(evs.back().finish, serve::Finish::length);
    }
    const serve::EngineStats st = engine.stats();
    EXPECT_EQ(st.requests, 7);
    EXPECT_EQ(st.active, 0);
    int64_t generated = 0;
    for (const auto& a : alone) generated += static_cast<int64_t>(a.size());
    EXPECT_EQ(st.generated_tokens, generated);
    EXPECT_GT(st.steps, 0);
    EXPECT_LT(st.steps, generated);  // steps were shared
  }
}

// A stop token ends a request with "stop" and the token included.
TEST(Serve, StopTokenEndsTheRequest) {
  Model model = tiny_model();
  SamplingConfig greedy;
  greedy.temperature = 0;
  const auto g = generate(model, {prompts()[0]}, 8, greedy);
  const int32_t stop = g[0][prompts()[0].size() + 2];
  serve::Engine engine(model, {2, 32, 4, 256});
  serve::Request r;
  r.prompt = prompts()[0];
  r.max_tokens = 8;
  r.sampling = greedy;
  r.stop_tokens = {stop};
  const auto evs = drain(*engine.submit(r));
  const auto toks = tokens_of(evs);
  ASSERT_FALSE(toks.empty());
  EXPECT_EQ(toks.back(), stop);
  EXPECT_LE(toks.size(), 3u);
  EXPECT_EQ(evs.back().finish, serve::Finish::stop);
}

// Beyond the slots requests wait; beyond the queue they are refused; a cancelled stream ends
// with "cancelled" and its slot serves the next request.
TEST(Serve, QueueBoundAndCancel) {
  Model model = tiny_model();
  // The engine waits at its first decode step until the test has queued, been refused and
  // cancelled: nothing here depends on how fast the machine is.
  std::promise<void> go;
  std::shared_future<void> gate = go.get_future().share();
  serve::Engine engine(model, {1, 48, 1, 256}, [gate] { gate.wait(); });
  struct OpenOnExit {  // a failed assertion must not leave the engine's thread waiting
    std::promise<void>& go;
    bool open = false;
    ~OpenOnExit() {
      if (!open) go.set_value();
    }
  } guard{go};
  serve::Request r;
  r.prompt = prompts()[0];
  r.max_tokens = 40;
  r.sampling.seed = 1;
  auto first = engine.submit(r);
  ASSERT_NE(first, nullptr);
  // The first holds the slot once its first token comes; the second fills the queue's one place.
  serve::Event ev;
  ASSERT_TRUE(first->next(ev, 10s));
  auto second = engine.submit(r);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(engine.submit(r), nullptr);  // queue full
  EXPECT_EQ(engine.stats().rejected, 1);
  EXPECT_EQ(engine.stats().queued, 1);
  first->cancel();
  go.set_value();
  guard.open = true;
  const auto rest = drain(*first);
  EXPECT_EQ(rest.back().finish, serve::Finish::cancelled);
  EXPECT_TRUE(tokens_of(rest).empty());  // cancelled before its second token
  const auto evs = drain(*second);
  EXPECT_EQ(evs.back().finish, serve::Finish::length);
  EXPECT_EQ(tokens_of(evs).size(), 40u);
  EXPECT_GT(second->first_token_s(), 0);
}

// Requests that cannot run are refused by name before they queue.
TEST(Serve, BadRequestsAreRefused) {
  Model model = tiny_model();
  serve::Engine engine(model, {2, 16, 4, 256});
  serve::Request r;
  r.prompt = {};
  EXPECT_THROW(engine.submit(r), Error);  // empty prompt
  r.prompt = {256, 9999};
  EXPECT_THROW(engine.submit(r), Error);  // outside the vocabulary
  r.prompt = {256, 1, 2};
  r.max_tokens = 14;
  EXPECT_THROW(engine.submit(r), Error);  // 3 + 14 > 16
  r.max_tokens = -1;
  EXPECT_THROW(engine.submit(r), Error);
  r.prompt.assign(16, 7);
  r.max_tokens = 1;
  EXPECT_THROW(engine.submit(r), Error);  // 16 + 1 > 16
  r.prompt.assign(17, 7);
  r.max_tokens = 0;
  EXPECT_THROW(engine.submit(r), Error);  // 17 > 16, even for the prompt alone
  r.prompt = {256, 1, 2};
  r.max_tokens = 4;
  r.sampling.top_p = 0;
  EXPECT_THROW(engine.submit(r), Error);
  r.sampling.top_p = 1;
  EXPECT_NE(engine.submit(r), nullptr);
  EXPECT_THROW(serve::Engine(model, {0, 16, 4}), Error);
  EXPECT_THROW(serve::Engine(model, {2, 100, 4}), Error);  // beyond max_seq_len
}

// The routing a stream reports is the model's: the prompt's positions on the first event, then
// one position per token, each the experts decode() chose for it by decreasing weight; the
// expert counts add up to every routed pair.
TEST(Serve, RoutingIsTheModels) {
  Model model = tiny_model(DType::F64);
  const std::vector<int32_t> prompt = prompts()[2];
  const auto T = static_cast<int64_t>(prompt.size());
  SamplingConfig greedy;
  greedy.temperature = 0;
  const auto g = generate(model, {prompt}, 5, greedy);
  // The reference: one pass over prompt and the first four new tokens.
  KvCache cache = model.make_cache(1, 32);
  Arena arena;
  Tensor tok = Tensor::empty({1, T + 4}, DType::I32);
  std::copy(g[0].begin(), g[0].begin() + T + 4, tok.data<int32_t>());
  ModelOutput ref;
  model.decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last, &ref);
  const int64_t L = static_cast<int64_t>(ref.plan_offsets.size());
  ASSERT_GE(L, 1);

  serve::Engine engine(model, {2, 32, 4, 256});
  serve::Request r;
  r.prompt = prompt;
  r.max_tokens = 5;
  r.sampling = greedy;
  r.routing = true;
  const auto evs = drain(*engine.submit(r));
  ASSERT_EQ(evs.size(), 5u);
  std::vector<serve::TokenRouting> got;
  for (size_t i = 0; i < evs.size(); ++i) {
    EXPECT_EQ(evs[i].routed_from, static_cast<int64_t>(got.size()));
    EXPECT_EQ(evs[i].routing.size(), i == 0 ? static_cast<size_t>(T) : 1u);
    got.insert(got.end(), evs[i].routing.begin(), evs[i].routing.end());
  }
  expect_routing_is(ref, got, T + 4);
  const serve::EngineStats st = engine.stats();
  ASSERT_EQ(static_cast<int64_t>(st.expert_tokens.size()), L);
  for (int64_t l = 0; l < L; ++l) {
    int64_t pairs = 0;
    for (int64_t c : st.expert_tokens[static_cast<size_t>(l)]) pairs += c;
    EXPECT_EQ(pairs, ref.plan_offsets[static_cast<size_t>(l)].data<int64_t>()[T + 4]);
  }
}

// A prompt-only request (max_tokens 0) runs its prompt once and ends: one event with the
// prompt's routing and no token; its slot is free for the next request, and a prompt may fill
// the whole context. The engine reports its routing's shape.
TEST(Serve, PromptOnlyGivesTheRouting) {
  Model model = tiny_model(DType::F64);
  const std::vector<int32_t> prompt = prompts()[3];
  const auto T = static_cast<int64_t>(prompt.size());
  KvCache cache = model.make_cache(1, 32);
  Arena arena;
  Tensor tok = Tensor::empty({1, T}, DType::I32);
  std::copy(prompt.begin(), prompt.end(), tok.data<int32_t>());
  ModelOutput ref;
  model.decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last, &ref);

  serve::Engine engine(model, {1, T, 4, 256});  // one slot, just the prompt's length
  const serve::RoutingShape& shape = engine.routing_shape();
  EXPECT_EQ(shape.layers, static_cast<int64_t>(ref.plan_offsets.size()));
  EXPECT_EQ(shape.experts, model.config().moe.n_experts);
  EXPECT_EQ(shape.top_k, model.config().moe.top_k);
  serve::Request r;
  r.prompt = prompt;
  r.max_tokens = 0;
  r.routing = true;
  for (int rep = 0; rep < 2; ++rep) {  // the second needs the slot the first had
    const auto evs = drain(*engine.submit(r));
    ASSERT_EQ(evs.size(), 1u);
    EXPECT_EQ(evs[0].token, -1);
    EXPECT_EQ(evs[0].finish, serve::Finish::length);
    EXPECT_EQ(evs[0].routed_from, 0);
    expect_routing_is(ref, evs[0].routing, T);
  }
  const serve::EngineStats st = engine.stats();
  EXPECT_EQ(st.prompt_tokens, 2 * T);
  EXPECT_EQ(st.generated_tokens, 0);
  EXPECT_EQ(st.active, 0);
}

// A prompt longer than --prefill-chunk runs over several rounds, between the decode steps of
// the request already running: both get exactly what generate() gives them alone, and the long
// prompt's routing is that of one pass.
TEST(Serve, LongPromptsRunInChunksBetweenSteps) {
  for (DType dtype : {DType::F64, DType::F32}) {
    Model model = tiny_model(dtype);
    std::vector<int32_t> long_prompt = {256};
    for (int32_t i = 0; i < 29; ++i) long_prompt.push_back(65 + (i * 7) % 50);
    const auto T = static_cast<int64_t>(long_prompt.size());
    SamplingConfig greedy, sampled;
    greedy.temperature = 0;
    sampled.temperature = 0.9;
    sampled.seed = 5;
    const auto g_short = generate(model, {prompts()[2]}, 16, greedy);
    const auto g_long = generate(model, {long_prompt}, 6, sampled);
    KvCache cache = model.make_cache(1, 48);
    Arena arena;
    Tensor tok = Tensor::empty({1, T}, DType::I32);
    std::copy(long_prompt.begin(), long_prompt.end(), tok.data<int32_t>());
    ModelOutput ref;
    model.decode(tok, cache, arena, {}, nullptr, Model::LogitRows::last, &ref);

    // The prompt positions run so far, seen at every decode step.
    std::vector<int64_t> seen;
    std::mutex seen_mu;
    serve::Engine* e = nullptr;
    serve::Engine engine(model, {2, 48, 4, 4}, [&] {
      std::lock_guard<std::mutex> lk(seen_mu);
      seen.push_back(e->stats().prompt_tokens);
    });
    e = &engine;
    serve::Request a;
    a.prompt = prompts()[2];
    a.max_tokens = 16;
    a.sampling = greedy;
    serve::Request b;
    b.prompt = long_prompt;
    b.max_tokens = 6;
    b.sampling = sampled;
    b.routing = true;
    auto sa = engine.submit(a);
    auto sb = engine.submit(b);
    ASSERT_TRUE(sa && sb);
    const auto ea = drain(*sa), eb = drain(*sb);
    EXPECT_EQ(tokens_of(ea),
              std::vector<int32_t>(g_short[0].begin() + static_cast<int64_t>(a.prompt.size()),
                                   g_short[0].end()));
    EXPECT_EQ(tokens_of(eb), std::vector<int32_t>(g_long[0].begin() + T, g_long[0].end()));
    ASSERT_FALSE(eb.empty());
    EXPECT_EQ(eb[0].routed_from, 0);
    EXPECT_EQ(static_cast<int64_t>(eb[0].routing.size()), T);
    if (dtype == DType::F64) expect_routing_is(ref, eb[0].routing, T);
    // The long prompt went in by chunks of at most 4 positions a round, the short request's
    // steps running between them.
    const auto total = static_cast<int64_t>(a.prompt.size()) + T;
    std::lock_guard<std::mutex> lk(seen_mu);
    int64_t rounds = 0;
    for (size_t i = 1; i < seen.size(); ++i) {
      EXPECT_LE(seen[i] - seen[i - 1], 4);
      if (seen[i] > seen[i - 1]) ++rounds;
    }
    EXPECT_EQ(engine.stats().prompt_tokens, total);
    EXPECT_GE(rounds, (total - 4) / 4 - 1);
  }
}

}  // namespace moe
