// `moe serve`: an OpenAI-compatible HTTP server over a checkpoint (docs/serve.md).
#include <fmt/core.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <functional>
#include <thread>

#include "commands.h"
#include "moe/serve_http.h"
#include "moe/threading.h"
#include "moe/tokenizer.h"

namespace moe::cli {

namespace {

struct ServeArgs {
  std::string model_dir, host = "127.0.0.1", api_key, name;
  int port = 8080;
  int64_t parallel = 4, ctx = 0, queue = 32, prefill_chunk = 256;
  int threads = 0;
  double step_delay_ms = 0;
  std::string weights = "stored";
};

serve::HttpServer* g_server = nullptr;

extern "C" void on_signal(int) {
  if (g_server) g_server->stop();
}

int run_serve(const ServeArgs& a) {
  set_num_threads(a.threads);
  std::unique_ptr<Model> model = load_model(a.model_dir, weights_as(a.weights));
  std::unique_ptr<Tokenizer> tok = load_tokenizer(a.model_dir);
  std::function<void()> before_step;
  if (a.step_delay_ms > 0)
    before_step = [d = std::chrono::duration<double, std::milli>(a.step_delay_ms)] {
      std::this_thread::sleep_for(d);
    };
  serve::Engine engine(*model, {a.parallel, a.ctx, a.queue, a.prefill_chunk}, before_step);
  serve::HttpOptions opt;
  opt.host = a.host;
  opt.port = a.port;
  opt.api_key = a.api_key;
  opt.model_name = a.name;
  if (opt.model_name.empty()) {
    std::filesystem::path p(a.model_dir);
    if (!p.has_filename()) p = p.parent_path();
    opt.model_name = p.filename().string();
  }
  std::string chat_note;
  try {
    opt.chat_template = serve::find_chat_template(a.model_dir);
    chat_note = fmt::format("chat template from {}", opt.chat_template.origin);
  } catch (const Error& e) {
    chat_note = fmt::format("no chat template ({}): /v1/chat/completions answers 400", e.what());
  }
  serve::HttpServer server(engine, *tok, opt);
  const int port = server.bind();
  g_server = &server;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  fmt::print(stderr,
             "moe serve: {} on http://{}:{} ({} sequences at once, context {}, queue {}{})\n",
             opt.model_name, a.host, port, a.parallel, engine.ctx(), a.queue,
             a.api_key.empty() ? "" : ", API key required");
  fmt::print(stderr, "moe serve: {}\n", chat_note);
  std::fflush(stderr);
  server.serve();
  g_server = nullptr;
  fmt::print(stderr, "moe serve: stopped\n");
  return 0;
}

}  // namespace

Run add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand(
      "serve",
      "serve a checkpoint over HTTP with OpenAI's API: POST /v1/completions (streamed as "
      "server-sent events with \"stream\": true), GET /v1/models, /health, /metrics "
      "(Prometheus); concurrent requests share one batched decode (see docs/serve.md)");
  cmd->add_option("-m,--model", a->model_dir,
                  "checkpoint folder (a HuggingFace model or one of this engine's) or GGUF file")
      ->required();
  cmd->add_option("--host", a->host,
                  "address to listen on (another than 127.0.0.1 exposes the "
                  "server to the network)")
      ->capture_default_str();
  cmd->add_option("--port", a->port, "port (0: any free one, printed at start)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--parallel", a->parallel, "sequences decoded together (key/value cache slots)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--ctx", a->ctx, "positions per sequence, prompt included (0: the model's)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--queue", a->queue,
                  "requests that may wait for a slot; beyond, 503 with Retry-After")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--prefill-chunk", a->prefill_chunk,
                  "prompt positions run between two decode steps (a long prompt goes on over "
                  "several; 0: each prompt in one pass)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--api-key", a->api_key,
                  "require 'Authorization: Bearer KEY' (else 401; /health stays open)");
  cmd->add_option("--name", a->name, "the model's name in responses (default: the folder's)");
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--step-delay-ms", a->step_delay_ms,
                  "pause this long before each decode step: to follow the routing page at "
                  "reading speed, or to try a client against a slow server (0: none)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  add_weights_option(cmd, a->weights);
  return [a] { return run_serve(*a); };
}

}  // namespace moe::cli
