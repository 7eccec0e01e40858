// What the two halves of `moe serve`'s HTTP side share (http.cpp: the completions API,
// /v1/models, /metrics; http_routing.cpp: POST /v1/routing and the routing page at GET /):
// the server's state, OpenAI's error shape, and the routing JSON. Internal to the library.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/jinja.h"
#include "moe/serve_http.h"

namespace moe::serve {

namespace http_detail {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// A request error: its HTTP status and OpenAI's error type.
struct ApiError : std::runtime_error {
  int status;
  std::string type, code;
  ApiError(int s, std::string t, const std::string& msg, std::string c = {})
      : std::runtime_error(msg), status(s), type(std::move(t)), code(std::move(c)) {}
};

inline ApiError bad_request(const std::string& msg, const std::string& code = {}) {
  return ApiError(400, "invalid_request_error", msg, code);
}

// JSON text; bytes that are not UTF-8 (a byte-level model can produce them) become U+FFFD.
std::string dumps(const json& j);
std::string error_body(const std::string& message, const std::string& type,
                       const std::string& code);
void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type, const std::string& code = {});
// A request body as a JSON object, or an invalid_json ApiError.
json parse_object(const std::string& body);

// When the last write is half a second old, writes `ping` (a space before a JSON body, an SSE
// comment in a stream): a client that has gone is noticed within one write. False when the
// write failed.
bool keep_alive(httplib::DataSink& sink, Clock::time_point& last_write, const std::string& ping);

// The text of each of ids[from, from + n), every token decoded alone (a piece that is not whole
// UTF-8 characters shows as U+FFFD once dumped).
json token_texts(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t from, size_t n);

// The routing of an event's positions: {"from": i, "tokens": [text], "experts": [token][layer][k],
// "weights": [token][layer][k]}; "tokens" (token_texts of the positions in ids, the sequence's
// ids) only when ids is given.
json routing_json(const Event& ev, const Tokenizer& tok, const std::vector<int32_t>* ids);

}  // namespace http_detail

struct HttpServer::Impl {
  Engine& engine;
  const Tokenizer& tok;
  HttpOptions opt;
  httplib::Server svr;
  int port = 0;
  std::atomic<int64_t> next_id{1};
  std::mutex metrics_mu;
  std::map<int, int64_t> responses;  // by status
  double last_rate = 0, last_time = 0;
  int64_t last_generated = 0;
  http_detail::Clock::time_point start = http_detail::Clock::now();

  std::unique_ptr<jinja::Template> chat_template;  // null: the checkpoint has none
  ChatTemplateSource chat_source;
  std::vector<int32_t> stop_tokens;  // end of text: the tokenizer's, and the template's eos_token

  Impl(Engine& e, const Tokenizer& t, const HttpOptions& o);

  void routes();
  void completion(const httplib::Request& req, httplib::Response& res, bool chat);
  std::string metrics();
  // http_routing.cpp: POST /v1/routing (a text's routing, its prompt run alone) and GET / (the
  // page that draws it).
  void routing(const httplib::Request& req, httplib::Response& res);
  void page(httplib::Response& res);

  // The ids of a text prompt: its tokens after the tokenizer's BOS, if it has one.
  std::vector<int32_t> text_prompt(const std::string& text) const;
  // Queues a request; when the queue is full, answers 503 with Retry-After and returns null.
  std::shared_ptr<Stream> submit(const Request& r, httplib::Response& res);
};

}  // namespace moe::serve
