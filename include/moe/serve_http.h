// moe/serve_http.h: `moe serve`'s HTTP side (cpp-httplib): OpenAI's completions API in
// OpenAI's shapes (server-sent events when streaming), /v1/models, /health and Prometheus
// /metrics, over the continuous-batching Engine of moe/serve.h. docs/serve.md documents it.
#pragma once

#include <memory>
#include <string>

#include "moe/chat_template.h"
#include "moe/serve.h"
#include "moe/tokenizer.h"

namespace moe::serve {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8080;            // 0: any free port (see HttpServer::port)
  std::string api_key;        // non-empty: requests must send "Authorization: Bearer KEY"
  std::string model_name;     // what /v1/models lists and responses name
  size_t max_body = 1 << 20;  // request bodies beyond this get 413
  // The checkpoint's chat template (moe/chat_template.h) for /v1/chat/completions; empty: the
  // endpoint answers that there is none. One using what moe/jinja.h cannot render is refused
  // when the server is made.
  ChatTemplateSource chat_template;
};

class HttpServer {
 public:
  // engine and tokenizer must outlive the server.
  HttpServer(Engine& engine, const Tokenizer& tokenizer, const HttpOptions& opt);
  ~HttpServer();
  // Binds the address; throws moe::Error when it cannot. Returns the port.
  int bind();
  // Serves until stop() (from another thread or a signal handler's thread).
  void serve();
  void stop();
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::serve
